"""Reading a list out of a model's answer: directly when it is one, by asking the model otherwise.

NeMo-Curator always spends a second call asking the model to rewrite its answer as YAML, and fails
the whole pipeline when the rewrite does not parse (NVIDIA/NeMo-Curator
``nemo_curator/synthetic/nemotron.py``, ``convert_response_to_yaml_list``). Here the answer is read
directly first (a JSON list, a YAML list, numbered or bulleted lines, or one item per line); only an
answer that is none of these is sent back for reformatting, and every item, however it was read,
must occur in the original answer, so a reformat cannot invent items. Short lists are topped up by
asking again with a fresh seed, long ones trimmed; attempts are bounded and a failure costs the
list its items, never the run.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable

import yaml

from nemolite.sdg.dedup import NUMBERING, normalize

MARKER = re.compile(NUMBERING.pattern + r"(.*\S)\s*$")
FENCE = re.compile(r"^```[a-zA-Z]*\n|\n?```\s*$")

# ask(messages, attempt) -> the model's answer; the attempt number picks a fresh seed.
Ask = Callable[[list[dict], str], Awaitable[str]]


def _clean(item: str) -> str:
    item = item.strip().replace("**", "").strip()
    if len(item) > 1 and item[0] == item[-1] and item[0] in "\"'":
        item = item[1:-1].strip()
    return item


def _strings(value) -> list[str] | None:
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return None
    return [_clean(str(v)) for v in value]


def parse_list(answer: str, max_item_chars: int = 300) -> list[str] | None:
    """The items of ``answer`` read directly, or None when it is not recognisably a list."""
    items = _parse(answer, max_item_chars)
    items = [item for item in items or () if normalize(item)]
    return items or None


def _parse(answer: str, max_item_chars: int) -> list[str] | None:
    text = FENCE.sub("", answer.strip()).strip()
    if not text:
        return None
    if text.startswith("["):
        try:
            return _strings(json.loads(text))
        except json.JSONDecodeError:
            pass
    lines = [line for line in text.splitlines() if line.strip()]
    if lines[0].lstrip().startswith("- "):
        try:
            items = _strings(yaml.safe_load(text))
        except yaml.YAMLError:
            items = None
        if items:
            return items
    marked = [m.group(1) for m in map(MARKER.match, lines) if m]
    if marked:  # unmarked lines around them are preambles or descriptions, not items
        return [_clean(item) for item in marked]
    plain = [line for line in lines if not line.rstrip().endswith(":")]
    if len(plain) == 1 and len(plain[0]) > max_item_chars:
        return None  # prose: the items, if any, are inside the sentence
    return [_clean(line) for line in plain] or None


def occur_in(items: list[str], answer: str) -> bool:
    """Every item appears in ``answer`` (case, spacing and punctuation aside)."""
    haystack = normalize(answer)
    return all(normalize(item) and normalize(item) in haystack for item in items)


class ListStats:
    """Counters a run reports: conversions the model was asked for and lists it never produced."""

    __slots__ = ("reformats", "conversion_failures")

    def __init__(self):
        self.reformats = 0
        self.conversion_failures = 0


async def read_list(ask: Ask, answer: str, reformat_prompt: str, attempts: int, stats: ListStats,
                    max_item_chars: int = 300) -> list[str]:
    """The items of one answer: parsed directly, else reformatted by the model (at most ``attempts``
    tries); [] when nothing trustworthy came out (counted as a conversion failure)."""
    items = parse_list(answer, max_item_chars)
    if items and occur_in(items, answer):
        return items
    for attempt in range(attempts if normalize(answer) else 0):  # an empty answer has nothing to reformat
        stats.reformats += 1
        reformatted = await ask([{"role": "user", "content": reformat_prompt}], f"reformat{attempt}")
        items = parse_list(reformatted, max_item_chars)
        if items and occur_in(items, answer):
            return items
    stats.conversion_failures += 1
    return []


async def ask_for_list(ask: Ask, prompt: str, n: int, reformat: Callable[[str], str], *, attempts: int,
                       reformat_attempts: int, stats: ListStats, max_item_chars: int = 300,
                       parallel: bool = False) -> list[str]:
    """Up to ``n`` distinct items for ``prompt``: asked up to ``attempts`` times (each with its own
    seed) while the list is short; a long list is trimmed to ``n``. ``reformat(answer)`` is the prompt
    that asks the model to rewrite an unreadable answer as a YAML list. With ``parallel`` all attempts
    are asked at once: the same items (the first ``n`` in attempt order), sooner; those still running
    once the answers before them fill the list are cancelled."""
    async def attempt(number: int) -> list[str]:
        answer = await ask([{"role": "user", "content": prompt}], f"ask{number}")
        return await read_list(lambda m, tag: ask(m, f"ask{number}-{tag}"), answer, reformat(answer),
                               reformat_attempts, stats, max_item_chars)

    items: dict[str, str] = {}  # normalised -> first spelling, so repeats within and across answers go

    def merge(found: list[str]) -> None:
        for item in found:
            items.setdefault(normalize(item), item)

    if parallel:
        # Taken in attempt order, so the items are those of asking one after another; the answers
        # after the first ones that fill the list are not needed, and are cancelled (the server stops them).
        tasks = [asyncio.ensure_future(attempt(number)) for number in range(attempts)]
        try:
            for task in tasks:
                merge(await task)
                if len(items) >= n:
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return list(items.values())[:n]
    for number in range(attempts):
        merge(await attempt(number))
        if len(items) >= n:
            break
    return list(items.values())[:n]
