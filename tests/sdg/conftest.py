"""Scripted backends (no model): answers that are a pure function of the request, so runs are exact."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import pytest

TINY = {"sampling": {"max_tokens": 24}, "list_attempts": 2, "reformat_attempts": 1,
        "open-qa": {"n_macro_topics": 2, "n_subtopics": 2, "n_questions": 2, "n_revisions": 1},
        "writing": {"n_tasks": 1, "n_revisions": 1, "topics": ["Rivers"], "material_types": ["Poem", "Essay"]},
        "closed-qa": {"n_instructions": 2, "documents": ["A deque supports fast appends at both ends."]},
        "math": {"n_macro_topics": 1, "n_subtopics": 1, "n_problems": 2},
        "python": {"n_macro_topics": 1, "n_subtopics": 1, "n_problems": 2},
        "dialogue": {"n_questions": 1, "n_user_turns": 3, "topics": ["Cooking", "Travel"],
                     "sampling": {"max_tokens": 24}},
        "two-turn": {"n_questions": 1, "topics": ["Cooking", "Travel"], "sampling": {"max_tokens": 24}},
        "preference": {"k": 2, "prompts": [{"prompt": "What is 2 + 2?", "answer": "4"}, "Name a colour."]}}


def digest(*parts) -> int:
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:8], 16)


class ScriptedChat:
    """A chat backend whose answer is ``answer(prompt, seed)``; default: a numbered list of words
    drawn from a small vocabulary (so branches collide and dedup has work), or a sentence."""

    name = "scripted"

    def __init__(self, answer=None, vocabulary: int = 6):
        self.answer = answer or self.default
        self.vocabulary = vocabulary
        self.calls = 0

    def default(self, prompt: str, seed: int) -> str:
        if "list" in prompt.lower():
            picks = [f"item {digest(prompt, seed, i) % self.vocabulary}" for i in range(3)]
            return "\n".join(f"{i + 1}. {p}" for i, p in enumerate(picks))
        return f"Answer {digest(prompt, seed) % 1000}."

    async def start(self) -> None:
        pass

    async def chat(self, messages, sampling, seed) -> dict:
        self.calls += 1
        await asyncio.sleep(0)
        text = self.answer(messages[-1]["content"], seed)
        return {"text": text, "finish_reason": "stop", "prompt_tokens": 10, "completion_tokens": len(text.split())}

    async def aclose(self) -> None:
        pass


class ScriptedReward:
    """helpfulness = a hash of the response mod 5; score = helpfulness / 4."""

    name = "scripted-reward"

    def __init__(self, score=None):
        self.scorer = score or (lambda text: digest(text) % 5)
        self.calls = 0

    async def score(self, messages) -> dict:
        self.calls += 1
        value = float(self.scorer(messages[-1]["content"]))
        return {"attributes": {"helpfulness": value, "verbosity": 1.0}, "score": value / 4}

    async def aclose(self) -> None:
        pass


def read_rows(path) -> list[dict]:
    with open(path) as file:
        return [json.loads(line) for line in file]


@pytest.fixture
def scripted():
    return ScriptedChat()


class FailingWrites:
    """A stand-in for ``os.write``: from the ``nth`` write to ``path`` on, writes fail with ``errno``, the
    first failing one after writing half its bytes when ``torn`` (a disk that fills up mid-line). Writes
    to other files go through."""

    def __init__(self, path, nth: int, errno: int, torn: bool = True, when=None):
        self.path, self.nth, self.errno, self.torn = str(path), nth, errno, torn
        self.when = when or (lambda: True)  # the failures start only once this holds too
        self.real = os.write
        self.writes = self.failures = 0

    def _targets(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except OSError:
            return False

    def __call__(self, fd: int, data) -> int:
        if not self._targets(fd):
            return self.real(fd, data)
        self.writes += 1
        if self.failures or (self.writes >= self.nth and self.when()):
            self.failures += 1
            if self.failures == 1 and self.torn and len(data) > 1:
                return self.real(fd, bytes(data[:len(data) // 2]))  # a short write; the rest fails next call
            raise OSError(self.errno, os.strerror(self.errno))
        return self.real(fd, data)
