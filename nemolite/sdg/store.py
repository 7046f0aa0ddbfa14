"""Resumable output: append-only JSONL files that survive ``kill -9``, and the request cache beside them.

Every line goes out in one ``os.write`` on an ``O_APPEND`` descriptor, so a killed process leaves
whole lines only; a machine crash can tear the last one, which the next open cuts away. Lines are
fsynced every few seconds and on close (a killed process loses nothing that was written; only a
power cut can lose the last seconds). The cache is written before the row that used it, so every
row in the output can be replayed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from nemolite.errors import NemoliteError

FSYNC_INTERVAL_S = 2.0


def sidecar(out: str | Path, suffix: str) -> Path:
    """``data.jsonl`` -> ``data.cache.jsonl`` / ``data.summary.json``."""
    out = Path(out)
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{stem}.{suffix}")


class JsonlLog:
    """An append-only JSONL file: whole lines in, a torn last line repaired on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:  # two writers would interleave rows; the lock goes with the process, even on kill -9
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise NemoliteError(f"another process is writing {self.path}; give each run its own --out") from None
        self.records = self._recover()
        self._synced = time.monotonic()

    def _recover(self) -> list[Any]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        whole = data[:data.rfind(b"\n") + 1]
        if len(whole) < len(data):  # a line cut short by a crash: its record will be made again
            with open(self.path, "r+b") as file:
                file.truncate(len(whole))
        records = []
        for number, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise NemoliteError(f"{self.path}:{number} is not valid JSON, so nemolite did not write it; "
                                    "move the file away or give another --out") from None
        return records

    def append(self, record: Any) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        written = os.write(self._fd, line)
        while written < len(line):  # only a full disk or a signal mid-write gets here
            written += os.write(self._fd, line[written:])
        if time.monotonic() - self._synced > FSYNC_INTERVAL_S:
            self.sync()

    def sync(self) -> None:
        os.fsync(self._fd)
        self._synced = time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1


class RequestCache:
    """Finished model calls by a hash of what was asked, so a rerun replays them exactly (even from a
    server whose answers drift with batching) and asks only what is missing. Its first line records
    the job; resuming a different job into the same output is refused."""

    def __init__(self, path: str | Path, job: str):
        self.log = JsonlLog(path)
        records = self.log.records
        if not records:
            self.log.append({"job": job})
        elif records[0].get("job") != job:
            raise NemoliteError(f"{path} belongs to a run with other settings (pipeline, config, seed, shard or "
                                "model); give another --out, or delete the output and its .cache.jsonl to start over")
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
        self.entries[key] = value
        self.log.append({"key": key, "value": value})

    def close(self) -> None:
        self.log.close()
