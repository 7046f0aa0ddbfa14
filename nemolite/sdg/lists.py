"""Reading a list out of a model's answer: directly when it is one, by asking the model otherwise.

NeMo-Curator always spends a second call asking the model to rewrite its answer as YAML, and fails
the whole pipeline when the rewrite does not parse (NVIDIA/NeMo-Curator
``nemo_curator/synthetic/nemotron.py``, ``convert_response_to_yaml_list``). Here the answer is read
directly first (a JSON list, a YAML list, numbered or bulleted lines, or one item per line); only an
answer that is none of these is sent back for reformatting, and every item, however it was read,
must occur in the original answer, so a reformat cannot invent items. Short lists are topped up by
asking again with a fresh seed, long ones trimmed; attempts are bounded and a failure costs the
list its items, never the run.

A backend whose engine is nemolite's (in-process, or a ``nemolite serve`` endpoint) is asked for the
list as structured output instead: a JSON array of exactly ``n`` strings (``list_schema``), each of
which survives the list's cleaning, so the answer is read as it is (``json_items``): no reformat is
ever asked for, and an answer cut off by ``max_tokens`` still gives its complete items (the top-up
asks for the rest). Other servers keep the path above.
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

# ask(messages, attempt[, schema]) -> the model's answer; the attempt number picks a fresh seed, the
# schema (a list request's, when given) constrains the answer to it.
Ask = Callable[..., Awaitable[str]]

# One item of a structured list: words separated by single spaces (no control characters, no runs of
# spaces a small model can fill its tokens with), ending in a letter or digit and at most two
# punctuation marks ("...?", "(1984)."). That last letter or digit survives ``_clean`` and
# ``normalize`` whatever comes before it (a numbering such as "1. " ends in a space), so no item of the
# answer is dropped as empty. The punctuation excludes the six marks whose NFKC form holds a space
# (U+2017, U+203E, U+FE49-U+FE4C), which could complete such a numbering.
ITEM_PATTERN = (r"^(?:[^\x00-\x20\x7f]+ )*[^\x00-\x20\x7f]*[\p{L}\p{N}]"
                r"[\p{P}--[\x{2017}\x{203E}\x{FE49}-\x{FE4C}]]{0,2}$")


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


def list_schema(n: int, max_item_chars: int = 300, max_tokens: int | None = None) -> dict:
    """The JSON schema of a structured list: exactly ``n`` strings of ITEM_PATTERN, each at most
    ``max_item_chars`` characters and, given the answer's ``max_tokens``, short enough that its first
    item ends within them even at one character a token (the rest of a cut-off answer is asked again)."""
    chars = max_item_chars if max_tokens is None else min(max_item_chars, max_tokens - len('[""'))
    return {"type": "array", "minItems": n, "maxItems": n,
            "items": {"type": "string", "maxLength": max(1, chars), "pattern": ITEM_PATTERN}}


def json_items(answer: str) -> list[str] | None:
    """The items of a structured list's answer, a JSON array of strings, cleaned as ``parse_list`` cleans
    them; one cut off by ``max_tokens`` gives its complete items. None when the answer is no such array
    (a server that ignored the schema): it is then read as any other answer."""
    text = answer.strip()
    if not text.startswith("["):
        return None
    decoder, items, position = json.JSONDecoder(), [], 1
    while True:
        position = _skip_space(text, position)
        if position == len(text) or text[position] == "]":
            break
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            break  # the item max_tokens cut off
        if not isinstance(item, str):
            return None
        items.append(item)
        position = _skip_space(text, position)
        if not text.startswith(",", position):
            break
        position += 1
    return [item for item in map(_clean, items) if normalize(item)]


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


class ListStats:
    """Counters a run reports: conversions the model was asked for and lists it never produced."""

    __slots__ = ("reformats", "conversion_failures")

    def __init__(self):
        self.reformats = 0
        self.conversion_failures = 0


async def read_list(ask: Ask, answer: str, reformat_prompt: str, attempts: int, stats: ListStats,
                    max_item_chars: int = 300, structured: bool = False) -> list[str]:
    """The items of one answer: parsed directly, else reformatted by the model (at most ``attempts``
    tries); [] when nothing trustworthy came out (counted as a conversion failure). A ``structured``
    answer (a JSON array by ``list_schema``) is its own items: never reformatted."""
    if structured:
        items = json_items(answer)
        if items is not None:
            if not items:
                stats.conversion_failures += 1
            return items
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
                       parallel: bool = False, schema: dict | None = None) -> list[str]:
    """Up to ``n`` distinct items for ``prompt``: asked up to ``attempts`` times (each with its own
    seed) while the list is short; a long list is trimmed to ``n``. ``reformat(answer)`` is the prompt
    that asks the model to rewrite an unreadable answer as a YAML list. With ``parallel`` all attempts
    are asked at once: the same items (the first ``n`` in attempt order), sooner; those still running
    once the answers before them fill the list are cancelled. With ``schema`` (``list_schema``) each
    attempt asks ``ask(messages, attempt, schema)`` for a structured answer (reformat requests never do)."""
    async def attempt(number: int) -> list[str]:
        messages = [{"role": "user", "content": prompt}]
        answer = await (ask(messages, f"ask{number}") if schema is None else ask(messages, f"ask{number}", schema))
        return await read_list(lambda m, tag: ask(m, f"ask{number}-{tag}"), answer, reformat(answer),
                               reformat_attempts, stats, max_item_chars, structured=schema is not None)

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
