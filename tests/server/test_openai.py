"""The OpenAI protocol, checked with the `openai` package and raw HTTP against the in-process engine."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from nemolite import SamplingParams

from tests.server.conftest import MODEL_NAME, start_server, stop_server

PROMPT = "Return the"


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)


def greedy(demo_llm, prompt, max_tokens: int, **options):
    return demo_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, **options),
                             use_tqdm=False)[0]


def test_models(client, live_server):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_completion_greedy_equals_llm_generate(client, demo_llm):
    result = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=20, temperature=0)
    reference = greedy(demo_llm, PROMPT, 20)
    assert result.choices[0].text == reference.outputs[0].text
    assert result.choices[0].finish_reason == reference.outputs[0].finish_reason
    assert result.usage.prompt_tokens == len(reference.prompt_token_ids)
    assert result.usage.completion_tokens == len(reference.outputs[0].token_ids)


def test_prompt_forms_and_choice_indices(client, demo_llm):
    prompts = ["Return the", "The default"]
    ids = [demo_llm.tokenizer.encode(p) for p in prompts]
    by_text = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=8, temperature=0)
    single_ids = client.completions.create(model=MODEL_NAME, prompt=ids[1], max_tokens=8, temperature=0)
    assert [c.index for c in by_text.choices] == [0, 1]
    assert [c.text for c in by_text.choices] == [c.text for c in by_ids.choices]
    assert single_ids.choices[0].text == by_text.choices[1].text


def test_n_and_seed(client):
    first = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, n=3, seed=7, temperature=1.0)
    second = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, n=3, seed=7, temperature=1.0)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1


def test_stop_string_is_removed(client, demo_llm):
    free = greedy(demo_llm, PROMPT, 24).outputs[0].text
    stop = free.split()[1]
    result = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert result.choices[0].text == free[:free.index(stop)]
    assert result.choices[0].finish_reason == "stop"


def test_echo_logprobs_equal_the_engine_prompt_logprobs(client, demo_llm):
    result = client.completions.create(model=MODEL_NAME, prompt=PROMPT + " value of the", max_tokens=3,
                                       temperature=0, echo=True, logprobs=2)
    reference = greedy(demo_llm, PROMPT + " value of the", 3, logprobs=2, prompt_logprobs=2)
    logprobs = result.choices[0].logprobs
    prompt_ids, generated = reference.prompt_token_ids, reference.outputs[0]
    assert len(logprobs.tokens) == len(prompt_ids) + len(generated.token_ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = [entry[t].logprob for entry, t in zip(reference.prompt_logprobs[1:], prompt_ids[1:])]
    expected += [entry[t].logprob for entry, t in zip(generated.logprobs, generated.token_ids)]
    assert logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert "".join(logprobs.tokens) == result.choices[0].text.lstrip() or \
        "".join(logprobs.tokens) == result.choices[0].text
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    for value, top in zip(logprobs.token_logprobs[1:], logprobs.top_logprobs[1:]):
        assert 2 <= len(top) <= 3 and max(top.values()) >= value - 1e-6


def lm_eval_payload(context: list[int], continuation: list[int], **overrides) -> dict:
    return {"model": MODEL_NAME, "prompt": [context + continuation], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True, **overrides}


@pytest.mark.parametrize("old_payload", [False, True], ids=["max_tokens=1", "max_tokens=0"])
def test_lm_eval_loglikelihood_contract(live_server, demo_llm, old_payload):
    tokenizer = demo_llm.tokenizer
    context, continuation = tokenizer.encode("Return the"), tokenizer.encode(" value of", add_bos=False)
    payload = lm_eval_payload(context, continuation, **({"max_tokens": 0, "logprobs": 10} if old_payload else {}))
    choice = requests.post(f"{live_server.url}/v1/completions", json=payload, timeout=30).json()["choices"][0]
    token_logprobs, top = choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"]
    total = len(context) + len(continuation)
    assert len(token_logprobs) == total + (0 if old_payload else 1)
    reference = demo_llm.generate(prompt_token_ids=[context + continuation], sampling_params=SamplingParams(
        max_tokens=0, prompt_logprobs=0), use_tqdm=False)[0]
    expected = sum(reference.prompt_logprobs[p][(context + continuation)[p]].logprob for p in range(len(context), total))
    # What lm-eval computes: the continuation's slice (without the generated position).
    assert sum(token_logprobs[len(context):total]) == pytest.approx(expected, abs=1e-4)
    # lm-eval's is_greedy: each continuation token is the argmax of its top_logprobs.
    greedy_flags = [token_logprobs[j] == max(top[j].values()) for j in range(len(context), total)]
    ranks = [reference.prompt_logprobs[p][(context + continuation)[p]].rank for p in range(len(context), total)]
    assert greedy_flags == [rank == 1 for rank in ranks]


def test_completion_stream_equals_non_stream(client):
    whole = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_stream_ends_with_done(live_server):
    with requests.post(f"{live_server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "stream": True},
                       stream=True, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[len("data: "):])["object"] == "text_completion" for e in events[:-1])


def test_chat_greedy_equals_llm_chat(client, demo_llm):
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "What does len return?"}]
    result = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=32, temperature=0)
    reference = demo_llm.chat(messages, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    assert result.choices[0].message.content == reference.text
    assert result.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=32, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reference.text


def test_chat_logprobs(client):
    result = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = result.choices[0].logprobs.content
    assert content and all(len(item.top_logprobs) == 3 for item in content)
    for item in content:  # greedy: the chosen token is the most likely one
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)


def test_tokenize_detokenize_and_tokenizer_info(live_server, demo_llm):
    tokens = requests.post(f"{live_server.url}/tokenize", json={"prompt": PROMPT, "add_special_tokens": False},
                           timeout=10).json()["tokens"]
    assert tokens == demo_llm.tokenizer.encode(PROMPT, add_bos=False)
    assert requests.post(f"{live_server.url}/detokenize", json={"tokens": tokens}, timeout=10).json()["prompt"] == PROMPT
    info = requests.get(f"{live_server.url}/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "</s>"


@pytest.mark.parametrize("options, status, message", [
    ({"prompt": "a" * 20000}, 400, "context length"),
    ({"prompt": PROMPT, "max_tokens": 5000}, 400, "maximum context length"),
    ({"prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ({"prompt": PROMPT, "n": 0}, 400, "n"),
    ({"prompt": PROMPT, "logprobs": 100}, 400, "logprobs"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[99999]]}, 400, "token ids"),
    ({"prompt": PROMPT, "model": "gpt-4"}, 404, "does not exist"),
])
def test_bad_completion_requests(live_server, options, status, message):
    response = requests.post(f"{live_server.url}/v1/completions", json={"model": MODEL_NAME, **options}, timeout=10)
    assert response.status_code == status
    assert message in response.json()["error"]["message"]


def test_openai_client_sees_bad_request_errors(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=100000)


def test_client_leaving_a_stream_aborts_its_request(live_server, wait_idle):
    generated_before = live_server.engine.stats()["generation_tokens"]
    with requests.post(f"{live_server.url}/v1/completions", stream=True, timeout=30,
                       json={"prompt": PROMPT, "max_tokens": 900, "ignore_eos": True, "stream": True}) as response:
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("data:"):
                break
    stats = wait_idle()
    assert stats["num_running"] == 0
    assert stats["generation_tokens"] - generated_before < 500  # stopped long before its 900 tokens


def test_queue_full_is_503(live_server, monkeypatch):
    monkeypatch.setattr(live_server.state, "capacity", 0)
    response = requests.post(f"{live_server.url}/v1/completions", json={"prompt": PROMPT}, timeout=10)
    assert response.status_code == 503 and "busy" in response.json()["error"]["message"]


def test_api_key(demo_engine):
    live, server, thread = start_server(demo_engine, api_key="sekret")
    try:
        assert requests.get(f"{live.url}/health", timeout=10).status_code == 200
        assert requests.get(f"{live.url}/v1/models", timeout=10).status_code == 401
        assert requests.get(f"{live.url}/v1/models", headers={"Authorization": "Bearer wrong"},
                            timeout=10).status_code == 401
        authorised = openai.OpenAI(base_url=f"{live.url}/v1", api_key="sekret", max_retries=0)
        assert authorised.models.list().data[0].id == MODEL_NAME
    finally:
        stop_server(server, thread)


def test_metrics_count_requests_and_tokens(live_server):
    def scrape() -> dict[str, float]:
        values = {}
        for line in requests.get(f"{live_server.url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    before = scrape()
    result = requests.post(f"{live_server.url}/v1/completions",
                           json={"prompt": PROMPT, "max_tokens": 7, "ignore_eos": True, "temperature": 0}, timeout=30)
    after = scrape()
    key = 'nemolite_requests_total{protocol="openai",status="200"}'
    assert after[key] == before.get(key, 0) + 1
    assert after["nemolite_generation_tokens_total"] - before["nemolite_generation_tokens_total"] == 7
    assert after["nemolite_prompt_tokens_total"] - before["nemolite_prompt_tokens_total"] == \
        result.json()["usage"]["prompt_tokens"]
    assert after['nemolite_kv_cache_blocks_free{model_name="demo"}'] >= 0


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 900, "ignore_eos": True}),
    # min_tokens_to_generate: NeMo's API has no ignore_eos, and a sampled answer may end at once.
    ("/generate", {"sentences": [PROMPT, PROMPT], "tokens_to_generate": 900, "min_tokens_to_generate": 900,
                   "end_strings": []}),
])
def test_client_leaving_a_plain_request_aborts_it(live_server, wait_idle, route, body):
    generated_before = live_server.engine.stats()["generation_tokens"]
    method = requests.put if route == "/generate" else requests.post
    with pytest.raises(requests.exceptions.Timeout):
        method(f"{live_server.url}{route}", json=body, timeout=0.3)
    stats = wait_idle()
    assert stats["generation_tokens"] - generated_before < 500


def test_streaming_several_prompts_and_choices(client):
    prompts = ["Return the", "The default"]
    whole = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=10, n=2, seed=3, temperature=0.8)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=10, n=2, seed=3,
                                            temperature=0.8, stream=True))
    texts, finished = {}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                assert choice.index not in finished
                finished[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert sorted(finished) == [0, 1, 2, 3]


def test_streamed_logprobs_equal_the_whole_response(client):
    whole = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                                            logprobs=2, stream=True))
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for key in streamed:
            streamed[key] += getattr(chunk.choices[0].logprobs, key)
    expected = whole.choices[0].logprobs
    assert streamed["tokens"] == expected.tokens and streamed["text_offset"] == expected.text_offset
    assert streamed["token_logprobs"] == expected.token_logprobs
    assert streamed["top_logprobs"] == expected.top_logprobs
    messages = [{"role": "user", "content": "Hi"}]
    whole_chat = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0,
                                                logprobs=True, top_logprobs=2)
    streamed_chat = [item for chunk in client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, stream=True)
        if chunk.choices and chunk.choices[0].logprobs for item in chunk.choices[0].logprobs.content]
    assert [(i.token, i.logprob) for i in streamed_chat] == \
        [(i.token, i.logprob) for i in whole_chat.choices[0].logprobs.content]
