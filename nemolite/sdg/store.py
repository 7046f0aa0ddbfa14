"""Resumable output: append-only JSONL files that survive ``kill -9``, and the request cache beside them.

Every line goes out in one ``os.write`` on an ``O_APPEND`` descriptor, so a killed process leaves
whole lines only; a machine crash can tear the last one, which the next open cuts away (saying how
many whole lines it kept). Lines are fsynced every few seconds and on close (a killed process loses
nothing that was written; only a power cut can lose the last seconds). The cache is written before
the row that used it, so every row in the output can be replayed.

A write that fails (disk full, EIO, a file system remounted read-only) is taken back: the part of
the line that reached the disk is truncated away, or, where even that fails, left as a torn last
line without its newline, which the next open cuts. The log then refuses every later line, so the
file never holds a gap, and the error (a ``NemoliteError`` naming the file and the OS error) stops
the run; rerunning the same command resumes from the whole lines on disk. Before each line the log
checks that its path still names the file it opened: lines written to a file deleted or moved
away under the run would be lost without a word.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from nemolite.errors import NemoliteError

FSYNC_INTERVAL_S = 2.0
RESUME_HINT = "free space (or fix the disk), then rerun the same command to resume"

log = logging.getLogger(__name__)


def sidecar(out: str | Path, suffix: str) -> Path:
    """``data.jsonl`` -> ``data.cache.jsonl`` / ``data.summary.json``."""
    out = Path(out)
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{stem}.{suffix}")


def write_failed(path: Path, error: OSError) -> NemoliteError:
    return NemoliteError(f"writing {path} failed: {error}; the lines before it are whole on disk: {RESUME_HINT}")


class JsonlLog:
    """An append-only JSONL file: whole lines in, a torn last line repaired on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as error:
            raise NemoliteError(f"cannot open {self.path} for writing: {error}; give an --out on a writable disk "
                                "with free space") from None
        try:  # two writers would interleave rows; the lock goes with the process, even on kill -9
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise NemoliteError(f"another process is writing {self.path}; give each run its own --out") from None
        self._failure: NemoliteError | None = None
        self.repair: str | None = None  # what cutting a torn last line cost, for the run's summary
        try:
            self.records = self._recover()
            stat = os.fstat(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self._file_id = (stat.st_dev, stat.st_ino)
        self._size = stat.st_size  # where a failed write is cut back to; only this process writes (the lock)
        self._synced = time.monotonic()

    def _recover(self) -> list[Any]:
        try:
            data = self.path.read_bytes()
        except OSError as error:
            raise NemoliteError(f"cannot read {self.path} to resume it: {error}") from None
        whole = data[:data.rfind(b"\n") + 1]
        # bytes.split, not str.splitlines: a row may hold U+2028 or U+0085, which json.dumps leaves as is
        lines = whole.split(b"\n")[:-1]
        if len(whole) < len(data):  # a line cut short by a crash: its record will be made again
            try:
                os.ftruncate(self._fd, len(whole))
                os.fsync(self._fd)
            except OSError as error:
                raise NemoliteError(f"cannot cut the torn last line off {self.path}: {error}; "
                                    f"{RESUME_HINT}") from None
            self.repair = (f"{self.path}: dropped its last line, cut short by a crash mid-write "
                           f"({len(data) - len(whole)} bytes); kept the {len(lines)} whole lines before it")
            log.warning(self.repair)
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line.decode("utf-8", errors="replace")))
            except json.JSONDecodeError:
                raise NemoliteError(f"{self.path}:{number} is not valid JSON, so nemolite did not write it; "
                                    "move the file away or give another --out") from None
        return records

    def append(self, record: Any) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        if self._failure is not None:  # a line after a failed one would leave a gap in the file
            raise self._failure
        if self._fd < 0:
            raise RuntimeError(f"{self.path} was appended to after it was closed")
        try:
            self._check_same_file()
            self._write(line)
        except OSError as error:
            self._take_back()
            raise self._fail(write_failed(self.path, error)) from None
        self._size += len(line)
        if time.monotonic() - self._synced > FSYNC_INTERVAL_S:
            self.sync()

    def _check_same_file(self) -> None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            stat = None
        if stat is None or (stat.st_dev, stat.st_ino) != self._file_id:
            raise self._fail(NemoliteError(
                f"{self.path} was deleted or replaced while this run was writing it, so nothing more was "
                "written; put the file back (or remove it to start over), then rerun the same command to resume"))

    def _write(self, line: bytes) -> None:
        view = memoryview(line)
        while view:  # a short write: only a full disk or a signal mid-write gets here
            written = os.write(self._fd, view)
            if written <= 0:  # a file system that accepts nothing would loop here for ever
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[written:]

    def _take_back(self) -> None:
        """Cut away the part of a failed line that reached the file. Where that fails too, the part stays
        as a last line without its newline, which the next open cuts (nothing is written after it)."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._size)

    def _fail(self, failure: NemoliteError) -> NemoliteError:
        self._failure = self._failure or failure
        return self._failure

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as error:  # after a failed fsync the kernel may have dropped the lines: stop here
            raise self._fail(write_failed(self.path, error)) from None
        self._synced = time.monotonic()

    def close(self) -> None:
        """Flush and close; raises the failure to flush, after closing. Safe to call twice."""
        if self._fd < 0:
            return
        try:
            if self._failure is None:
                self.sync()
            else:  # already failed and reported: still flush the whole lines before the failure
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: a crash leaves the old file or the new one, never half of
    one (a temporary file in the same directory, flushed to disk, then ``os.replace`` over the old)."""
    path = Path(path)
    temporary = None
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the summary from the user's other accounts
            file.write(text)
            file.flush()
            os.fsync(fd)
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        raise NemoliteError(f"writing {path} failed: {error}; {path.name} is left as it was: {RESUME_HINT}") from None
    with contextlib.suppress(OSError):  # the rename itself survives a power cut once the directory is synced
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class RequestCache:
    """Finished model calls by a hash of what was asked, so a rerun replays them exactly (even from a
    server whose answers drift with batching) and asks only what is missing. Its first line records
    the job; resuming a different job into the same output is refused. What goes into a key is the
    caller's: everything that decides the answer (see ``Run.chat`` and ``Run.score``)."""

    def __init__(self, path: str | Path, job: str):
        self.log = JsonlLog(path)
        records = self.log.records
        try:
            if not records:
                self.log.append({"job": job})
            elif records[0].get("job") != job:
                raise NemoliteError(f"{path} belongs to a run with other settings (pipeline, config, seed, shard or "
                                    "model); give another --out, or delete the output and its .cache.jsonl to start "
                                    "over")
        except BaseException:
            self.log.close()
            raise
        self.entries = {r["key"]: r["value"] for r in records[1:]}
        self.replayed = 0

    @staticmethod
    def key(*parts: Any) -> str:
        text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(self, key: str) -> Any | None:
        value = self.entries.get(key)
        if value is not None:
            self.replayed += 1
        return value

    def put(self, key: str, value: Any) -> None:
        self.log.append({"key": key, "value": value})
        self.entries[key] = value  # only once it is on disk: a value that is not would replay in this run only

    def close(self) -> None:
        self.log.close()
