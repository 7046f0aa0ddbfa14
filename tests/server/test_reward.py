"""A reward model served three ways (NeMo-Aligner reward_server.py, the hosted
nemotron-4-340b-reward API): nemolite's POST /v1/reward, the hosted
Nemotron-4-340B-Reward chat-completions answer (read as NeMo-Curator reads it, with the openai
client) and NeMo-Aligner's Triton ``reward_model`` (with tritonclient); all equal the offline model."""

from __future__ import annotations

import asyncio

import numpy as np
import openai
import pytest
import requests
import tritonclient.http as triton_http

from nemolite.engine.async_llm import AsyncLLM
from nemolite.engine.llm import LLM
from nemolite.reward import ATTRIBUTES, DEFAULT_WEIGHTS, HELPSTEER2_ATTRIBUTES, reward_prompt, score_conversation

from tests.conftest import DEVICE
from tests.server.conftest import MODEL_NAME, start_server, stop_server, wait_until_idle
from tests.test_reward import conversations

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def offline(reward_model_dir) -> LLM:
    return LLM(reward_model_dir, dtype="float32", device=DEVICE, kv_cache_gb=0.01)


@pytest.fixture(scope="module")
def reward_server(reward_model_dir):
    engine = AsyncLLM(reward_model_dir, dtype="float32", device=DEVICE, kv_cache_gb=0.01, max_num_seqs=16)
    live, server, thread = start_server(engine)
    yield live
    stop_server(server, thread)
    engine.shutdown()


def close(got: dict, expected: dict) -> bool:
    return got.keys() == expected.keys() and all(abs(got[k] - expected[k]) <= TOLERANCE for k in expected)


def test_v1_reward_single_and_batched_equal_offline(reward_server, offline):
    batch = conversations(5)
    expected = offline.reward(batch, use_tqdm=False)
    one = requests.post(f"{reward_server.url}/v1/reward", json={"model": MODEL_NAME, "messages": batch[0]}).json()
    assert one["object"] == "reward" and one["model"] == MODEL_NAME and len(one["data"]) == 1
    assert close(one["data"][0]["attributes"], expected[0]["attributes"])
    assert list(one["data"][0]["attributes"]) == list(ATTRIBUTES)
    ids = offline.tokenizer.encode(reward_prompt(batch[0]), add_bos=False)
    assert one["usage"]["prompt_tokens"] == len(ids)
    many = requests.post(f"{reward_server.url}/v1/reward", json={"conversations": batch}).json()
    assert [item["index"] for item in many["data"]] == list(range(5))
    for item, reference in zip(many["data"], expected):
        assert close(item["attributes"], reference["attributes"])
        values = [item["attributes"][name] for name in ATTRIBUTES]
        assert item["score"] == pytest.approx(sum(v * w for v, w in zip(values, DEFAULT_WEIGHTS)), abs=TOLERANCE)


def test_v1_reward_weights_from_the_request_or_the_server(reward_server, reward_model_dir):
    body = {"messages": conversations(1)[0], "attribute_weights": {"correctness": 2.0}}
    item = requests.post(f"{reward_server.url}/v1/reward", json=body).json()["data"][0]
    assert item["score"] == pytest.approx(2.0 * item["attributes"]["correctness"], abs=1e-6)
    engine = AsyncLLM(reward_model_dir, dtype="float32", device=DEVICE, kv_cache_gb=0.01)
    live, server, thread = start_server(engine, reward_weights=[0, 0, 0, 0, 1, 0, 0, 0, -1])
    try:
        item = requests.post(f"{live.url}/v1/reward", json={"messages": body["messages"]}).json()["data"][0]
        attributes = item["attributes"]
        assert item["score"] == pytest.approx(attributes["helpfulness"] - attributes["verbosity"], abs=1e-6)
    finally:
        stop_server(server, thread)
        engine.shutdown()


def test_chat_completions_answer_as_the_hosted_reward_api(reward_server, offline):
    """NeMo-Curator's OpenAIClient.query_reward_model: ``{t.token: t.logprob for t in logprobs.content}``."""
    client = openai.OpenAI(base_url=f"{reward_server.url}/v1", api_key="unused", max_retries=0)
    conversation = conversations(3)[2]
    response = client.chat.completions.create(model=MODEL_NAME, messages=conversation)
    scores = {token.token: token.logprob for token in response.choices[0].logprobs.content}
    assert list(scores) == list(HELPSTEER2_ATTRIBUTES)
    expected = offline.reward(conversation, use_tqdm=False)[0]["attributes"]
    assert close(scores, {name: expected[name] for name in HELPSTEER2_ATTRIBUTES})
    assert response.choices[0].message.content == ",".join(f"{n}:{expected[n]:.2f}" for n in HELPSTEER2_ATTRIBUTES)
    with pytest.raises(openai.BadRequestError, match="stream: false"):
        client.chat.completions.create(model=MODEL_NAME, messages=conversation, stream=True)


@pytest.mark.parametrize("binary", [True, False])
def test_triton_reward_model_as_nemo_aligner_serves_it(reward_server, offline, binary):
    batch = conversations(4)
    expected = np.array([list(r["attributes"].values()) for r in offline.reward(batch, use_tqdm=False)])
    sentences = np.array([reward_prompt(c) for c in batch])
    encoded = np.char.encode(sentences[..., None], "utf-8").astype(object)  # NeMo-Aligner's client does this
    with triton_http.InferenceServerClient(f"127.0.0.1:{reward_server.port}") as client:
        assert client.is_model_ready("reward_model")
        config = client.get_model_config("reward_model")
        assert [i["name"] for i in config["input"]] == ["sentences", "tokens", "sequence_lengths"]
        assert config["output"] == [{"name": "rewards", "data_type": "TYPE_FP32", "dims": [-1]}]
        text_input = triton_http.InferInput("sentences", list(encoded.shape), "BYTES")
        text_input.set_data_from_numpy(encoded, binary_data=binary)
        rewards = client.infer("reward_model", [text_input], outputs=[
            triton_http.InferRequestedOutput("rewards", binary_data=binary)]).as_numpy("rewards")
        assert rewards.dtype == np.float32 and rewards.shape == (4, len(ATTRIBUTES))
        np.testing.assert_allclose(rewards, expected, atol=TOLERANCE)

        ids = [offline.tokenizer.encode(s, add_bos=False) for s in sentences]
        tokens = np.zeros((len(ids), max(map(len, ids)) + 3), dtype=np.int64)  # right-padded
        for row, sequence in enumerate(ids):
            tokens[row, :len(sequence)] = sequence
        inputs = [triton_http.InferInput("tokens", list(tokens.shape), "INT64"),
                  triton_http.InferInput("sequence_lengths", [len(ids)], "INT64")]
        inputs[0].set_data_from_numpy(tokens, binary_data=binary)
        inputs[1].set_data_from_numpy(np.array([len(s) for s in ids], dtype=np.int64), binary_data=binary)
        np.testing.assert_allclose(client.infer("reward_model", inputs).as_numpy("rewards"), expected,
                                   atol=TOLERANCE)


def test_concurrent_reward_requests_are_batched_and_exact(reward_server, offline):
    """Sixteen clients at once, each reward equal to its offline value; the engine ends idle."""
    batch = conversations(16)
    expected = offline.reward(batch, use_tqdm=False)

    async def run() -> list[dict]:
        loop = asyncio.get_running_loop()
        calls = [loop.run_in_executor(None, lambda c=c: requests.post(
            f"{reward_server.url}/v1/reward", json={"messages": c}).json()) for c in batch]
        return await asyncio.gather(*calls)

    results = asyncio.run(run())
    for result, reference in zip(results, expected):
        assert close(result["data"][0]["attributes"], reference["attributes"])
    wait_until_idle(reward_server.engine)


def test_score_conversation_in_process(reward_server, offline):
    conversation = conversations(2)[1]
    result = asyncio.run(score_conversation(reward_server.engine, conversation, weights={"coherence": 1.0}))
    expected = offline.reward(conversation, use_tqdm=False)[0]["attributes"]
    assert close(result["attributes"], expected)
    assert result["score"] == pytest.approx(expected["coherence"], abs=TOLERANCE)


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/reward", {"messages": [{"role": "user", "content": "hi"}]}, 400, "last message must have role 'assistant'"),
    ("/v1/reward", {}, 400, "give 'messages'"),
    ("/v1/reward", {"messages": [{"role": "assistant", "content": "a"}], "conversations": [[]]}, 400, "not both"),
    ("/v1/reward", {"messages": [{"role": "assistant", "content": "a"}], "attribute_weights": [1]}, 400,
     "give 9 attribute weights"),
    ("/v1/reward", {"model": "other", "messages": [{"role": "assistant", "content": "a"}]}, 404, "does not exist"),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 4}, 400, "this is a reward model"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "a"}], "n": 2}, 400, "n: 1"),
])
def test_reward_server_refuses_what_it_cannot_do(reward_server, path, body, status, message):
    response = requests.post(f"{reward_server.url}{path}", json=body)
    assert response.status_code == status
    assert message in response.json()["error"]["message"]


def test_reward_server_refuses_generation_over_nemo_and_triton(reward_server):
    response = requests.put(f"{reward_server.url}/generate", json={"sentences": ["hello"], "tokens_to_generate": 4})
    assert response.status_code == 400 and "this is a reward model" in response.json()["error"]
    response = requests.post(f"{reward_server.url}/v2/models/{MODEL_NAME}/infer", json={"inputs": []})
    assert response.status_code == 404 and "reward_model" in response.json()["error"]


def test_language_model_server_has_no_reward(live_server):
    response = requests.post(f"{live_server.url}/v1/reward",
                             json={"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    assert response.status_code == 400 and "not a reward model" in response.json()["error"]["message"]
