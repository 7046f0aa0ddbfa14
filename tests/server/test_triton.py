"""Triton's KServe v2 protocol, checked with tritonclient.http, nemolite's NemoQuery, raw bodies and
(when installed) pytriton's ModelClient as NeMo's NemoQueryLLM drives it."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import requests
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from nemolite import NemoQuery, NemoQueryLLM, SamplingParams
from nemolite.kserve import HEADER_LENGTH, encode_bytes
from nemolite.nemo_query import NemoQueryError

from tests.server.conftest import MODEL_NAME

PROMPTS = ["Return the", "“quoted”"]  # the demo model's greedy completion of the second is non-ASCII
MAX_TOKENS = 12


def reference(demo_llm, prompts, max_tokens=MAX_TOKENS, **options) -> list[str]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **options)
    return [output.outputs[0].text for output in demo_llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def expected(demo_llm) -> list[str]:
    texts = reference(demo_llm, PROMPTS)
    assert any(ord(c) > 127 for c in texts[1])
    return texts


@pytest.fixture
def client(live_server):
    with triton_http.InferenceServerClient(f"127.0.0.1:{live_server.port}") as client:
        yield client


def strings(values) -> np.ndarray:
    return np.array([[v.encode()] for v in values], dtype=object)


def tensor(name, datatype, array, binary=True) -> triton_http.InferInput:
    tensor = triton_http.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def texts_of(result) -> list[str]:
    # binary outputs come back as bytes, JSON ones as str
    return [item.decode() if isinstance(item, bytes) else item for item in result.as_numpy("outputs").reshape(-1)]


def test_health_metadata_and_config(live_server, client):
    base = f"{live_server.url}/v2"
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL_NAME)
    assert client.is_model_ready(MODEL_NAME, model_version="1")
    assert not client.is_model_ready("Demo")  # names match exactly
    assert not client.is_model_ready(MODEL_NAME, model_version="2")
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]

    config = client.get_model_config(MODEL_NAME)
    assert config["name"] == MODEL_NAME and config["max_batch_size"] == 128
    assert config["output"][0] == {"name": "outputs", "data_type": "TYPE_STRING", "dims": [-1]}
    inputs = {entry["name"]: entry for entry in config["input"]}
    assert inputs["prompts"]["data_type"] == "TYPE_STRING" and not inputs["prompts"]["optional"]
    assert inputs["max_output_len"]["data_type"] == "TYPE_INT64" and inputs["max_output_len"]["optional"]
    assert inputs["top_p"]["data_type"] == "TYPE_FP32" and inputs["use_greedy"]["data_type"] == "TYPE_BOOL"
    assert all(entry["dims"] for entry in config["input"] + config["output"])
    assert requests.get(f"{base}/models/{MODEL_NAME}/versions/1/config", timeout=10).json() == config

    metadata = client.get_model_metadata(MODEL_NAME)
    assert metadata["name"] == MODEL_NAME and metadata["versions"] == ["1"]
    assert {e["name"]: e["datatype"] for e in metadata["inputs"]}["random_seed"] == "INT64"
    assert metadata["outputs"] == [{"name": "outputs", "datatype": "BYTES", "shape": [-1, -1]}]
    index = requests.post(f"{base}/repository/index", json={}, timeout=10).json()
    assert index == [{"name": MODEL_NAME, "version": "1", "state": "READY"}]

    for path in ("/models/nope/config", "/models/nope", "/models/nope/ready"):
        response = requests.get(base + path, timeout=10)
        assert response.status_code == 404 and "'demo'" in response.json()["error"]
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_config("nope")


@pytest.mark.parametrize("binary_in,binary_out", [(True, True), (False, False), (True, False), (False, True)])
def test_tritonclient_greedy_equals_llm_generate(client, expected, wait_idle, binary_in, binary_out):
    batch = len(PROMPTS)
    inputs = [tensor("prompts", "BYTES", strings(PROMPTS), binary_in),
              tensor("max_output_len", "INT64", np.full((batch, 1), MAX_TOKENS, np.int64), binary_in),
              tensor("top_k", "INT64", np.full((batch, 1), 1, np.int64), binary_in),
              tensor("temperature", "FP32", np.full((batch, 1), 0.1, np.float32), binary_in),
              tensor("output_generation_logits", "BOOL", np.zeros((batch, 1), bool), binary_in)]
    result = client.infer(MODEL_NAME, inputs, request_id="7",
                          outputs=[triton_http.InferRequestedOutput("outputs", binary_data=binary_out)])
    response = result.get_response()
    assert response["model_name"] == MODEL_NAME and response["id"] == "7"
    assert response["outputs"][0]["shape"] == [batch, 1]
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary_out
    assert texts_of(result) == expected
    wait_idle()


def test_defaults_are_greedy_and_64_tokens_and_versioned_path_works(client, demo_llm):
    result = client.infer(MODEL_NAME, [tensor("prompts", "BYTES", strings(PROMPTS[:1]))], model_version="1")
    assert texts_of(result) == reference(demo_llm, PROMPTS[:1], max_tokens=64)


def test_nemo_query_model_card_sample(live_server, expected, wait_idle):
    # The Nemotron-3-8B model card sample with only the import (and the port) changed.
    nq = NemoQuery(url=f"localhost:{live_server.port}", model_name=MODEL_NAME)
    output = nq.query_llm(prompts=PROMPTS, max_output_token=MAX_TOKENS, top_k=1, top_p=0.0, temperature=0.1)
    assert isinstance(output, np.ndarray) and output.shape == (2, 1)
    assert output[:, 0].tolist() == expected

    llm = NemoQueryLLM(url=live_server.url, model_name=MODEL_NAME)
    answer = llm.query_llm(prompts=PROMPTS[1:], max_output_len=MAX_TOKENS, use_greedy=True, add_BOS=None,
                           repetition_penalty=1.0, random_seed=3, init_timeout=5, openai_format_response=True)
    assert answer["object"] == "text_completion" and answer["model"] == MODEL_NAME
    assert answer["choices"][0]["text"].tolist() == [[expected[1]]]
    wait_idle()


def test_end_strings_and_stop_words_are_flat_word_lists(client, live_server, demo_llm, expected, wait_idle):
    # Words from the completions, so both prompts stop early; [n_words, 1] never matches the batch size.
    words = [expected[0].split()[1], expected[1].split()[1], "never-there"]
    inputs = [tensor("prompts", "BYTES", strings(PROMPTS)),
              tensor("max_output_len", "INT64", np.full((2, 1), MAX_TOKENS, np.int64)),
              tensor("end_strings", "BYTES", strings(words[:2])),
              tensor("stop_words_list", "BYTES", strings(words[2:]))]
    texts = texts_of(client.infer(MODEL_NAME, inputs))
    want = reference(demo_llm, PROMPTS, stop=words, include_stop_str_in_output=True)
    assert texts == want and all(t.endswith(w) for t, w in zip(texts, words))
    nq = NemoQuery(live_server.url, MODEL_NAME)
    assert nq.query_llm(PROMPTS, max_output_len=MAX_TOKENS, end_strings=words)[:, 0].tolist() == want
    wait_idle()


def test_dtypes_are_coerced_and_unknown_inputs_ignored(live_server, demo_llm, wait_idle):
    body = {"inputs": [
        {"name": "prompts", "datatype": "BYTES", "shape": [1], "data": [PROMPTS[0]]},
        {"name": "max_output_len", "datatype": "FP32", "shape": [1, 1], "data": [[5.0]]},
        {"name": "random_seed", "datatype": "INT32", "shape": [1, 1], "data": [[7]]},
        {"name": "use_greedy", "datatype": "INT8", "shape": [1, 1], "data": [[1]]},
        {"name": "lora_uids", "datatype": "BYTES", "shape": [1, 1], "data": [[""]]},
        {"name": "something_new", "datatype": "INT64", "shape": [1, 1], "data": [[1]]}]}
    response = requests.post(f"{live_server.url}/v2/models/{MODEL_NAME}/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == reference(demo_llm, PROMPTS[:1], max_tokens=5)
    wait_idle()


def test_seeded_sampling_is_reproducible(live_server):
    nq = NemoQuery(live_server.url, MODEL_NAME)
    knobs = dict(max_output_len=8, top_k=0, top_p=0.9, temperature=1.5, random_seed=11)
    first = nq.query_llm(PROMPTS, **knobs)
    assert (nq.query_llm(PROMPTS, **knobs) == first).all()


def binary_body(inputs: list[tuple[str, str, list[int], bytes]], header_length: int | None = None,
                extra: bytes = b"") -> tuple[bytes, dict]:
    header = {"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(b)}}
                         for n, d, s, b in inputs]}
    json_part = json.dumps(header).encode()
    length = len(json_part) if header_length is None else header_length
    return json_part + b"".join(b for *_, b in inputs) + extra, {HEADER_LENGTH: str(length)}


PROMPT_BYTES = ("prompts", "BYTES", [1, 1], encode_bytes([b"Return the"]))
MAX_LEN = ("max_output_len", "INT64", [1, 1], struct.pack("<q", 4))


@pytest.mark.parametrize("body,headers,message", [
    (*binary_body([PROMPT_BYTES], header_length=10_000), "body has"),
    (*binary_body([PROMPT_BYTES], header_length=5), "not valid JSON"),
    (binary_body([PROMPT_BYTES])[0], {HEADER_LENGTH: "ten"}, "must be an integer"),
    (*binary_body([("prompts", "BYTES", [1, 1], encode_bytes([b"Return the"])[:-3])]), "declares 10 bytes"),
    (*binary_body([("prompts", "BYTES", [2, 1], encode_bytes([b"Return the"]))]), "length prefix"),
    (*binary_body([PROMPT_BYTES], extra=b"\0\0"), "after the JSON header"),
    (*binary_body([PROMPT_BYTES, ("max_output_len", "INT64", [1, 1], b"\4\0\0\0")]), "so 8 bytes"),
    (*binary_body([("prompts", "INT64", [1, 1], struct.pack("<q", 3))]), "'prompts' must be BYTES"),
    (*binary_body([("prompts", "STRING", [1, 1], b"")]), "use one of BYTES"),
    (*binary_body([("prompts", "BYTES", [1, 1], encode_bytes([b"\xff\xfe"]))]), "not valid UTF-8"),
    (*binary_body([MAX_LEN]), "input 'prompts' is required"),
    (*binary_body([PROMPT_BYTES, ("max_output_len", "INT64", [1, 1], struct.pack("<q", 0))]), "must be >= 1"),
    (*binary_body([PROMPT_BYTES, ("top_p", "FP32", [1, 1], struct.pack("<f", 2.0))]), "top_p' must be in"),
    (*binary_body([PROMPT_BYTES, ("top_k", "BYTES", [1, 1], encode_bytes([b"1"]))]), "not BYTES"),
    (*binary_body([PROMPT_BYTES, ("bad_words_list", "BYTES", [1, 1], encode_bytes([b"x"]))]), "bad_words_list"),
    (*binary_body([PROMPT_BYTES, ("output_generation_logits", "BOOL", [1, 1], b"\1")]), "not supported"),
    (*binary_body([("prompts", "BYTES", [129, 1], encode_bytes([b"a"] * 129))]), "send 1 to 128"),
    (b"{not json", {}, "not valid JSON"),
    (b'{"inputs": [{"name": "prompts", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}', {}, "holds 1"),
    (b'{"inputs": [{"name": "prompts", "datatype": "BYTES", "shape": [1]}]}', {}, "neither 'data'"),
    (b'{"inputs": "prompts"}', {}, "must be a list"),
])
def test_malformed_requests_are_400_with_a_message(live_server, client, body, headers, message):
    response = requests.post(f"{live_server.url}/v2/models/{MODEL_NAME}/infer", data=body, headers=headers, timeout=30)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    assert client.is_server_ready()  # still answering


def test_unknown_model_and_errors_reach_the_clients(live_server, client, wait_idle):
    prompts = tensor("prompts", "BYTES", strings(["hi"]))
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as error:
        client.infer("nope", [prompts])
    assert error.value.status() == "404"
    with pytest.raises(InferenceServerException, match="no version '3'"):
        client.infer(MODEL_NAME, [prompts], model_version="3")
    with pytest.raises(NemoQueryError, match="not ready within 0 s .*answered 404: unknown model 'nope'"):
        NemoQuery(live_server.url, "nope").query_llm(["hi"], init_timeout=0)
    with pytest.raises(NemoQueryError, match="Message: bad_words_list is not supported"):
        NemoQuery(live_server.url, MODEL_NAME).query_llm(["hi"], bad_words_list=["x"])
    with pytest.raises(NemoQueryError, match="not ready within 0 s .cannot reach http://127.0.0.1:9"):
        NemoQuery("127.0.0.1:9", MODEL_NAME).query_llm(["hi"], init_timeout=0)
    # After all that the server still generates, and every KV block is free again.
    body, headers = binary_body([PROMPT_BYTES, MAX_LEN])
    response = requests.post(f"{live_server.url}/v2/models/{MODEL_NAME}/infer", data=body, headers=headers, timeout=60)
    assert response.status_code == 200 and response.json()["outputs"][0]["data"][0]
    wait_idle()


def test_pytriton_model_client_as_nemo_query_llm_uses_it(live_server, expected, wait_idle):
    client_module = pytest.importorskip("pytriton.client")
    batch = len(PROMPTS)
    # NemoQueryLLM.query_llm: strings as np.char.encode(...)[..., np.newaxis], logits flags always sent.
    prompts = np.char.encode(np.array(PROMPTS)[:, np.newaxis], "utf-8")
    with client_module.ModelClient(f"127.0.0.1:{live_server.port}", MODEL_NAME, init_timeout_s=60) as client:
        result = client.infer_batch(prompts=prompts, max_output_len=np.full((batch, 1), MAX_TOKENS, np.int_),
                                    top_k=np.full((batch, 1), 1, np.int_), top_p=np.zeros((batch, 1), np.single),
                                    end_strings=np.char.encode(np.array(["never-there"])[:, np.newaxis], "utf-8"),
                                    output_context_logits=np.zeros((batch, 1), np.bool_),
                                    output_generation_logits=np.zeros((batch, 1), np.bool_))
    texts = np.char.decode(result["outputs"].astype("bytes"), "utf-8")
    assert texts.shape == (batch, 1) and texts[:, 0].tolist() == expected
    wait_idle()
