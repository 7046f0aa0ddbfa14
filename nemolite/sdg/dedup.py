"""Deduplication between stages, decided in pipeline order so that it is the same on every run.

A text is keyed by its normalised form (case folded, numbering, bullets and punctuation dropped,
spacing collapsed). Items of one list are deduplicated as the list is read; across branches, a row
is dropped when one of its items (a subtopic, a question, a revised prompt...) was already used by a
row of another branch earlier in pipeline order. Rows reach the deduper in that order, whatever
order their requests finished in, which is what makes the result reproducible, resumable and the
same for a sharded run merged afterwards.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence

NUMBERING = re.compile(r"^\s*(?:\d{1,3}[.):]|[-*•+]|\(?[a-zA-Z][.)])\s+")


def normalize(text: str) -> str:
    text = NUMBERING.sub("", unicodedata.normalize("NFKC", text).casefold())
    text = "".join(" " if unicodedata.category(c).startswith(("P", "S")) else c for c in text)
    return " ".join(text.split())


def node_prefix(row_id: str, depth: int) -> str:
    """The id of the row's ancestor ``depth`` levels below the root: ``open-qa/m3/s1/q2/r0``, 2 -> ``open-qa/m3/s1``."""
    return "/".join(row_id.split("/")[:depth + 1])


def order_key(row_id: str) -> tuple[int, ...]:
    """Pipeline order of a row id: its indices, depth-first (``m3/s10`` after ``m3/s9``)."""
    return tuple(int(part[1:]) for part in row_id.split("/")[1:])


class Deduper:
    """Which node first used each normalised item, per field; ``keys`` are (field, depth) pairs: the
    row field that holds the item and the depth of the node that produced it."""

    def __init__(self, keys: Sequence[tuple[str, int]]):
        self.keys = list(keys)
        self.owners: dict[tuple[str, str], tuple[str, str]] = {}  # (field, normalised) -> (node id, text)
        self.exact = 0
        self.normalised = 0  # equal only after normalising

    def owner(self, field: str, text: str) -> str | None:
        found = self.owners.get((field, normalize(text)))
        return None if found is None else found[0]

    def admit(self, row: Mapping) -> bool:
        """True when no item of ``row`` belongs to another branch; then its items are claimed."""
        claims = []
        for field, depth in self.keys:
            text = row.get(field)
            if not isinstance(text, str):
                continue
            node = node_prefix(row["id"], depth)
            found = self.owners.get((field, normalize(text)))
            if found is not None and found[0] != node:
                if found[1] == text:
                    self.exact += 1
                else:
                    self.normalised += 1
                return False
            claims.append(((field, normalize(text)), (node, text)))
        for key, value in claims:
            self.owners.setdefault(key, value)
        return True
