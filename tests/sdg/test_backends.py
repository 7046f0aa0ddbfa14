"""The HTTP backends against a scripted server: which failures are retried, which are not."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from nemolite.errors import NemoliteError
from nemolite.sdg.backends import HttpReward, OpenAIChat, RequestFailed

from tests.server.conftest import free_port

CHAT = {"choices": [{"message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
REWARD = {"object": "reward", "model": "rm", "data": [{"index": 0, "attributes": {"helpfulness": 3.5}, "score": 1.25}],
          "usage": {"prompt_tokens": 9}}


@pytest.fixture(scope="module")
def scripted_server():
    """A server answering each request with the next status of ``script`` (200 when it is empty)."""
    app = FastAPI()
    app.state.script, app.state.bodies = [], []

    async def answer(request: Request, ok: dict):
        app.state.bodies.append(await request.json() if request.method == "POST" else None)
        status = app.state.script.pop(0) if app.state.script else 200
        if status != 200:
            return JSONResponse({"error": {"message": f"scripted {status}"}}, status_code=status)
        return ok

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, CHAT)

    @app.post("/v1/reward")
    async def reward(request: Request):
        return await answer(request, REWARD)

    @app.get("/v1/models")
    async def models(request: Request):
        return await answer(request, {"data": [{"id": "served"}]})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", app.state
    server.should_exit = True
    thread.join(timeout=10)


def chat_once(url: str, **options) -> dict:
    async def go():
        backend = OpenAIChat(url + "/v1", "key", base_delay=0.01, **options)
        try:
            await backend.start()
            return await backend.chat([{"role": "user", "content": "hi"}], {"temperature": 0.5, "max_tokens": 8}, 11)
        finally:
            await backend.aclose()
    return asyncio.run(go())


def test_429_and_5xx_are_retried_then_succeed(scripted_server):
    url, state = scripted_server
    state.bodies.clear()
    state.script[:] = [429, 500, 503]
    answer = chat_once(url)
    assert answer == {"text": "hello", "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 1}
    assert len(state.bodies) == 5  # /v1/models, then 429, 500, 503, 200
    body = state.bodies[-1]
    assert body["model"] == "served" and body["seed"] == 11 and body["temperature"] == 0.5 and body["max_tokens"] == 8


def test_400_fails_at_once_with_the_servers_message(scripted_server):
    url, state = scripted_server
    state.bodies.clear()
    state.script[:] = [200, 400]  # /v1/models (read for owned_by, even with a named model), then the chat
    with pytest.raises(RequestFailed, match="scripted 400") as error:
        chat_once(url, model="named")
    assert error.value.status == 400 and len(state.bodies) == 2


def test_retries_are_bounded(scripted_server):
    url, state = scripted_server
    for script in ([500] * 3, [200] + [500] * 3):  # /v1/models (read even with a named model), then the chat
        state.script[:] = script
        with pytest.raises(NemoliteError, match="failed 3 times, last with HTTP 500: scripted 500"):
            chat_once(url, model="named", attempts=3)
        assert not state.script


def test_connection_errors_are_retried_then_reported():
    port = free_port()  # nothing listens there
    with pytest.raises(NemoliteError, match="failed 2 times, last with ConnectError"):
        chat_once(f"http://127.0.0.1:{port}", model="m", attempts=2)


def test_reward_request_and_answer(scripted_server):
    url, state = scripted_server
    state.bodies.clear()
    state.script[:] = [502]

    async def go():
        backend = HttpReward(url, weights={"helpfulness": 1.0}, base_delay=0.01)
        try:
            return await backend.score([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]), \
                backend.retries
        finally:
            await backend.aclose()
    result, retries = asyncio.run(go())
    assert result == {"attributes": {"helpfulness": 3.5}, "score": 1.25} and retries == 1
    assert state.bodies[-1] == {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                "attribute_weights": {"helpfulness": 1.0}}


def test_reward_backends_agree_with_the_reward_model(reward_model_dir, tmp_path):
    """The in-process door (score_conversation) and POST /v1/reward of a served reward model give the
    same scores, and a preference run can use either."""
    from nemolite.engine.async_llm import AsyncLLM
    from nemolite.sdg import InProcessReward, run_pipeline

    from tests.sdg.conftest import TINY, ScriptedChat, read_rows
    from tests.server.conftest import start_server, stop_server

    engine = AsyncLLM(reward_model_dir, dtype="float32", kv_cache_gb=0.01, max_num_seqs=8)
    live, server, thread = start_server(engine)
    conversation = [{"role": "user", "content": "the model returns a value"},
                    {"role": "assistant", "content": "when the list is empty"}]
    try:
        async def both():
            http = HttpReward(live.url, weights={"helpfulness": 1.0})
            try:
                return await InProcessReward(engine, {"helpfulness": 1.0}).score(conversation), \
                    await http.score(conversation)
            finally:
                await http.aclose()
        local, remote = asyncio.run(both())
        assert local["attributes"].keys() == remote["attributes"].keys() and len(local["attributes"]) == 9
        assert remote["score"] == pytest.approx(local["score"], abs=1e-4)
        assert local["score"] == pytest.approx(local["attributes"]["helpfulness"])

        out = tmp_path / "pairs.jsonl"
        run_pipeline("preference", out, llm=ScriptedChat(), reward_endpoint=live.url, config=TINY)
        rows = read_rows(out)
        assert rows and all(len(row["samples"]) == 2 and row["decided_by"] for row in rows)
    finally:
        stop_server(server, thread)
        engine.shutdown()


def test_config_reward_model_scores_in_process(reward_model_dir, tmp_path):
    from nemolite.sdg import run_pipeline

    from tests.sdg.conftest import TINY, ScriptedChat, read_rows

    out = tmp_path / "qa.jsonl"
    summary = run_pipeline("open-qa", out, llm=ScriptedChat(), rows=2,
                           config={**TINY, "reward_model": str(reward_model_dir), "filter": {"score": ">= -100"}})
    rows = read_rows(out)
    assert len(rows) == 2 and all(len(row["reward"]["attributes"]) == 9 and row["kept"] for row in rows)
    assert summary.reward_calls >= 2 and summary.reward.startswith("scored by")
