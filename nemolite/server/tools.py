"""Function calling on chat completions: ``tools``, ``tool_choice`` and ``message.tool_calls``.

OpenAI's shapes (https://platform.openai.com/docs/guides/function-calling). ``tool_choice``:
- ``"none"``: the model answers in text; nothing is parsed.
- a named function (``{"type": "function", "function": {"name": ...}}``): the output is constrained to
  that function's ``parameters`` schema and returned as its one call;
- ``"required"``: the output is constrained to a JSON array of ``{"name", "arguments"}`` calls of the
  given functions (one call when ``parallel_tool_calls`` is false);
- ``"auto"`` (the default with tools): the tools go to the checkpoint's chat template when it reads
  ``tools`` (Llama-3.1's JSON tool calling), else into a system message describing them; the model's
  answer is a call when it parses as Llama-3.1's format (``<|python_tag|>`` or a bare JSON object
  ``{"name": ..., "parameters": ...}``, several joined by ``;``) naming a given function, text otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from nemolite.engine.structured import StructuredOutputs
from nemolite.server.state import RequestError

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PYTHON_TAG = "<|python_tag|>"
# For templates that know nothing of tools (the Nemotron-4 format): what the model is told.
TOOLS_SYSTEM = ("You can call these functions. To call one, answer with only a JSON object "
                '{{"name": <function name>, "parameters": <arguments object>}} and nothing else.\n{tools}')


@dataclasses.dataclass(slots=True)
class ToolPlan:
    """What a request's tools and tool_choice mean for generation and for the answer."""

    tools: list[dict]  # the request's tools, checked
    mode: str  # "none", "auto", "required" or "named"
    function: str | None = None  # the named function
    constraint: StructuredOutputs | None = None  # what the output must be (required, named)

    @property
    def names(self) -> set[str]:
        return {tool["function"]["name"] for tool in self.tools}

    def parameters(self, name: str) -> dict:
        return next(tool["function"].get("parameters") or {"type": "object"} for tool in self.tools
                    if tool["function"]["name"] == name)


def plan(tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> ToolPlan | None:
    """The ToolPlan of a request, or None without tools; a 400 for anything malformed."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise RequestError("tool_choice needs tools")
        return None
    checked = _check_tools(tools)
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise RequestError("parallel_tool_calls must be true or false")
    choice = "auto" if tool_choice is None else tool_choice
    if choice in ("none", "auto"):
        return ToolPlan(checked, choice)
    if choice == "required":
        calls = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                            "properties": {"name": {"const": tool["function"]["name"]},
                                           "arguments": tool["function"].get("parameters") or {"type": "object"}}}
                           for tool in checked]}
        schema = {"type": "array", "items": calls, "minItems": 1}
        if parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan(checked, "required", constraint=StructuredOutputs(json=schema))
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        result = ToolPlan(checked, "named", function=name)
        if name not in result.names:
            raise RequestError(f"tool_choice names the function {str(name)[:80]!r}, which is not among the tools "
                               f"({', '.join(sorted(result.names))})")
        result.constraint = StructuredOutputs(json=result.parameters(name))
        return result
    raise RequestError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                       '{"name": ...}}')


def _check_tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list) or not tools:
        raise RequestError("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    names = set()
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise RequestError(f'{where} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}')
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise RequestError(f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-'")
        if name in names:
            raise RequestError(f"{where}: the function name {name!r} is given twice")
        names.add(name)
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise RequestError(f"{where}.function.parameters must be a JSON schema object")
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise RequestError(f"{where}.function.description must be a string")
    return tools


def template_reads_tools(template: str | None) -> bool:
    return template is not None and re.search(r"\btools\b", template) is not None


def tools_system_message(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    return TOOLS_SYSTEM.format(tools=listing)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(name: str, arguments: Any) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def calls_of(tool_plan: ToolPlan, text: str) -> list[dict] | None:
    """The tool calls in a finished answer, or None when it is text (or a call cut short)."""
    if tool_plan.mode == "named":
        try:
            json.loads(text)
        except ValueError:
            return None
        return [tool_call(tool_plan.function, text)]
    if tool_plan.mode == "required":
        try:
            calls = json.loads(text)
        except ValueError:
            return None
        return [tool_call(call["name"], call["arguments"]) for call in calls]
    if tool_plan.mode == "auto":
        return _parse_auto(text, tool_plan.names)
    return None


def _parse_auto(text: str, names: set[str]) -> list[dict] | None:
    """Llama-3.1's JSON tool calls: ``{"name": ..., "parameters": {...}}`` (or "arguments"), optionally
    after ``<|python_tag|>``, several joined by ';'."""
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if not body.startswith("{"):
        return None
    decoder, calls, position = json.JSONDecoder(), [], 0
    while position < len(body):
        try:
            value, end = decoder.raw_decode(body, position)
        except ValueError:
            return None
        arguments = value.get("parameters", value.get("arguments")) if isinstance(value, dict) else None
        if not isinstance(value, dict) or value.get("name") not in names or not isinstance(arguments, (dict, str)):
            return None
        calls.append(tool_call(value["name"], arguments))
        position = end
        while position < len(body) and body[position] in " \t\r\n;":
            position += 1
    return calls or None
