"""How far ahead of the writer work may start when ``--rows N`` caps the output.

Without a cap every node is needed and all run as soon as they can. With one, a node whose rows
would come after the N-th row is wasted work, and a free slot in the window would happily take it
(a wide tree offers plenty). So the rows still to come are estimated in pipeline order, from the
writer's position on: a finished leaf counts its row, an unfinished one the share of leaves that
gave a kept row so far, an unexpanded node the mean fan-out observed at each stage below it (the
configured list size until a list of that stage has been seen). Work starts only up to the node
where the estimate reaches the rows still needed; the node the writer waits for is always inside,
so the run never stalls. Slots this leaves idle cost less than they seem to: a model server's step
grows with its batch, so speculative requests slow down the needed ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


class Lookahead:
    def __init__(self, rows: int | None, sizes: list[float]):
        self.rows = rows
        self.sizes = sizes  # per depth: the configured number of children (the prior)
        self.seen = [[0, 0] for _ in sizes]  # per depth: children seen, nodes expanded
        self.kept = self.walked = 0  # leaves the writer passed, and how many gave a kept row
        self.cutoff: tuple[int, ...] | None = None  # the last node in pipeline order that may start
        self._moved: asyncio.Event | None = None

    def expanded(self, depth: int, children: int) -> None:
        self.seen[depth][0] += children
        self.seen[depth][1] += 1

    def walked_leaf(self, kept: bool) -> None:
        self.walked += 1
        self.kept += kept

    def estimate(self, depth: int, row_kept: bool | None) -> float:
        """Kept rows expected below a node at ``depth``: ``row_kept`` is a finished leaf's answer."""
        if row_kept is not None:
            return float(row_kept)
        rows = (self.kept + 1) / (self.walked + 1)
        for level in range(depth, len(self.sizes)):
            children, expanded = self.seen[level]
            rows *= (children + self.sizes[level]) / (expanded + 1)
        return rows

    def update(self, pending: Iterable[tuple[tuple[int, ...], float]], needed: int) -> None:
        """Move the cutoff: ``pending`` gives (path, estimate) of the unwritten nodes in pipeline order."""
        if self.rows is None:
            return
        total, cutoff = 0.0, None
        for path, estimate in pending:
            total += estimate
            if total >= needed:
                cutoff = path
                break
        if cutoff != self.cutoff:
            self.cutoff = cutoff
            if self._moved is not None:
                self._moved.set()
                self._moved = None

    def allows(self, path: tuple[int, ...]) -> bool:
        cutoff = self.cutoff
        return cutoff is None or path <= cutoff or path[:len(cutoff)] == cutoff

    async def admit(self, path: tuple[int, ...]) -> None:
        """Wait until the node at ``path`` is inside the cutoff."""
        while not self.allows(path):
            if self._moved is None:
                self._moved = asyncio.Event()
            await self._moved.wait()
