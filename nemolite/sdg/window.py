"""The sliding window of requests in flight.

A slot freed by a finished request goes at once to the next waiting one (no batch-and-wait, the
batch-and-wait of NeMo-Curator's ``nemo_curator/synthetic/async_nemotron.py``, which NeMo-Skills
PR #344 also left behind), and the window counts requests, not datapoints, so a wide pipeline cannot
flood a server (NeMo-Skills PR #899: a fan-out of >5000 requests froze a server for 1.5 hours). Among waiting requests the one with the lowest priority goes first
(the runner: shallowest node, then pipeline order; with one slot pipeline order alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools


class Window:
    def __init__(self, size: int):
        self.free = size
        self._waiting: list[tuple[tuple, int, asyncio.Future]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, priority: tuple):
        """Hold one of the window's slots; lower ``priority`` is served first."""
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: tuple) -> None:
        if self.free and not self._waiting:
            self.free -= 1
            return
        granted = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._order), granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # the slot came as we were cancelled: pass it on
                self._release()
            raise

    def _release(self) -> None:
        while self._waiting:
            _, _, granted = heapq.heappop(self._waiting)
            if not granted.done():
                granted.set_result(None)
                return
        self.free += 1
