"""The eight pipelines of the Nemotron-4 340B alignment data (arXiv 2406.11704 §3), as stages and a leaf.

Ids name each level by a letter: macro topic ``m``, subtopic ``s``, question ``q``, revision ``r``,
writing topic x material ``w``, task ``t``, document ``d``, problem or prompt ``p``, conversation
topic ``t``. Rows carry every item on their path (``topic``, ``subtopic``..., ``prompt``), the
conversation in ``messages`` and the reward of its last turn in ``reward``.
"""

from __future__ import annotations

import asyncio
import re

from nemolite.errors import NemoliteError
from nemolite.sdg.config import count, read_records, render
from nemolite.sdg.dedup import normalize
from nemolite.sdg.quality import choose_pair, matches_answer
from nemolite.sdg.runner import Run
from nemolite.sdg.tree import Node, Pipeline, Stage, request_seed

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
SPEAKER = re.compile(r"^\s*(?:user|assistant)\s*:\s*", re.IGNORECASE)


async def _all(*awaitables) -> list:
    """``asyncio.gather`` that cancels the others when one fails: left running, their requests would
    outlive the run that stopped on the failure (a full disk, say) and write into its closed files."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _texts(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise NemoliteError(f"{where} must be a list of non-empty strings")
    return list(value)


def _listed(name: str, letter: str, field: str, template: str, size_key: str, dedup: bool = True,
            **fields: str) -> Stage:
    """A stage whose items the model lists; ``fields`` name, for each template field, the row field
    (or else the pipeline setting) that fills it."""
    async def items(run: Run, node: Node) -> list[str]:
        values = {k: str(node.data[v] if v in node.data else run.settings[v]) for k, v in fields.items()}
        return await run.ask_list(node, name, template, size_key, **values)
    return Stage(name, letter, field, items, dedup, size_key)


def _given(key: str):
    """A stage whose items are a list in the pipeline's settings."""
    async def items(run: Run, node: Node) -> list[str]:
        return _texts(run.settings[key], key)
    return items


async def _macro_topics(run: Run, node: Node) -> list[str]:
    if run.settings.get("macro_topics"):
        return _texts(run.settings["macro_topics"], "open-qa.macro_topics")
    return await run.ask_list(node, "macro topics", "macro_topics", "n_macro_topics")


async def _writing_topics(run: Run, node: Node) -> list[dict]:
    topics = _texts(run.settings["topics"], "writing.topics")
    kinds = _texts(run.settings["material_types"], "writing.material_types")
    return [{"topic": topic, "material_type": kind} for topic in topics for kind in kinds]


async def _documents(run: Run, node: Node) -> list[str]:
    path = run.settings.get("documents_file")
    if not path:
        return _texts(run.settings["documents"], "closed-qa.documents")
    records = read_records(path)
    texts = [r if isinstance(r, str) else r.get("text", r.get("document")) for r in records]
    return _texts(texts, f"the documents of {path} (each a \"text\" or \"document\" field)")


async def _preference_prompts(run: Run, node: Node) -> list[dict]:
    path = run.settings.get("prompts_file")
    records = read_records(path) if path else run.settings["prompts"]
    prompts = []
    for record in records:
        if isinstance(record, dict) and "prompt" not in record and isinstance(record.get("messages"), list):
            record = {"prompt": next((m["content"] for m in reversed(record["messages"]) if m.get("role") == "user"),
                                     None), "answer": record.get("answer")}
        item = {"prompt": record} if isinstance(record, str) else record
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise NemoliteError(f"each preference prompt must be a string or {{prompt, answer}}, got {record!r}")
        prompts.append({"prompt": item["prompt"]} if item.get("answer") is None else
                       {"prompt": item["prompt"], "answer": str(item["answer"])})
    return prompts


# ------------------------------------------------------------------------------------------------ leaves

async def _answer_prompt(run: Run, node: Node) -> dict | None:
    return await _conversation(run, node, node.data["prompt"], 1)


async def _answer_closed_qa(run: Run, node: Node) -> dict | None:
    prompt = render(run.config, "closed_qa_prompt", document=node.data["document"],
                    instruction=node.data["instruction"])
    return await _conversation(run, node, prompt, 1)


def strip_filler(text: str, phrases: list[str]) -> str:
    """A simulated user turn without a speaker label and without the opening sentences that only thank
    or agree; the text as it was when nothing else is left."""
    sentences = SENTENCE_END.split(SPEAKER.sub("", text.strip()))
    fillers = [normalize(p) for p in phrases]
    while len(sentences) > 1 and any(f"{normalize(sentences[0])} ".startswith(f"{f} ") for f in fillers):
        sentences.pop(0)
    return " ".join(sentences).strip()


def _transcript(messages: list[dict]) -> str:
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


async def _conversation(run: Run, node: Node, prompt: str, user_turns: int) -> dict | None:
    """``prompt`` answered; from the second user turn on, one model plays both sides: the assistant,
    and the user through a persona prompt. None when a turn comes back empty."""
    messages = [{"role": "user", "content": prompt}]
    for turn in range(user_turns):
        if turn:
            personas = _texts(run.config["personas"], "personas")
            persona = personas[request_seed(run.seed, node.id, "persona", "") % len(personas)]
            ask = render(run.config, "user_turn", persona=persona, conversation=_transcript(messages))
            user = strip_filler(await run.chat(node, f"user{turn}", [{"role": "user", "content": ask}]),
                                run.config["polite_filler"])
            if not user:
                return None
            messages.append({"role": "user", "content": user})
        reply = (await run.chat(node, f"assistant{turn}", messages)).strip()
        if not reply:
            return None
        messages.append({"role": "assistant", "content": reply})
    return {"messages": messages, "reward": await run.score(node, messages)}


async def _dialogue(run: Run, node: Node) -> dict | None:
    return await _conversation(run, node, node.data["prompt"], count(run.settings, "n_user_turns"))


async def _two_turn(run: Run, node: Node) -> dict | None:
    return await _conversation(run, node, node.data["prompt"], 2)


async def _pair(run: Run, node: Node) -> dict | None:
    """k samples (each its own seed), each scored; the pair is decided by ground truth, then reward."""
    messages = [{"role": "user", "content": node.data["prompt"]}]
    k = count(run.settings, "k", 2)
    texts = await _all(*(run.chat(node, f"sample{i}", messages) for i in range(k)))
    rewards = await _all(*(run.score(node, [*messages, {"role": "assistant", "content": t.strip()}])
                           for t in texts))
    answer = node.data.get("answer")
    samples = [{"text": t.strip(), "reward": r} for t, r in zip(texts, rewards, strict=True)]
    if answer is not None:
        for sample in samples:
            sample["correct"] = matches_answer(sample["text"], answer)
    pair = choose_pair(samples, answer)
    if pair is None:
        run.summary.no_preference += 1
        return None
    chosen, rejected, decided_by = pair
    return {"messages": messages, "chosen": samples[chosen]["text"], "rejected": samples[rejected]["text"],
            "reward": samples[chosen]["reward"], "rejected_reward": samples[rejected]["reward"],
            "decided_by": decided_by, "samples": samples}


# ------------------------------------------------------------------------------------------------ pipelines

def _topic_stages(macro: Stage, subtopic_template: str) -> tuple[Stage, Stage]:
    return macro, _listed("subtopics", "s", "subtopic", subtopic_template, "n_subtopics", topic="topic")


def _chat_stages() -> tuple[Stage, Stage]:
    return (Stage("topics", "t", "topic", _given("topics"), dedup=False),
            _listed("questions", "q", "prompt", "chat_questions", "n_questions", topic="topic"))


PIPELINES = {p.name: p for p in (
    Pipeline("open-qa", (
        *_topic_stages(Stage("macro topics", "m", "topic", _macro_topics, size_key="n_macro_topics"), "subtopics"),
        _listed("questions", "q", "question", "open_qa_questions", "n_questions", topic="subtopic"),
        _listed("revisions", "r", "prompt", "open_qa_revision", "n_revisions", question="question")),
        _answer_prompt),
    Pipeline("writing", (
        Stage("writing topics", "w", None, _writing_topics, dedup=False),
        _listed("tasks", "t", "task", "writing_tasks", "n_tasks", topic="topic", material_type="material_type"),
        _listed("revisions", "r", "prompt", "writing_revision", "n_revisions", task="task")),
        _answer_prompt),
    # Instructions are deduplicated per document only: "Summarize the text." is new for each document.
    Pipeline("closed-qa", (
        Stage("documents", "d", "document", _documents, dedup=False),
        _listed("instructions", "q", "instruction", "closed_qa_instructions", "n_instructions", dedup=False,
                document="document")),
        _answer_closed_qa),
    Pipeline("math", (
        *_topic_stages(_listed("macro topics", "m", "topic", "math_macro_topics", "n_macro_topics",
                               school_level="school_level"), "math_subtopics"),
        _listed("problems", "p", "prompt", "math_problems", "n_problems", topic="subtopic")),
        _answer_prompt),
    Pipeline("python", (
        *_topic_stages(_listed("macro topics", "m", "topic", "python_macro_topics", "n_macro_topics"),
                       "python_subtopics"),
        _listed("problems", "p", "prompt", "python_problems", "n_problems", topic="subtopic")),
        _answer_prompt),
    Pipeline("dialogue", _chat_stages(), _dialogue),
    Pipeline("two-turn", _chat_stages(), _two_turn),
    Pipeline("preference", (Stage("prompts", "p", None, _preference_prompts, dedup=False),), _pair,
             needs_reward=True),
)}
