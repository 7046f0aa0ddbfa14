"""The shape of a pipeline: stages that expand nodes into children, a leaf that makes a row, and the
stable ids and seeds that make every run of it ask the same requests (see ``runner``)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nemolite.sdg.runner import Run


@dataclasses.dataclass(slots=True)
class Node:
    id: str
    path: tuple[int, ...]
    data: dict  # the items chosen on the way here: {"topic": ..., "subtopic": ...}
    children: list[Node | None] | None = None  # None until expanded; None entries belong to other shards
    row: dict | None = None
    done: bool = False


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # progress label and part of every request's cache key and seed
    letter: str  # the children's id segment: "s" gives .../s0, .../s1
    field: str | None  # the row field each child's item fills; None: items are dicts of fields
    items: Callable[[Run, Node], Awaitable[list]]
    dedup: bool = True  # generated items are deduplicated across branches; given ones are the user's
    size_key: str | None = None  # the setting that says how many items to ask for (given lists: None)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    name: str
    stages: tuple[Stage, ...]
    leaf: Callable[[Run, Node], Awaitable[dict | None]]  # the row's own fields; None: no row here
    needs_reward: bool = False

    def dedup_keys(self) -> list[tuple[str, int]]:
        return [(s.field, depth) for depth, s in enumerate(self.stages, 1) if s.dedup and s.field]


def request_seed(seed: int, node_id: str, stage: str, attempt: str) -> int:
    digest = hashlib.sha256(f"{seed}/{node_id}/{stage}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
