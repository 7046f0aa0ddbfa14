"""How many sampled answers parse and validate, over a spread of JSON schemas, choices and regexes.

Each case is asked ``--samples`` times at temperature 0.8 (one request with ``n``) through the chat
template, in-process or against a server's OpenAI API (``--endpoint``, with the openai client);
JSON answers are checked with ``jsonschema`` (formats included), choices and regexes by matching.
Prints a line per failing answer (its start and end) and the count per case.

    python benchmarks/structured_schemas.py [--endpoint http://127.0.0.1:1424] [--samples 8] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import re

import jsonschema

NAME = {"type": "string", "maxLength": 24}
SCHEMAS = {
    "required + additionalProperties false": {
        "type": "object", "additionalProperties": False, "required": ["name", "age"],
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 130}}},
    "enum + const": {"type": "object", "required": ["s", "k"],
                     "properties": {"s": {"enum": ["x", "y", 1, None]}, "k": {"const": "fixed"}}},
    "bounded array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2,
                      "maxItems": 5},
    "nested objects": {"type": "object", "required": ["a"], "properties": {"a": {
        "type": "object", "required": ["b"], "properties": {"b": {"type": "object", "required": ["c"],
                                                                  "properties": {"c": {"type": "boolean"}}}}}}},
    "numeric ranges": {"type": "object", "required": ["t", "p"], "properties": {
        "t": {"type": "number", "minimum": -10.5, "maximum": 40}, "p": {"type": "integer", "exclusiveMinimum": 0,
                                                                      "exclusiveMaximum": 100, "multipleOf": 5}}},
    "pattern": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string",
                                                                            "pattern": "^[A-Z]{2}-[0-9]{4}$"}}},
    "anyOf": {"anyOf": [{"type": "object", "required": ["cat"], "properties": {"cat": NAME}},
                        {"type": "array", "items": {"type": "number"}, "maxItems": 3}]},
    "free string": {"type": "object", "required": ["summary"], "properties": {"summary": {"type": "string"}}},
    "free array of strings": {"type": "object", "required": ["items"],
                              "properties": {"items": {"type": "array", "items": {"type": "string"}}}},
    "unbounded numbers": {"type": "object", "required": ["i", "x"],
                          "properties": {"i": {"type": "integer"}, "x": {"type": "number"}}},
    "$defs / $ref": {"$defs": {"p": {"type": "object", "required": ["x", "y"], "properties": {
        "x": {"type": "integer"}, "y": {"type": "integer"}}}}, "type": "object", "required": ["from", "to"],
        "properties": {"from": {"$ref": "#/$defs/p"}, "to": {"$ref": "#/$defs/p"}}},
    "array of objects": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["n", "v"],
                                                                   "properties": {"n": NAME, "v": {"type": "number"}}}},
    "date formats": {"type": "object", "required": ["d", "t"], "properties": {
        "d": {"type": "string", "format": "date"}, "t": {"type": "string", "format": "date-time"}}},
    "pydantic model": {"title": "Item", "type": "object", "required": ["name", "tags"], "properties": {
        "name": {"title": "Name", "type": "string"}, "tags": {"title": "Tags", "type": "array", "items": {"type": "string"}},
        "price": {"anyOf": [{"type": "number"}, {"type": "null"}], "default": None, "title": "Price"}}},
    "e-mail format": {"type": "object", "required": ["email"], "properties": {"email": {"type": "string",
                                                                                        "format": "email"}}},
}
CHOICES = ["yes", "no", "it depends"]
REGEX = r"\(\d{3}\) \d{3}-\d{4}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", default=None, help="a server's URL (default: the demo model in-process)")
    parser.add_argument("--model", default=None, help="with --endpoint: the served model name")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    ask = _client(args) if args.endpoint else _in_process(args)
    messages = [{"role": "user", "content": "Give me the data as JSON."}]
    cases = [(name, {"json": schema}) for name, schema in SCHEMAS.items()]
    cases += [("choice", {"choice": CHOICES}), ("regex", {"regex": REGEX})]
    total = passed = 0
    for name, spec in cases:
        ok = 0
        for text, finish in ask(messages, spec):
            good = _valid(spec, text)
            ok += good
            if not good:
                print(f"  {name}: {finish}, {text[:60]!r} ... {text[-40:]!r}")
        print(f"{name:40s} {ok}/{args.samples}")
        total, passed = total + args.samples, passed + ok
    print(f"all: {passed}/{total} answers valid ({len(cases)} cases, temperature 0.8, max_tokens {args.max_tokens})")


def _valid(spec: dict, text: str) -> bool:
    if "choice" in spec:
        return text in spec["choice"]
    if "regex" in spec:
        return re.fullmatch(spec["regex"], text) is not None
    try:
        jsonschema.validate(json.loads(text), spec["json"], format_checker=jsonschema.FormatChecker())
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def _in_process(args):
    from nemolite import LLM, SamplingParams

    llm = LLM(None, dtype="float32")

    def ask(messages, spec):
        params = SamplingParams(n=args.samples, temperature=0.8, seed=args.seed, max_tokens=args.max_tokens,
                                structured_outputs=spec)
        output = llm.chat(messages, params, use_tqdm=False)[0]
        return [(o.text, o.finish_reason) for o in output.outputs]
    return ask


def _client(args):
    import openai

    client = openai.OpenAI(base_url=args.endpoint.rstrip("/") + "/v1", api_key="none", max_retries=0)
    model = args.model or client.models.list().data[0].id

    def ask(messages, spec):
        answer = client.chat.completions.create(model=model, messages=messages, n=args.samples, temperature=0.8,
                                                seed=args.seed, max_tokens=args.max_tokens,
                                                extra_body={"structured_outputs": spec})
        return [(c.message.content, c.finish_reason) for c in answer.choices]
    return ask


if __name__ == "__main__":
    main()
