"""Function calling without a server: tool plans, Llama-3.1 call parsing, tools reaching a chat template."""

from __future__ import annotations

import json

import pytest

from nemolite.server import tools
from nemolite.server.state import RequestError
from nemolite.tokenizer import Tokenizer, nemotron_chat_prompt

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}

# The tool part of Llama-3.1-Instruct's chat template (tools as JSON in the first user turn).
LLAMA_TOOLS_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and tools is defined and tools %}<tools>{{ tools | tojson }}</tools>{%- endif %}"
    "<|{{ message.role }}|>{{ message.content }}"
    "{%- if message.tool_calls is defined %}{%- for call in message.tool_calls %}"
    "<|python_tag|>{{ call.function.name }}{%- endfor %}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}")


def test_named_and_required_plans_constrain_to_the_parameters():
    named = tools.plan([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, None)
    assert named.mode == "named" and named.constraint.json["required"] == ["city"]
    required = tools.plan([WEATHER, TIME], "required", False)
    schema = required.constraint.json
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    assert [option["properties"]["name"]["const"] for option in schema["items"]["anyOf"]] == ["get_weather", "get_time"]
    assert tools.plan([WEATHER], None, None).mode == "auto"
    assert tools.plan(None, None, None) is None and tools.plan(None, "none", None) is None


@pytest.mark.parametrize("tools_, choice, words", [
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not among"),
    (None, "required", "needs tools"), ([], "auto", "non-empty"), ([WEATHER, WEATHER], "auto", "twice"),
    ([{"type": "function", "function": {"name": "a b"}}], "auto", "letters"),
    ([{"type": "retrieval"}], "auto", "function"), ([WEATHER], "sometimes", "tool_choice must be"),
])
def test_bad_plans_are_400s(tools_, choice, words):
    with pytest.raises(RequestError, match=words):
        tools.plan(tools_, choice, None)


def test_llama_calls_are_parsed_and_anything_else_is_text():
    plan = tools.plan([WEATHER, TIME], "auto", None)
    (call,) = tools.calls_of(plan, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'} and call["type"] == "function"
    calls = tools.calls_of(plan, '{"name": "get_time", "arguments": {}}; {"name": "get_weather", "parameters": {}}')
    assert [c["function"]["name"] for c in calls] == ["get_time", "get_weather"]
    assert len({c["id"] for c in calls}) == 2
    for text in ("It is sunny.", '{"name": "unknown", "parameters": {}}', '{"name": "get_time"}',
                 '{"name": "get_time", "parameters": {}} and then', '{"name": "get_time", "parameters": {', "[1]"):
        assert tools.calls_of(plan, text) is None, text


def test_required_answers_become_one_call_each():
    plan = tools.plan([WEATHER, TIME], "required", None)
    calls = tools.calls_of(plan, '[{"name": "get_weather", "arguments": {"city": "Rome"}}, '
                                 '{"name": "get_time", "arguments": {}}]')
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Rome"}), ("get_time", {})]
    assert tools.calls_of(plan, '[{"name": "get_weather", "argu') is None  # cut short: text


def test_tools_reach_a_template_that_reads_them(tmp_path):
    from tests.conftest import write_sentencepiece

    write_sentencepiece(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA_TOOLS_TEMPLATE}))
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    assert tools.template_reads_tools(tokenizer.chat_template)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert prompt.startswith("<tools>") and '"get_weather"' in prompt and prompt.endswith("<|assistant|>")
    back = tokenizer.apply_chat_template([
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "12:00"}])
    assert "<|python_tag|>get_time" in back and "<|tool|>12:00" in back
    assert not tools.template_reads_tools(None)


def test_the_nemotron_format_renders_calls_and_results_back():
    prompt = nemotron_chat_prompt([
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_time", "arguments": '{"z": 1}'}}]},
        {"role": "tool", "content": "12:00"}])
    assert '<extra_id_1>Assistant\n{"name": "get_time", "parameters": {"z": 1}}\n' in prompt
    assert "<extra_id_1>User\nTool result: 12:00\n" in prompt
    assert tools.tools_system_message([WEATHER]).count('"get_weather"') == 1
