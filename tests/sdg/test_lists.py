import asyncio

import pytest

from nemolite.sdg.dedup import normalize
from nemolite.sdg.lists import ListStats, ask_for_list, occur_in, parse_list, read_list


@pytest.mark.parametrize("answer, items", [
    ('["Food", "Travel", "Science"]', ["Food", "Travel", "Science"]),
    ("```json\n[\"a b\", 3]\n```", ["a b", "3"]),
    ("- Food\n- 'Travel: trips'\n- Science", ["Food", "Travel: trips", "Science"]),
    ("Here are three topics:\n1. Food\n2) **Travel**\n3. Science\nI hope this helps.", ["Food", "Travel", "Science"]),
    ("* Food\n  tasty things to eat\n* Travel", ["Food", "Travel"]),  # descriptions are not items (Curator PR #623)
    ("Topics:\nFood\nTravel", ["Food", "Travel"]),
    ("How do I read a file?", ["How do I read a file?"]),
])
def test_direct_parse(answer, items):
    assert parse_list(answer) == items
    assert occur_in(items, answer)


@pytest.mark.parametrize("answer", ["", "   \n ", "...\n---", "word " * 100])
def test_not_a_list(answer):
    assert parse_list(answer) is None


def test_items_must_occur_in_the_answer():
    assert occur_in(["read  a FILE"], "1. How to read a file?")
    assert not occur_in(["write a file"], "1. How to read a file?")
    assert normalize("2. Hello,   World!") == "hello world"


def scripted(answers):
    """An ask() that returns ``answers`` in turn and records what it was asked."""
    asked = []

    async def ask(messages, attempt):
        asked.append((messages[-1]["content"], attempt))
        return answers[len(asked) - 1]
    return ask, asked


def test_reformat_fallback_checks_items_and_retries_bounded():
    prose = "Some good topics are food and travel and also science, " * 8
    ask, asked = scripted(["- food\n- cars", "- food and travel\n- science"])
    stats = ListStats()
    items = asyncio.run(read_list(ask, prose, "reformat please", 3, stats))
    assert items == ["food and travel", "science"]  # the first reformat invented "cars": refused
    assert [a for _, a in asked] == ["reformat0", "reformat1"]
    assert (stats.reformats, stats.conversion_failures) == (2, 0)

    ask, asked = scripted(["- nothing", "- invented", "- made up"])
    stats = ListStats()
    assert asyncio.run(read_list(ask, prose, "reformat please", 2, stats)) == []
    assert len(asked) == 2 and stats.conversion_failures == 1


def test_short_lists_are_topped_up_long_ones_trimmed():
    ask, asked = scripted(["1. a\n2. b", "1. B\n2. c", "1. d"])
    items = asyncio.run(ask_for_list(ask, "list 3", 3, lambda a: f"reformat {a}", attempts=3, reformat_attempts=1,
                                     stats=ListStats()))
    assert items == ["a", "b", "c"]  # "B" repeats "b"; the third call is never made
    assert [a for _, a in asked] == ["ask0", "ask1"]

    ask, asked = scripted(["1. a", "1. a", "1. a"])
    items = asyncio.run(ask_for_list(ask, "list 3", 3, lambda a: a, attempts=3, reformat_attempts=1,
                                     stats=ListStats()))
    assert items == ["a"] and len(asked) == 3  # short lists are accepted after the last attempt

    ask, _ = scripted(["1. a\n2. b\n3. c\n4. d"])
    assert asyncio.run(ask_for_list(ask, "list 2", 2, lambda a: a, attempts=3, reformat_attempts=1,
                                    stats=ListStats())) == ["a", "b"]


def test_parallel_attempts_give_the_same_items():
    answers = ["1. a", "1. b\n2. a", "1. c", "1. d"]
    sequential, asked = scripted(answers)
    expected = asyncio.run(ask_for_list(sequential, "list 3", 3, lambda a: a, attempts=4, reformat_attempts=1,
                                        stats=ListStats()))
    assert expected == ["a", "b", "c"] and len(asked) == 3
    parallel, asked = scripted(answers)
    assert asyncio.run(ask_for_list(parallel, "list 3", 3, lambda a: a, attempts=4, reformat_attempts=1,
                                    stats=ListStats(), parallel=True)) == expected
    assert len(asked) == 4


def test_parallel_top_ups_stop_once_earlier_answers_fill_the_list():
    """Attempt 2 finishes last but comes first in order: its items are used; attempt 3, not needed
    once attempts 0-2 fill the list, is cancelled instead of awaited."""
    cancelled = []

    async def ask(messages, attempt):
        if attempt == "ask2":
            await asyncio.sleep(0.05)  # answers after ask3 has
            return "1. c"
        if attempt == "ask3":
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append(attempt)
                raise
        return {"ask0": "1. a", "ask1": "1. b\n2. a", "ask3": "1. d"}[attempt]

    async def run():
        return await asyncio.wait_for(ask_for_list(ask, "list 3", 3, lambda a: a, attempts=4, reformat_attempts=1,
                                                   stats=ListStats(), parallel=True), timeout=10)
    assert asyncio.run(run()) == ["a", "b", "c"]
    assert cancelled == ["ask3"]
