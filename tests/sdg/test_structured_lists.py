"""List stages as structured output: a JSON array of the stage's item count where the engine is
nemolite's (in-process, or a server whose /v1/models says owned_by "nemolite"); other servers keep
the parse-and-reformat path."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

import nemolite.sdg.runner as runner
from nemolite.engine.async_llm import AsyncLLM
from nemolite.errors import NemoliteError
from nemolite.sdg import InProcessChat, OpenAIChat, arun_pipeline, run_pipeline
from nemolite.sdg.dedup import normalize
from nemolite.sdg.lists import ListStats, ask_for_list, json_items, list_schema, read_list

from tests.sdg.conftest import TINY, digest
from tests.server.conftest import start_server, stop_server

# A fixed macro topic, so that the demo model's lists are the subtopics, questions and revisions.
DEMO = {"sampling": {"max_tokens": 96}, "list_attempts": 2, "max_item_chars": 40,
        "open-qa": {"macro_topics": ["Cooking"], "n_subtopics": 3, "n_questions": 2, "n_revisions": 1}}


# ------------------------------------------------------------------------------------------ reading


def test_schema_bounds_items_by_max_item_chars_and_max_tokens():
    schema = list_schema(4, 300, 256)
    assert (schema["minItems"], schema["maxItems"], schema["items"]["maxLength"]) == (4, 4, 253)
    assert list_schema(2, 40, 256)["items"]["maxLength"] == 40
    assert list_schema(2, 40, None)["items"]["maxLength"] == 40
    assert list_schema(2, 40, 2)["items"]["maxLength"] == 1


def test_json_items_reads_whole_and_cut_off_arrays():
    assert json_items('["Food", "Travel \\"abroad\\"", "Caf\\u00e9"]') == ["Food", 'Travel "abroad"', "Café"]
    assert json_items('["Food", "Travel", "Scie') == ["Food", "Travel"]  # max_tokens cut the last one
    assert json_items('["Food", ') == ["Food"] and json_items('["Fo') == []
    assert json_items('["1. ?", "**Bold**", "ok"]') == ["Bold", "ok"]  # cleaned as parse_list cleans
    for answer in ("1. Food\n2. Travel", '```json\n["a"]\n```', "[1, 2]", ""):
        assert json_items(answer) is None  # not a structured answer: read as any other


def scripted(answers):
    asked = []

    async def ask(messages, attempt, schema=None):
        asked.append((attempt, schema))
        return answers[len(asked) - 1]
    return ask, asked


def test_structured_answers_are_never_reformatted():
    stats = ListStats()
    items = asyncio.run(read_list(None, '["a", "b"]', "reformat", 2, stats, structured=True))
    assert items == ["a", "b"] and (stats.reformats, stats.conversion_failures) == (0, 0)
    assert asyncio.run(read_list(None, '["a very long', "reformat", 2, stats, structured=True)) == []
    assert (stats.reformats, stats.conversion_failures) == (0, 1)  # nothing complete: a failure, not a reformat

    # A server that ignored the schema answered prose: the usual path, reformat included.
    ask, asked = scripted(["- alpha\n- beta"])
    stats = ListStats()
    prose = "Good topics are alpha and beta, " * 12
    assert asyncio.run(read_list(ask, prose, "reformat", 2, stats, structured=True)) == ["alpha", "beta"]
    assert stats.reformats == 1 and asked == [("reformat0", None)]


def test_top_up_and_duplicates_with_a_schema():
    schema = list_schema(3)
    ask, asked = scripted(['["a", "b", "B"]', '["c", "a", "d"]', '["e", "f", "g"]'])
    stats = ListStats()
    items = asyncio.run(ask_for_list(ask, "list 3", 3, lambda a: a, attempts=3, reformat_attempts=1, stats=stats,
                                     schema=schema))
    assert items == ["a", "b", "c"]  # "B" repeats "b": one short, topped up by the second answer
    assert asked == [("ask0", schema), ("ask1", schema)] and (stats.reformats, stats.conversion_failures) == (0, 0)


# ------------------------------------------------------------------------------------------ the demo model


@pytest.fixture(scope="module")
def demo_engine():
    engine = AsyncLLM(None, dtype="float32", max_num_seqs=16, kv_cache_gb=0.1)
    yield engine
    engine.shutdown()


def record_lists(monkeypatch) -> list[tuple[int, list[str]]]:
    """(n, items) of every list the run asks for."""
    lists = []
    real = runner.ask_for_list

    async def recording(ask, prompt, n, *args, **kwargs):
        items = await real(ask, prompt, n, *args, **kwargs)
        lists.append((n, items))
        return items
    monkeypatch.setattr(runner, "ask_for_list", recording)
    return lists


class Recording(InProcessChat):
    def __init__(self, engine):
        super().__init__(engine, name="demo")
        self.requests = []

    async def chat(self, messages, sampling, seed):
        answer = await super().chat(messages, sampling, seed)
        self.requests.append((messages[-1]["content"], dict(sampling), answer))
        return answer


def test_in_process_lists_are_json_arrays_of_n_items(demo_engine, tmp_path, monkeypatch):
    lists = record_lists(monkeypatch)
    llm = Recording(demo_engine)
    summary = run_pipeline("open-qa", tmp_path / "qa.jsonl", llm=llm, config=DEMO, rows=3, concurrency=8)
    assert summary.rows_written >= 1
    assert (summary.list_reformats, summary.conversion_failures) == (0, 0)
    assert lists and all(len(items) == n for n, items in lists), lists
    assert all(len({normalize(i) for i in items}) == len(items) for _, items in lists)
    sizes = {"Can you generate 3 comprehensive topics": 3, "Can you generate 2 questions or requests": 2,
             "Can you revise the question below": 1}
    for prompt, sampling, answer in llm.requests:
        structured = sampling.get("structured_outputs")
        n = next((v for k, v in sizes.items() if prompt.startswith(k)), None)
        if n is None:  # an answer to a question: free text
            assert structured is None
            continue
        assert structured == {"json": list_schema(n, 40, 96)}
        assert json_items(answer["text"]) is not None
        if answer["finish_reason"] == "stop":
            assert len(json.loads(answer["text"])) == n


def test_nemolite_server_gets_structured_lists(demo_engine, tmp_path, monkeypatch):
    """Against ``nemolite serve``: detected by /v1/models, and its answers are read without reformats."""
    lists = record_lists(monkeypatch)
    live, server, thread = start_server(demo_engine)

    async def go():
        llm = OpenAIChat(live.url)
        try:
            return llm, await arun_pipeline("open-qa", tmp_path / "qa.jsonl", llm=llm, config=DEMO, rows=2,
                                            concurrency=8)
        finally:
            await llm.aclose()
    try:
        llm, summary = asyncio.run(go())
    finally:
        stop_server(server, thread)
    assert llm.structured_lists and llm.name == "demo"
    assert (summary.list_reformats, summary.conversion_failures, summary.failed_requests) == (0, 0, 0)
    assert lists and all(len(items) == n for n, items in lists), lists


# ------------------------------------------------------------------------------------------ HTTP detection


def fake_server(owned_by: str, models_status: int = 200, served: str = "served"):
    """An httpx transport playing an OpenAI server whose models are ``owned_by``; list requests get a
    JSON array when they carry a schema, prose (which needs a reformat) when they do not."""
    bodies = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            if models_status != 200:
                return httpx.Response(models_status, json={"error": {"message": "no such route"}})
            return httpx.Response(200, json={"object": "list", "data": [{"id": served, "owned_by": owned_by}]})
        body = json.loads(request.content)
        bodies.append(body)
        prompt = body["messages"][-1]["content"]
        words = [f"word{digest(prompt, body['seed'], i) % 1000}" for i in range(6)]
        if "structured_outputs" in body:
            n = body["structured_outputs"]["json"]["minItems"]
            text = json.dumps([f"{w} topic" for w in words[:n]])
        elif "YAML list" in prompt:  # the items of the prose it quotes
            text = "\n".join(f"- {w}" for w in dict.fromkeys(re.findall(r"word\d+", prompt)))
        elif "list" in prompt:
            text = f"Some good ones are {words[0]}, {words[1]} and {words[2]}. " * 10  # one line of prose
        else:
            text = "An answer."
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": text},
                                                      "finish_reason": "stop"}],
                                         "usage": {"prompt_tokens": 3, "completion_tokens": 3}})
    return httpx.MockTransport(handle), bodies


def backend(transport, model=None) -> OpenAIChat:
    chat = OpenAIChat("http://fake:1424", model=model, base_delay=0.01)
    chat.http.client = httpx.AsyncClient(transport=transport)
    return chat


def run_fake(tmp_path, owned_by: str):
    transport, bodies = fake_server(owned_by)

    async def go():
        llm = backend(transport)
        try:
            return llm, await arun_pipeline("open-qa", tmp_path / f"{owned_by}.jsonl", llm=llm, config=TINY,
                                            concurrency=4)
        finally:
            await llm.aclose()
    return (*asyncio.run(go()), bodies)


def test_http_backend_sends_the_schema_only_to_nemolite(tmp_path):
    llm, summary, bodies = run_fake(tmp_path, "nemolite")
    assert llm.structured_lists and summary.rows_written > 0
    sizes = {"comprehensive topics": 2, "questions or requests": 2, "revise the question": 1}
    lists = [b for b in bodies if "list" in b["messages"][-1]["content"]]
    assert lists and len(lists) < len(bodies)
    for body in bodies:
        prompt = body["messages"][-1]["content"]
        if body in lists:
            n = next(v for k, v in sizes.items() if k in prompt)
            assert body["structured_outputs"] == {"json": list_schema(n, 300, 24)}, prompt
            assert body["max_tokens"] == 24 and body["temperature"] == 0.7  # the sampling is kept
        else:
            assert "structured_outputs" not in body
    assert (summary.list_reformats, summary.conversion_failures) == (0, 0)

    llm, summary, bodies = run_fake(tmp_path, "vllm")
    assert not llm.structured_lists and summary.rows_written > 0
    assert not any("structured_outputs" in body for body in bodies)
    assert summary.list_reformats > 0  # the prose lists went through the reformat path, as before


@pytest.mark.parametrize("owned_by, model, status, expected", [
    ("nemolite", None, 200, True), ("nemolite", "served", 200, True), ("nemolite", "other", 200, False),
    ("vllm", "served", 200, False), ("system", None, 200, False), ("nemolite", "served", 404, False)])
def test_detection(owned_by, model, status, expected):
    async def go():
        chat = backend(fake_server(owned_by, status)[0], model)
        try:
            await chat.start()
            return chat.structured_lists, chat.model
        finally:
            await chat.aclose()
    assert asyncio.run(go()) == (expected, model or "served")


def test_without_a_model_name_the_listing_must_answer():
    async def go():
        chat = backend(fake_server("nemolite", 404)[0])
        try:
            await chat.start()
        finally:
            await chat.aclose()
    with pytest.raises(NemoliteError, match="404"):
        asyncio.run(go())
