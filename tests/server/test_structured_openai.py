"""Structured output and tool calls through the OpenAI API, with the openai client, at temperature 0.8:
every answer parses and validates; bad schemas are 400s and the server goes on."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from tests.server.conftest import MODEL_NAME

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "role", "kind"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 18, "maximum": 99},
                         "role": {"enum": ["admin", "user", "guest"]}, "kind": {"const": "person"}}}
SCHEMAS = [
    PERSON,
    {"type": "object", "required": ["tags", "where"], "additionalProperties": False,
     "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3},
                    "where": {"type": "object", "required": ["x", "y"], "additionalProperties": False,
                              "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5},
                                             "y": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9}}}}},
    {"type": "object", "required": ["code", "value"], "additionalProperties": False,
     "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                    "value": {"anyOf": [{"type": "integer"}, {"type": "null"}, {"type": "boolean"}]}}},
]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "required": ["zone"], "additionalProperties": False,
                                       "properties": {"zone": {"type": "string", "maxLength": 12}}}}}


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="none", max_retries=0)


def ask(client, **extra):
    return client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Describe a user."}],
                                          temperature=0.8, max_tokens=200, **extra)


@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_answers_validate(client, schema):
    answer = ask(client, n=4, seed=3, response_format={
        "type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}})
    for choice in answer.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_and_vllm_fields(client):
    answer = ask(client, seed=1, response_format={"type": "json_object"})
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    answer = ask(client, seed=2, extra_body={"structured_outputs": {"json": PERSON}})
    jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)
    answer = ask(client, seed=2, extra_body={"guided_json": PERSON})
    jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)


def test_choice_and_regex(client):
    for field in ({"guided_choice": ["yes", "no", "not sure"]},
                  {"structured_outputs": {"choice": ["yes", "no", "not sure"]}}):
        answer = ask(client, n=3, seed=5, extra_body=field)
        assert {c.message.content for c in answer.choices} <= {"yes", "no", "not sure"}
        assert all(c.finish_reason == "stop" for c in answer.choices)
    pattern = r"\(\d{3}\) \d{3}-\d{4}"
    for field in ({"guided_regex": pattern}, {"structured_outputs": {"regex": pattern}}):
        answer = ask(client, n=3, seed=6, extra_body=field)
        assert all(re.fullmatch(pattern, c.message.content) for c in answer.choices)


def test_completions_take_the_same_fields(client):
    answer = client.completions.create(model=MODEL_NAME, prompt="A record:", temperature=0.8, max_tokens=200,
                                       seed=4, extra_body={"guided_json": PERSON})
    jsonschema.validate(json.loads(answer.choices[0].text), PERSON)
    chunks = client.completions.create(model=MODEL_NAME, prompt="Pick:", temperature=0.8, max_tokens=20, stream=True,
                                       extra_body={"guided_choice": ["red", "green"]})
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) in ("red", "green")


def test_named_tool_call(client):
    answer = ask(client, n=2, seed=7, tools=[WEATHER, TIME],
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for choice in answer.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_tool_calls(client):
    answer = ask(client, seed=8, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_streamed_tool_call(client):
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Weather?"}], temperature=0.8, max_tokens=200,
        stream=True, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    calls = [call for chunk in chunks for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices]
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].index == 0
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_results_are_rendered_back_and_auto_answers(client):
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]
    answer = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0.8, max_tokens=30,
                                            tools=[WEATHER], tool_choice="auto")
    choice = answer.choices[0]
    # The demo model was never taught to call tools: whatever it wrote is text or a call that parses.
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    if choice.finish_reason == "tool_calls":
        assert choice.message.tool_calls[0].function.name == "get_weather"
    else:
        assert isinstance(choice.message.content, str)


@pytest.mark.parametrize("extra, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "Unimplemented keys"),
    ({"extra_body": {"guided_json": {"type": "array", "uniqueItems": True}}}, "uniqueItems"),
    ({"extra_body": {"guided_regex": "(abc"}}, "regex"),
    ({"extra_body": {"guided_json": {"type": "integer", "minimum": 5, "maximum": 3}}}, "minimum"),
    ({"extra_body": {"guided_choice": []}}, "choice"),
    ({"extra_body": {"guided_grammar": "start: foo"}}, "grammar"),
    ({"extra_body": {"guided_json": PERSON, "guided_regex": "a"}}, "one structured-output field"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"extra_body": {"structured_outputs": {"jsn": {}}}}, "unknown fields"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "letters"),
])
def test_bad_constraints_are_400s_and_the_server_goes_on(client, extra, words):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, **extra)
    assert words in str(caught.value)
    answer = ask(client, seed=9, extra_body={"guided_choice": ["ok"]})
    assert answer.choices[0].message.content == "ok"


def test_async_generate_compiles_off_the_engine_and_loop_threads(demo_engine, monkeypatch):
    import asyncio
    import threading

    from nemolite.engine.sampling_params import SamplingParams

    grammars = demo_engine.engine.grammars
    threads = []
    build = grammars._build
    monkeypatch.setattr(grammars, "_build", lambda spec: threads.append(threading.current_thread()) or build(spec))
    params = SamplingParams(temperature=0.8, max_tokens=30, structured_outputs={"regex": "[a-c]{3}-[0-9]{2} x"})

    async def run():
        final = None
        async for final in demo_engine.generate(demo_engine.tokenizer.encode("Code:"), params, stream=False):
            pass
        return final, threading.current_thread()

    final, loop_thread = asyncio.run(run())
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2} x", final.outputs[0].text)
    (thread,) = threads
    assert thread is not loop_thread and "engine" not in thread.name


def test_auto_tool_choice_streams_a_text_answer_as_text(client):
    with_tools = list(client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Tell me about files."}], temperature=0.8,
        seed=12, max_tokens=40, stream=True, tools=[WEATHER], tool_choice="auto"))
    deltas = [c.choices[0].delta.content for c in with_tools if c.choices and c.choices[0].delta.content]
    assert not "".join(deltas).lstrip().startswith("{")  # the demo model answers this in prose
    assert len(deltas) > 3  # streamed as it came, not held to the end
    assert with_tools[-1].choices[0].finish_reason in ("stop", "length")
