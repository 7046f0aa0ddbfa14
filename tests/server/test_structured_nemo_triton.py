"""Structured output through NeMo's PUT /generate and the Triton model: a JSON schema, a regex, a choice or
a grammar constrains every completion, and a bad one is a 400 that names the problem."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
import requests
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from nemolite import NemoQuery
from nemolite.nemo_query import NemoQueryError

from tests.server.conftest import MODEL_NAME
from tests.server.test_triton import client, strings, tensor  # noqa: F401 - client is a fixture

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "kind": {"enum": ["cat", "dog", "fish"]},
                         "age": {"type": "integer", "minimum": 0, "maximum": 30}},
          "required": ["name", "kind", "age"], "additionalProperties": False}
PROMPTS = ["Return the", "The default value of", "Describe a pet:"]
CHOICES = ["red", "green", "blue whale"]
REGEX = r"[0-9]{3}-[a-z]{2,4}"
# Sampled, not greedy: every path the mask lets through must still be valid.
SAMPLED = {"temperature": 0.8, "top_k": 0, "top_p": 1.0, "random_seed": 7, "end_strings": []}


def put(live_server, payload: dict) -> requests.Response:
    return requests.put(f"{live_server.url}/generate", json=payload, timeout=120)


def completions(live_server, payload: dict) -> list[str]:
    response = put(live_server, {"sentences": PROMPTS, **payload})
    assert response.status_code == 200, response.text
    sentences = response.json()["sentences"]
    assert len(sentences) == len(PROMPTS) and all(s.startswith(p) for s, p in zip(sentences, PROMPTS))
    return [sentence[len(prompt):] for sentence, prompt in zip(sentences, PROMPTS)]


def assert_still_serves(live_server, wait_idle) -> None:
    response = put(live_server, {"sentences": ["Return the"], "tokens_to_generate": 3, "greedy": True})
    assert response.status_code == 200 and response.json()["sentences"][0].startswith("Return the")
    wait_idle()


# ---------------------------------------------------------------- NeMo PUT /generate

@pytest.mark.parametrize("field", [
    {"json_schema": SCHEMA},
    {"json_schema": json.dumps(SCHEMA)},  # its JSON text
    {"structured_outputs": {"json": SCHEMA}},  # vLLM's object
])
def test_nemo_json_schema_answers_validate(live_server, wait_idle, field):
    for text in completions(live_server, {"tokens_to_generate": 160, **SAMPLED, **field}):
        jsonschema.validate(json.loads(text), SCHEMA)
    wait_idle()


def test_nemo_choice_regex_and_grammar(live_server, wait_idle):
    assert all(text in CHOICES for text in completions(live_server, {"tokens_to_generate": 16, **SAMPLED,
                                                                     "choice": CHOICES}))
    for text in completions(live_server, {"tokens_to_generate": 16, **SAMPLED, "regex": REGEX}):
        assert re.fullmatch(REGEX, text), text
    for text in completions(live_server, {"tokens_to_generate": 16, **SAMPLED,
                                          "structured_outputs": {"regex": REGEX}, "regex": None}):
        assert re.fullmatch(REGEX, text), text
    grammar = 'root ::= "yes" | "no" | "maybe " [0-9]'  # GBNF
    for text in completions(live_server, {"tokens_to_generate": 16, **SAMPLED, "grammar": grammar}):
        assert re.fullmatch(r"yes|no|maybe [0-9]", text), text
    wait_idle()


@pytest.mark.parametrize("payload, message", [
    ({"json_schema": {"type": "strin"}}, "invalid JSON schema: Invalid type: strin"),
    ({"json_schema": {"not": {}}}, "Unimplemented keys: [\"not\"]"),
    ({"json_schema": "{not json"}, "the JSON schema is not valid JSON"),
    ({"json_schema": "[1, 2]"}, "a JSON schema must be a JSON object"),
    ({"json_schema": 5}, "json_schema must be a JSON schema: an object, or its JSON text"),
    ({"json_schema": {"enum": ["\ud800"]}}, "no lone surrogates"),
    ({"regex": "("}, "invalid regex"),
    ({"regex": ""}, "regex must be a non-empty string"),
    ({"regex": "\ud800"}, "no lone surrogates"),
    ({"choice": []}, "choice must be a non-empty list of non-empty strings"),
    ({"choice": ["a", 1]}, "choice must be a non-empty list of non-empty strings"),
    ({"choice": "a"}, "choice must be a non-empty list of non-empty strings"),
    ({"grammar": 3}, "grammar must be a non-empty string"),
    ({"grammar": "nonsense ::="}, "invalid GBNF grammar"),
    ({"json_schema": SCHEMA, "regex": "a+"}, "at most one of json_schema, regex, choice, grammar, structured_outputs; "
                                             "got json_schema and regex"),
    ({"choice": ["a"], "structured_outputs": {"regex": "a"}}, "got choice and structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one of json, regex, choice, grammar"),
    ({"structured_outputs": {"jsn": {}}}, "unknown fields ['jsn']"),
    ({"structured_outputs": "a+"}, "structured_outputs must be an object"),
])
def test_nemo_bad_structured_fields_are_400_and_the_server_stays_up(live_server, wait_idle, payload, message):
    response = put(live_server, {"sentences": PROMPTS[:2], "tokens_to_generate": 8, **payload})
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    assert_still_serves(live_server, wait_idle)


# ---------------------------------------------------------------- Triton

def sampled(batch: int, max_tokens: int) -> list[triton_http.InferInput]:
    return [tensor("max_output_len", "INT64", np.full((batch, 1), max_tokens, np.int64)),
            tensor("top_k", "INT64", np.zeros((batch, 1), np.int64)),
            tensor("temperature", "FP32", np.full((batch, 1), 0.8, np.float32)),
            tensor("random_seed", "INT64", np.full((batch, 1), 7, np.int64))]


def texts_of(result) -> list[str]:
    return [item.decode() if isinstance(item, bytes) else item for item in result.as_numpy("outputs").reshape(-1)]


def test_triton_config_and_metadata_list_the_structured_inputs(client):
    config = {entry["name"]: entry for entry in client.get_model_config(MODEL_NAME)["input"]}
    metadata = {entry["name"]: entry for entry in client.get_model_metadata(MODEL_NAME)["inputs"]}
    for name in ("json_schema", "regex", "choice", "grammar"):
        assert config[name]["data_type"] == "TYPE_STRING" and config[name]["optional"]
        assert metadata[name]["datatype"] == "BYTES"


@pytest.mark.parametrize("binary", [True, False])
def test_triton_json_schema_answers_validate(client, wait_idle, binary):
    batch = len(PROMPTS)
    # One schema for the whole request: [1, 1] or repeated per row.
    schema = strings([json.dumps(SCHEMA)] * (batch if binary else 1))
    inputs = [tensor("prompts", "BYTES", strings(PROMPTS), binary), *sampled(batch, 160),
              tensor("json_schema", "BYTES", schema, binary)]
    for text in texts_of(client.infer(MODEL_NAME, inputs)):
        jsonschema.validate(json.loads(text), SCHEMA)
    wait_idle()


def test_triton_choice_and_regex(client, live_server, wait_idle):
    batch = len(PROMPTS)
    inputs = [tensor("prompts", "BYTES", strings(PROMPTS)), *sampled(batch, 16),
              tensor("choice", "BYTES", strings(CHOICES))]  # [n_choices, 1], a flat list like end_strings
    assert all(text in CHOICES for text in texts_of(client.infer(MODEL_NAME, inputs)))
    inputs = [tensor("prompts", "BYTES", strings(PROMPTS)), *sampled(batch, 16),
              tensor("regex", "BYTES", strings([REGEX]))]
    for text in texts_of(client.infer(MODEL_NAME, inputs)):
        assert re.fullmatch(REGEX, text), text
    # NemoQuery's keyword arguments send the same inputs.
    nq = NemoQuery(live_server.url, MODEL_NAME)
    knobs = dict(max_output_len=160, top_k=0, temperature=0.8, random_seed=3)
    for text in nq.query_llm(PROMPTS, json_schema=SCHEMA, **knobs)[:, 0]:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert all(text in CHOICES for text in nq.query_llm(PROMPTS, choice=CHOICES, **knobs)[:, 0])
    assert all(re.fullmatch(REGEX, text) for text in nq.query_llm(PROMPTS, regex=REGEX, **knobs)[:, 0])
    wait_idle()


@pytest.mark.parametrize("extra, message", [
    ([("json_schema", "BYTES", strings([json.dumps({"type": "strin"})]))], "invalid JSON schema: Invalid type: strin"),
    ([("json_schema", "BYTES", strings([json.dumps({"not": {}})]))], "Unimplemented keys"),
    ([("json_schema", "BYTES", strings(["{not json"]))], "the JSON schema is not valid JSON"),
    ([("json_schema", "BYTES", strings([json.dumps({"\ud800": 1}, ensure_ascii=True)]))], "no lone surrogates"),
    ([("json_schema", "BYTES", strings(['{"type": "string"}', '{"type": "integer"}']))],
     "input 'json_schema' holds 2 different strings"),
    ([("regex", "BYTES", strings(["("]))], "invalid regex"),
    ([("regex", "INT64", np.ones((1, 1), np.int64))], "input 'regex' must be BYTES"),
    ([("grammar", "BYTES", strings(["start: foo"]))], "invalid grammar"),
    ([("regex", "BYTES", strings(["a+"])), ("choice", "BYTES", strings(["a"]))],
     "send at most one of the inputs json_schema, regex, choice, grammar; got regex and choice"),
])
def test_triton_bad_structured_inputs_are_400_and_the_server_stays_up(client, live_server, wait_idle, extra, message):
    inputs = [tensor("prompts", "BYTES", strings(PROMPTS[:2])),
              tensor("max_output_len", "INT64", np.full((2, 1), 8, np.int64)),
              *(tensor(name, datatype, array) for name, datatype, array in extra)]
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL_NAME, inputs)
    assert error.value.status() == "400" and message in error.value.message()
    assert_still_serves(live_server, wait_idle)


def test_triton_empty_strings_are_absent_and_nemo_query_reports_errors(client, live_server, wait_idle):
    inputs = [tensor("prompts", "BYTES", strings(PROMPTS[:1])),
              tensor("max_output_len", "INT64", np.full((1, 1), 4, np.int64)),
              tensor("json_schema", "BYTES", strings([""])), tensor("choice", "BYTES", strings(["", ""]))]
    assert len(texts_of(client.infer(MODEL_NAME, inputs))) == 1
    with pytest.raises(NemoQueryError, match="invalid JSON schema: Invalid type: strin"):
        NemoQuery(live_server.url, MODEL_NAME).query_llm(PROMPTS[:1], json_schema={"type": "strin"})
    wait_idle()
