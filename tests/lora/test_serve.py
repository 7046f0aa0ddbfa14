"""Adapters over every protocol of ``nemolite serve``: the request's model name (OpenAI) or adapter_id
(NeMo, Triton) picks one; /v1/models lists them; runtime loading only when allowed."""

from __future__ import annotations

import json

import pytest
import requests

from nemolite import LLM, LoRARequest, NemoliteError, SamplingParams
from nemolite.cli import lora_modules
from nemolite.engine.async_llm import AsyncLLM
from tests.conftest import DEVICE
from tests.server.conftest import MODEL_NAME, start_server, stop_server

PROMPT = "the model returns a value when"


@pytest.fixture(scope="module")
def lora_server(lora_base, peft_adapters):
    engine = AsyncLLM(lora_base, dtype="float32", device=DEVICE, enable_lora=True, max_loras=2, max_lora_rank=8,
                      kv_cache_gb=0.05)
    live, server, thread = start_server(engine, lora_modules={"qv": str(peft_adapters["qv"]),
                                                              "all": str(peft_adapters["all-rslora"])},
                                        allow_runtime_lora=True)
    yield live
    stop_server(server, thread)
    engine.shutdown()


@pytest.fixture(scope="module")
def offline(lora_base, peft_adapters):
    llm = LLM(lora_base, dtype="float32", device=DEVICE, enable_lora=True, max_lora_rank=8)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    answers = {}
    for name, key, lora_id in (("qv", "qv", 1), ("all", "all-rslora", 2), ("layers", "layers", 3), (None, None, 0)):
        lora = LoRARequest(name, lora_id, str(peft_adapters[key])) if name else None
        answers[name] = llm.generate([PROMPT], params, lora_request=lora, use_tqdm=False)[0].outputs[0].text
    assert len(set(answers.values())) == 4  # each adapter answers differently
    return answers


def test_openai_client_picks_the_adapter_by_model_name(lora_server, offline):
    import openai

    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="none")
    for model, expected in (("qv", offline["qv"]), ("all", offline["all"]), (MODEL_NAME, offline[None])):
        answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert answer.choices[0].text == expected and answer.model == model
    chunks = list(client.completions.create(model="qv", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == offline["qv"]
    assert all(c.model == "qv" for c in chunks)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {MODEL_NAME, "qv", "all"}
    assert models["qv"].parent == MODEL_NAME and models[MODEL_NAME].parent is None
    with pytest.raises(openai.NotFoundError, match="'qv'"):  # the message lists what is served
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)


def test_nemo_and_triton_take_adapter_id(lora_server, offline):
    body = {"sentences": [PROMPT], "tokens_to_generate": 8, "greedy": True, "end_strings": [], "add_BOS": True,
            "adapter_id": "all"}
    answer = requests.put(lora_server.url + "/generate", json=body, timeout=60).json()
    assert answer["sentences"][0].endswith(offline["all"])
    assert requests.put(lora_server.url + "/generate", json={**body, "adapter_id": "nope"}, timeout=60).status_code == 404
    assert requests.put(lora_server.url + "/generate", json={**body, "adapter_id": 5}, timeout=60).status_code == 400
    infer = {"inputs": [{"name": "prompts", "datatype": "BYTES", "shape": [1, 1], "data": [PROMPT]},
                        {"name": "max_output_len", "datatype": "INT64", "shape": [1, 1], "data": [8]},
                        {"name": "use_greedy", "datatype": "BOOL", "shape": [1, 1], "data": [True]},
                        {"name": "adapter_id", "datatype": "BYTES", "shape": [1, 1], "data": ["qv"]}]}
    response = requests.post(f"{lora_server.url}/v2/models/{MODEL_NAME}/infer", json=infer, timeout=60).json()
    assert response["outputs"][0]["data"][0] == offline["qv"]
    metrics = requests.get(lora_server.url + "/metrics", timeout=10).text
    assert 'nemolite_lora_requests_total{adapter="qv"}' in metrics and "nemolite_lora_loads_total" in metrics


def test_runtime_load_and_unload(lora_server, peft_adapters, offline):
    url = lora_server.url
    assert requests.post(url + "/v1/load_lora_adapter", json={"lora_name": "qv", "lora_path": "x"},
                         timeout=60).status_code == 400  # the name is taken
    bad = requests.post(url + "/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": "/nonexistent"},
                        timeout=60)
    assert bad.status_code == 400 and "does not exist" in bad.text
    loaded = requests.post(url + "/v1/load_lora_adapter", timeout=60,
                           json={"lora_name": "layers", "lora_path": str(peft_adapters["layers"])})
    assert loaded.status_code == 200
    body = {"model": "layers", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    assert requests.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"] == offline["layers"]
    assert requests.post(url + "/v1/unload_lora_adapter", json={"lora_name": "layers"}, timeout=60).status_code == 200
    assert requests.post(url + "/v1/completions", json=body, timeout=60).status_code == 404
    assert requests.post(url + "/v1/unload_lora_adapter", json={"lora_name": "layers"}, timeout=60).status_code == 404


def test_runtime_loading_is_off_unless_allowed(lora_base, peft_adapters):
    plain = AsyncLLM(lora_base, dtype="float32", device=DEVICE, kv_cache_gb=0.02)
    with pytest.raises(NemoliteError, match="need --enable-lora"):
        start_server(plain, lora_modules={"qv": str(peft_adapters["qv"])})
    engine = AsyncLLM(lora_base, dtype="float32", device=DEVICE, enable_lora=True, max_lora_rank=8, kv_cache_gb=0.02)
    live, server, thread = start_server(engine)
    try:
        response = requests.post(live.url + "/v1/load_lora_adapter", timeout=30,
                                 json={"lora_name": "a", "lora_path": str(peft_adapters["qv"])})
        assert response.status_code == 403 and "--allow-runtime-lora" in response.text
        assert requests.post(live.url + "/v1/completions", json={"model": "a", "prompt": PROMPT}, timeout=30
                             ).status_code == 404
    finally:
        stop_server(server, thread)
        engine.shutdown()
        plain.shutdown()


def test_lora_modules_spellings(tmp_path):
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    spec = json.dumps({"name": "j", "path": "/p", "base_model_name": "b"})
    assert lora_modules(["a=/x", spec], str(tmp_path)) == {"a": "/x", "j": "/p", "first": str(tmp_path / "first"),
                                                           "second": str(tmp_path / "second")}
    for bad in (["noequals"], ["=path"], ["{not json"], ['{"name": 1}'], ["a=/x", "a=/y"]):
        with pytest.raises(NemoliteError):
            lora_modules(bad, None)
    with pytest.raises(NemoliteError, match="not a directory"):
        lora_modules([], str(tmp_path / "missing"))


def test_reward_model_scores_with_the_adapter_named(reward_model_dir, tmp_path):
    from tests.lora.conftest import write_peft_adapter

    adapter = write_peft_adapter(reward_model_dir, tmp_path / "adapter", r=4, lora_alpha=8,
                                 target_modules=["q_proj", "v_proj", "down_proj"])
    conversation = [{"role": "user", "content": "the model returns"}, {"role": "assistant", "content": "a value"}]
    offline = LLM(reward_model_dir, dtype="float32", device=DEVICE, enable_lora=True, max_lora_rank=4)
    expected = offline.reward([conversation], lora_request=LoRARequest("a", 1, str(adapter)), use_tqdm=False)[0]
    engine = AsyncLLM(reward_model_dir, dtype="float32", device=DEVICE, enable_lora=True, max_lora_rank=4,
                      kv_cache_gb=0.02)
    live, server, thread = start_server(engine, lora_modules={"a": str(adapter)})
    try:
        answer = requests.post(live.url + "/v1/reward", json={"model": "a", "messages": conversation}, timeout=60)
        data = answer.json()
        assert answer.status_code == 200 and data["model"] == "a"
        got = data["data"][0]["attributes"]
        assert max(abs(got[k] - expected["attributes"][k]) for k in got) <= 1e-4
        base = requests.post(live.url + "/v1/reward", json={"messages": conversation}, timeout=60).json()
        assert base["data"][0]["attributes"] != got
    finally:
        stop_server(server, thread)
        engine.shutdown()


def test_playground_adapter_picker(browser, lora_server):
    """The playground lists the served adapters and sends the one picked: as the chat's model name, and as
    NeMo's adapter_id in the completion request it shows."""
    from tests.browser import open_page

    with open_page(browser, lora_server.url + "/") as page:
        picker = page.get_by_role("combobox", name="Adapter")
        picker.wait_for(timeout=10_000)
        assert [o.strip() for o in picker.locator("option").all_inner_texts()] == ["base model", "qv", "all"]
        picker.select_option("qv")
        page.get_by_role("spinbutton", name="Max tokens").fill("8")
        page.get_by_role("spinbutton", name="Temperature").fill("0")
        page.get_by_role("textbox", name="Prompt").fill(PROMPT)
        page.get_by_role("button", name="Send").click()
        answer = page.locator("#log .entry.assistant")
        answer.locator(".meta").filter(has_text="tokens").wait_for(timeout=60_000)
        expected = requests.post(lora_server.url + "/v1/chat/completions", timeout=60, json={
            "model": "qv", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8,
            "temperature": 0}).json()["choices"][0]["message"]["content"]
        base = requests.post(lora_server.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8,
            "temperature": 0}).json()["choices"][0]["message"]["content"]
        assert answer.locator(".body").inner_text() == expected != base
        assert answer.locator(".who").inner_text().lower() == "qv"
        page.get_by_role("tab", name="Completion").click()
        assert '"adapter_id":"qv"' in page.locator("#curl").inner_text()
