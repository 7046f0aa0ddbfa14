"""Progress of long work (loading, quantising, converting a checkpoint): counts, bytes, rate, ETA.

    with Progress("loading", total=num_tensors, total_bytes=size, unit="tensor") as progress:
        for name, tensor in tensors:
            ...
            progress.update(nbytes=tensor.numel() * tensor.element_size())

When stderr is a terminal it draws a tqdm bar (over bytes when ``total_bytes`` is known, so the ETA
follows the bytes left, else over the count); otherwise (a log file, a Slurm job, a test) it writes
one INFO line on the ``nemolite.progress`` logger when the stage ends, and one every
``interval`` seconds while a long stage runs, with the count, bytes, rate, elapsed time and ETA:

    loading: 290/290 tensors, 8.1 GB in 12.4 s (653.2 MB/s)
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("nemolite.progress")

DEFAULT_INTERVAL_S = 60.0


def format_bytes(count: float) -> str:
    """Decimal units, as ``du --si`` and the safetensors shard sizes: 512 B, 3.4 MB, 8.1 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{int(count)} B"


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds + 0.5), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class Progress:
    """One stage of work. ``bar``: None draws a bar only when stderr is a terminal, False never
    (log lines only), True always. ``total``/``total_bytes`` may be None when unknown (no ETA then)."""

    def __init__(self, stage: str, total: int | None = None, total_bytes: int | None = None, unit: str = "tensor",
                 bar: bool | None = None, interval: float = DEFAULT_INTERVAL_S, logger: logging.Logger = log):
        self.stage, self.total, self.total_bytes, self.unit = stage, total, total_bytes or None, unit
        self.interval, self.logger = interval, logger
        self.count = self.bytes = 0
        self.started = self._last_line = time.perf_counter()
        self.closed = False
        self._bar = None
        if bar if bar is not None else terminal():
            from tqdm import tqdm

            if self.total_bytes:
                self._bar = tqdm(total=self.total_bytes, desc=stage, unit="B", unit_scale=True, unit_divisor=1000,
                                 dynamic_ncols=True, leave=False)
            else:
                self._bar = tqdm(total=total, desc=stage, unit=unit, dynamic_ncols=True, leave=False)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=kind is not None)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def update(self, count: int = 1, nbytes: int = 0) -> None:
        self.count += count
        self.bytes += nbytes
        if self._bar is not None:
            if self.total_bytes:
                self._bar.set_postfix_str(f"{self.count}/{self.total or '?'} {self.unit}s", refresh=False)
                self._bar.update(nbytes)
            else:
                self._bar.update(count)
        elif self.interval and time.perf_counter() - self._last_line >= self.interval:
            self._last_line = time.perf_counter()
            self.logger.info("%s", self.line(running=True))

    def line(self, running: bool = False) -> str:
        """``stage: 12/290 tensors, 1.2 GB in 3.1 s (387.1 MB/s)``, with the ETA while ``running``."""
        elapsed = self.elapsed
        count = f"{self.count}/{self.total}" if self.total is not None else f"{self.count}"
        plural = "" if (self.total if self.total is not None else self.count) == 1 else "s"
        text = f"{self.stage}: {count} {self.unit}{plural}"
        if self.bytes:
            text += f", {format_bytes(self.bytes)}"
        text += f" in {format_seconds(elapsed)}"
        if self.bytes and elapsed > 0:
            text += f" ({format_bytes(self.bytes / elapsed)}/s)"
        elif self.count and elapsed > 0:
            text += f" ({self.count / elapsed:.1f} {self.unit}s/s)"
        if running:
            eta = self.eta()
            if eta is not None:
                text += f", about {format_seconds(eta)} left"
        return text

    def eta(self) -> float | None:
        elapsed = self.elapsed
        if self.total_bytes and self.bytes:
            return elapsed * (self.total_bytes - self.bytes) / self.bytes
        if self.total and self.count:
            return elapsed * (self.total - self.count) / self.count
        return None

    def close(self, failed: bool = False) -> None:
        """End the stage: the bar goes, and one INFO line says what was done (unless it ``failed``:
        the error says that)."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        if not failed:
            self.logger.info("%s", self.line())
