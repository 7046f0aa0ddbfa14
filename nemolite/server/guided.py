"""The structured-output fields of OpenAI-shaped requests, read into one ``StructuredOutputs``.

OpenAI's ``response_format`` (``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema":
{"name", "schema", "strict"}}``: https://platform.openai.com/docs/api-reference/chat/create), vLLM's
``structured_outputs`` object (``{json, regex, choice, grammar}``) and vLLM's older ``guided_json``,
``guided_regex``, ``guided_choice``, ``guided_grammar`` (https://docs.vllm.ai/en/latest/features/structured_outputs.html),
honoured alike. Two of them in one request, or a field nemolite cannot honour, is a 400: a constraint
is never dropped silently.
"""

from __future__ import annotations

from typing import Any

from nemolite.engine.structured import StructuredOutputs
from nemolite.errors import NemoliteError
from nemolite.server.state import RequestError

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# vLLM's backend names: nemolite has one backend (llguidance); the name changes nothing about the answer.
BACKENDS = {None, "auto", "guidance", "llguidance", "xgrammar", "outlines", "lm-format-enforcer"}


def structured_outputs(body: Any) -> StructuredOutputs | None:
    """The constraint a request body asks for (a pydantic Body with extra fields allowed), or None."""
    fields = body.model_extra or {}
    found: list[tuple[str, StructuredOutputs]] = []
    response_format = fields.get("response_format")
    if response_format is not None:
        spec = _response_format(response_format)
        if spec is not None:
            found.append(("response_format", spec))
    if fields.get("structured_outputs") is not None:
        found.append(("structured_outputs", _spec(fields["structured_outputs"], "structured_outputs")))
    for name, kind in GUIDED.items():
        if fields.get(name) is not None:
            found.append((name, _spec({kind: fields[name]}, name)))
    if fields.get("guided_whitespace_pattern") is not None:
        raise RequestError("guided_whitespace_pattern is not supported: JSON is written with ', ' and ': ' and no "
                           "other whitespace")
    if fields.get("guided_decoding_backend") not in BACKENDS:
        raise RequestError(f"guided_decoding_backend must be one of {sorted(b for b in BACKENDS if b)}; nemolite uses "
                           "llguidance for all")
    if len(found) > 1:
        raise RequestError(f"give one structured-output field, not {', '.join(name for name, _ in found)}")
    return found[0][1] if found else None


def _response_format(value: Any) -> StructuredOutputs | None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise RequestError('response_format must be an object with a "type": "text", "json_object" or "json_schema"')
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict) or "schema" not in inner:
            raise RequestError('response_format json_schema needs "json_schema": {"name": ..., "schema": {...}}')
        if not isinstance(inner.get("schema"), dict):
            raise RequestError("response_format.json_schema.schema must be a JSON schema object")
        return _spec({"json": inner["schema"]}, "response_format.json_schema")
    raise RequestError(f'response_format type {kind[:40]!r} is not supported; use "text", "json_object" or '
                       '"json_schema"')


def _spec(value: Any, where: str) -> StructuredOutputs:
    try:
        return StructuredOutputs.of(value)
    except (NemoliteError, TypeError) as error:
        raise RequestError(f"{where}: {error}") from None
