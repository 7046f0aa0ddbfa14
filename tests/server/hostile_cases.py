"""The hostile requests, over every protocol: each field at its extremes (huge, negative and zero counts,
NaN / Infinity literals), token ids outside the vocabulary in every field that carries ids, malformed
chat content, huge counts and bodies, lying KServe binary headers, wrong content types and non-object
JSON. Each case has a readable id, which names it when it fails; tests/server/hostile.py holds the
contract the answers must keep.
"""

from __future__ import annotations

import struct

from nemolite.kserve import HEADER_LENGTH, encode_bytes

from tests.server.conftest import MODEL_NAME
from tests.server.hostile import (INF, INFER, JSON_TYPE, LONG, NAN, PROMPT, REFERENCE_CONVERSATION, REWARD_INFER,
                                  VOCAB, Hostile, binary_body, encode)


def _json(cases: list, method: str, path: str, name: str, body, **options) -> None:
    cases.append(Hostile(name, method, path, body if isinstance(body, bytes) else encode(body), **options))


def _completions(cases: list) -> None:
    path = "/v1/completions"
    base = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}

    def add(name, fields=None, body=None, **options):
        _json(cases, "POST", path, f"cmpl {name}", body if body is not None else {**base, **fields}, **options)

    # The bug report: the engine banned token 999999 before min_tokens and died of the IndexError.
    add("bug report: stop_token_ids=[999999] min_tokens=1",
        body={"prompt": "hi", "max_tokens": 4, "min_tokens": 1, "stop_token_ids": [999999]})
    add("bug report streamed", {"prompt": "hi", "min_tokens": 1, "stop_token_ids": [999999], "stream": True})
    for value in (999999, VOCAB, -1, 2**63, 10**30):
        add(f"stop_token_ids=[{value}]", {"stop_token_ids": [value]})
        add(f"stop_token_ids=[{value}] min_tokens=2", {"stop_token_ids": [5, value], "min_tokens": 2})
    for value in (["abc"], [1.5], [None], [NAN], "5", {"5": 1}, [[5]]):
        add(f"stop_token_ids={value!a}", {"stop_token_ids": value, "min_tokens": 1})
    for key in ("999999", "-1", "abc", str(VOCAB), "1e3", "", " 5", str(2**63)):
        add(f"logit_bias key {key!r}", {"logit_bias": {key: 5}})
    for value in (NAN, INF, -INF, 10**30, 100, -100.5):
        add(f"logit_bias value {value}", {"logit_bias": {"5": value}})
    add("logit_bias on every token", {"logit_bias": {str(i): -100 for i in range(VOCAB)}, "min_tokens": 2})
    add("logit_bias 10,000 keys", {"logit_bias": {str(i): 1 for i in range(10_000)}})
    for value in ([999999], [-1], [VOCAB], [2**63], [10**30], [], ["a"], [1.5], [True], None, "5"):
        add(f"allowed_token_ids={value!a}", {"allowed_token_ids": value, "min_tokens": 1})
    eos = 3  # the demo tokenizer's </s>
    add("allowed_token_ids only stop tokens, min_tokens=2",
        {"allowed_token_ids": [5, eos], "stop_token_ids": [5], "min_tokens": 2})
    add("allowed_token_ids only EOS, min_tokens=2 ignore_eos",
        {"allowed_token_ids": [eos], "min_tokens": 2, "ignore_eos": True})
    add("allowed_token_ids only EOS", {"allowed_token_ids": [eos]})
    add("allowed_token_ids one token, logit_bias -100 on it", {"allowed_token_ids": [5], "logit_bias": {"5": -100}})
    add("allowed_token_ids 10,000 ids", {"allowed_token_ids": [i % VOCAB for i in range(10_000)]})
    add("allowed_token_ids sampled n=4", {"allowed_token_ids": [5, 6], "temperature": 1.0, "top_p": 0.5, "n": 4,
                                          "seed": 1, "logprobs": 5})
    add("allowed_token_ids=[5, 6] logprobs=5", {"allowed_token_ids": [5, 6], "logprobs": 5})
    add("allowed_token_ids=[5, 6] logprobs=5 streamed", {"allowed_token_ids": [5, 6], "logprobs": 5, "stream": True})
    add("logit_bias -100 everywhere logprobs=5", {"logit_bias": {str(i): -100 for i in range(VOCAB)}, "logprobs": 5})
    for name, prompt in [("[999999]", [999999]), ("[-1]", [-1]), ("[4096]", [VOCAB]), ("[2**63]", [2**63]),
                         ("[10**30]", [10**30]), ("[[5, 6], [999999]]", [[5, 6], [999999]]), ("[1.5]", [1.5]),
                         ("[NaN]", [NAN]), ("[[-1]]", [[-1]])]:
        add(f"prompt ids {name}", {"prompt": prompt}, want_4xx=True)
    add("prompt ids [true]", {"prompt": [True]})
    for value in (10**12, 10**30, 2**63, -1, NAN, INF, -INF, 1.5, "4", True, [4], 1021):
        add(f"max_tokens={value!a}", {"max_tokens": value})
    for name, fields in [("min_tokens > max_tokens", {"max_tokens": 4, "min_tokens": 10}),
                         ("min_tokens=10**12", {"min_tokens": 10**12}), ("min_tokens=-1", {"min_tokens": -1}),
                         ("min_tokens=NaN", {"min_tokens": NAN}), ("min_tokens=2**63", {"min_tokens": 2**63}),
                         ("min_tokens > max_tokens=0", {"max_tokens": 0, "min_tokens": 3})]:
        add(name, fields)
    for value in (10**6, 2**63, 0, -1, NAN, 129, 1.5):
        add(f"n={value!a}", {"n": value}, want_4xx=value in (10**6, 2**63, 0, -1))
    for value in (10**6, 21, 100, -1, NAN, 2**63):
        add(f"logprobs={value}", {"logprobs": value})
    add("logprobs=20 echo max_tokens=0", {"logprobs": 20, "echo": True, "max_tokens": 0, "prompt": LONG[:2000]})
    for field, values in [("temperature", (NAN, INF, -INF, -1, 1e308, 10**30)), ("top_p", (NAN, 0, -0.5, INF)),
                          ("top_k", (10**30, 2**63, -2, NAN)), ("min_p", (NAN, 2)),
                          ("repetition_penalty", (NAN, 0, -1, INF, 1e308)), ("presence_penalty", (NAN, INF)),
                          ("frequency_penalty", (-INF, 1e308)), ("seed", (2**63, -(2**63) - 1, 10**30, NAN, "x"))]:
        for value in values:
            add(f"{field}={value!a}", {field: value})
    add("top_k=10**30 sampled", {"top_k": 10**30, "temperature": 1.0, "seed": 1})
    add("repetition_penalty=1e308 sampled", {"repetition_penalty": 1e308, "temperature": 1.0, "seed": 1})
    add("temperature=1e-300 sampled", {"temperature": 1e-300, "top_p": 0.5, "seed": 1})
    add("10,000 stop strings", {"stop": [f"x{i}" for i in range(10_000)]})
    add("1 MB stop string", {"stop": ["x" * 1_000_000]})
    for value in ([""], "", [5], [["x"]], [None], ["\ud800"]):
        add(f"stop={value!a}", {"stop": value})
    add("10,000 prompts", {"prompt": ["hi"] * 10_000, "max_tokens": 1})
    add("8 prompts x n=128", {"prompt": [PROMPT] * 8, "n": 128, "max_tokens": 1})
    add("1 MB prompt", {"prompt": "hi " * 350_000})
    add("5 MB body", {"junk": "a" * 5_000_000})
    for name, prompt in [("dict", {"a": 1}), ("[[[1]]]", [[[1]]]), ("[]", []), ("[[]]", [[]]), ("''", ""),
                         ("lone surrogate", "\ud800 hi"), ("null", None), ("[5, 'a']", [5, "a"])]:
        add(f"prompt {name}", {"prompt": prompt})
    for name, fields in [("best_of=10**6", {"best_of": 10**6}), ("suffix", {"suffix": "x"}),
                         ("stream_options include_usage='x'",
                          {"stream": True, "stream_options": {"include_usage": "x"}}),
                         ("stream_options='x'", {"stream": True, "stream_options": "x"}),
                         ("stream echo logprobs", {"stream": True, "echo": True, "logprobs": 1}),
                         ("model=5", {"model": 5}), ("model huge", {"model": "m" * 100_000}),
                         ("user=10**30", {"user": 10**30}), ("stream='yes'", {"stream": "yes"}),
                         ("echo=NaN", {"echo": NAN}), ("ignore_eos n=128 logprobs=20",
                                                      {"ignore_eos": True, "n": 128, "logprobs": 20})]:
        add(name, fields)
    for name, raw in [("NaN body", b"NaN"), ("json array", b"[1, 2]"), ("json string", b'"hi"'), ("json null", b"null"),
                      ("empty body", b""), ("truncated", encode(base)[:-3]),
                      ("invalid utf-8", b'{"prompt": "\xff\xfe"}'),
                      ("Infinity literal", b'{"prompt": "hi", "max_tokens": Infinity}'),
                      ("-Infinity literal", b'{"prompt": "hi", "max_tokens": 4, "temperature": -Infinity}'),
                      ("5000-digit int", b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}"),
                      ("deep nesting", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")]:
        add(name, body=raw, want_4xx=True)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/xml"):
        cases.append(Hostile(f"cmpl content-type {content_type}", "POST", path, encode(base),
                             {"Content-Type": content_type}))
    cases.append(Hostile("cmpl no content-type", "POST", path, encode(base), {}))


def _chat(cases: list) -> None:
    path = "/v1/chat/completions"
    hello = [{"role": "user", "content": "hi"}]
    base = {"model": MODEL_NAME, "messages": hello, "max_tokens": 4, "temperature": 0}

    def add(name, fields, **options):
        _json(cases, "POST", path, f"chat {name}", {**base, **fields}, **options)

    def user(content):
        return {"messages": [{"role": "user", "content": content}]}

    for name, content in [("text=5", [{"type": "text", "text": 5}]), ("text=null", [{"type": "text", "text": None}]),
                          ("text=list", [{"type": "text", "text": ["a"]}]),
                          ("text=dict", [{"type": "text", "text": {}}]),
                          ("image_url only", [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]),
                          ("image_url and text", [{"type": "image_url", "image_url": {"url": "x"}},
                                                  {"type": "text", "text": "hi"}]),
                          ("no type", [{"text": "hi"}]), ("type=5", [{"type": 5, "text": "hi"}]),
                          ("part a string", ["hi"]), ("part a list", [[{"type": "text", "text": "hi"}]]),
                          ("empty parts", [])]:
        add(f"content parts {name}", user(content))
    for name, content in [("a dict", {"type": "text", "text": "hi"}), ("an int", 5), ("true", True),
                          ("nested lists", [[["hi"]]]), ("lone surrogate", "\ud800"), ("NaN", NAN),
                          ("1 MB", "hi " * 350_000)]:
        add(f"content {name}", user(content))
    for name, messages in [("role missing", [{"content": "hi"}]),
                           ("role unknown", [{"role": "wizard", "content": "hi"}]),
                           ("role int", [{"role": 5, "content": "hi"}]),
                           ("role null", [{"role": None, "content": "hi"}]),
                           ("role ''", [{"role": "", "content": "hi"}]),
                           ("system not first", [*hello, {"role": "system", "content": "x"}]),
                           ("only system", [{"role": "system", "content": "x"}]),
                           ("only assistant", [{"role": "assistant", "content": "x"}]),
                           ("assistant content null", [*hello, {"role": "assistant", "content": None}]),
                           ("messages []", []), ("messages {}", {}), ("messages 'hi'", "hi"),
                           ("messages [null]", [None]),
                           ("messages [[]]", [[]]), ("10,000 messages", hello * 10_000)]:
        add(name, {"messages": messages})
    for value in (100, 10**6, -1, 21, NAN):
        add(f"top_logprobs={value}", {"logprobs": True, "top_logprobs": value})
    add("logprobs='yes'", {"logprobs": "yes"})
    for field in ("max_tokens", "max_completion_tokens"):
        for value in (10**12, 0, -1, NAN, 2**63):
            add(f"{field}={value}", {field: value})
    add("max_tokens and max_completion_tokens differ", {"max_tokens": 2, "max_completion_tokens": 10**12})
    for value in (10**6, 0):
        add(f"n={value}", {"n": value}, want_4xx=True)
    add("stop_token_ids=[999999] min_tokens=1", {"stop_token_ids": [999999], "min_tokens": 1})
    add("stop_token_ids=[999999] min_tokens=1 streamed", {"stop_token_ids": [999999], "min_tokens": 1, "stream": True})
    add("stop_token_ids=[-1]", {"stop_token_ids": [-1]})
    add("logit_bias key '999999'", {"logit_bias": {"999999": 1}})
    add("allowed_token_ids=[999999]", {"allowed_token_ids": [999999]})
    add("allowed_token_ids=[5, 6] top_logprobs=5", {"allowed_token_ids": [5, 6], "logprobs": True, "top_logprobs": 5})
    add("allowed_token_ids=[5, 6] top_logprobs=5 streamed", {"allowed_token_ids": [5, 6], "logprobs": True,
                                                            "top_logprobs": 5, "stream": True})
    add("allowed_token_ids only the chat stop, min_tokens=1", {"allowed_token_ids": [4, 5, 6, 7], "min_tokens": 1,
                                                               "stop_token_ids": [4, 5, 6, 7]})
    add("logit_bias key 'abc'", {"logit_bias": {"abc": 1}})
    add("temperature=NaN", {"temperature": NAN})
    add("seed=2**64", {"seed": 2**64})
    add("add_generation_prompt='x'", {"add_generation_prompt": "x"})
    add("tools", {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"})
    add("response_format json_schema", {"response_format": {"type": "json_schema", "json_schema": {"x": 1}}})
    _structured(add)
    add("10,000 stop strings", {"stop": [f"x{i}" for i in range(10_000)]})
    _json(cases, "POST", path, "chat json array", b"[]", want_4xx=True)


def _structured(add) -> None:
    """Structured output and tools: every schema, grammar and tool list an attacker can think of."""
    deep: dict = {"type": "string"}
    for _ in range(300):
        deep = {"type": "array", "items": deep}
    wide = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(3000)},
            "required": [f"k{i}" for i in range(3000)]}
    for name, schema in [("300 levels deep", deep), ("3000 required keys", wide), ("not", {"not": {}}),
                         ("$ref loop", {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
                         ("remote $ref", {"$ref": "http://127.0.0.1:1/x.json"}), ("a list", [1]),
                         ("text 'x'", "x"), ("enum []", {"enum": []}), ("type 5", {"type": 5}),
                         ("pattern (", {"type": "string", "pattern": "("}),
                         ("minLength 10**6", {"type": "string", "minLength": 10**6}),
                         ("integer 10**400", {"type": "integer", "minimum": 10**400})]:
        add(f"guided_json {name}", {"guided_json": schema, "max_tokens": 8})
    for name, fields in [("regex a{1000}{1000}", {"guided_regex": "a{1000}{1000}"}),
                         ("regex 5", {"guided_regex": 5}), ("choice 5000", {"guided_choice": [f"c{i}" for i in range(5000)]}),
                         ("choice [null]", {"guided_choice": [None]}), ("choice ''", {"guided_choice": [""]}),
                         ("grammar gbnf broken", {"guided_grammar": "root ::= ("}),
                         ("grammar lark 1 MB", {"guided_grammar": "start: " + " | ".join(['"a"'] * 200_000)}),
                         ("structured_outputs two kinds", {"structured_outputs": {"json": {}, "regex": "a"}}),
                         ("structured_outputs 'x'", {"structured_outputs": "x"}),
                         ("json_schema + guided_choice", {"guided_choice": ["a"], "response_format": {
                             "type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}),
                         ("guided_whitespace_pattern", {"guided_json": {}, "guided_whitespace_pattern": " *"}),
                         ("guided_decoding_backend x", {"guided_json": {}, "guided_decoding_backend": "x"}),
                         ("choice, allowed_token_ids elsewhere", {"guided_choice": ["yes"], "allowed_token_ids": [5]}),
                         ("choice, min_tokens=50", {"guided_choice": ["a"], "min_tokens": 50}),
                         ("choice, logit_bias -100 on all", {"guided_choice": ["a", "b"], "logit_bias": {
                             str(i): -100 for i in range(VOCAB)}}),
                         ("json, n=8 streamed", {"guided_json": {"type": "object"}, "n": 8, "stream": True,
                                                 "max_tokens": 30, "temperature": 1.0}),
                         ("json_object logprobs", {"response_format": {"type": "json_object"}, "logprobs": True,
                                                   "top_logprobs": 5}),
                         ("1000 tools required", {"tool_choice": "required", "tools": [
                             {"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}}
                             for i in range(1000)]}),
                         ("tool parameters 'x'", {"tools": [{"type": "function", "function": {"name": "f",
                                                                                             "parameters": "x"}}]}),
                         ("tool_choice without tools", {"tool_choice": "required"}),
                         ("tool_choice 5", {"tools": [{"type": "function", "function": {"name": "f"}}],
                                            "tool_choice": 5}),
                         ("tools streamed auto", {"tools": [{"type": "function", "function": {"name": "f"}}],
                                                  "stream": True}),
                         ("tool message, tool_calls 'x'", {"messages": [
                             {"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                                                                 "tool_calls": "x"}]}),
                         ("tool message content null", {"messages": [
                             {"role": "user", "content": "hi"}, {"role": "tool", "content": None}]})]:
        add(name, fields)


def _tokenizer_routes(cases: list) -> None:
    for name, body in [("prompt=5", {"prompt": 5}), ("prompt lone surrogate", {"prompt": "\ud800"}),
                       ("prompt 300 kB", {"prompt": "hi " * 100_000}),
                       ("messages content parts text=5", {"messages": [{"role": "user",
                                                                        "content": [{"type": "text", "text": 5}]}]}),
                       ("messages role=5", {"messages": [{"role": 5, "content": "hi"}]}),
                       ("messages a dict", {"messages": {"role": "user", "content": "hi"}}),
                       ("both", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}),
                       ("neither", {}), ("add_special_tokens='x'", {"prompt": "a", "add_special_tokens": "x"}),
                       ("json array", [])]:
        _json(cases, "POST", "/tokenize", f"tokenize {name}", body)
    for name, tokens in [("[999999]", [999999]), ("[-1]", [-1]), ("[4096]", [VOCAB]), ("[2**63]", [2**63]),
                         ("[10**30]", [10**30]), ("['abc']", ["abc"]), ("[1.5]", [1.5]), ("[NaN]", [NAN]),
                         ("[[1]]", [[1]]), ("'abc'", "abc"), ("null", None)]:
        _json(cases, "POST", "/detokenize", f"detokenize {name}", {"tokens": tokens}, want_4xx=True)
    _json(cases, "POST", "/detokenize", "detokenize 100,000 tokens", {"tokens": [5] * 100_000})
    _json(cases, "POST", "/detokenize", "detokenize no tokens", {}, want_4xx=True)


def _nemo(cases: list) -> None:
    base = {"sentences": [PROMPT], "tokens_to_generate": 4, "greedy": True}

    def add(name, fields=None, body=None, **options):
        _json(cases, "PUT", "/generate", f"nemo {name}", body if body is not None else {**base, **fields}, **options)

    # A batch that fails must not leave its siblings generating: 512 forced tokens each would take seconds.
    siblings = {"tokens_to_generate": 512, "min_tokens_to_generate": 512, "end_strings": []}
    add("one too-long sentence among 8", {**siblings, "sentences": [PROMPT] * 8 + [LONG]}, want_4xx=True, settle=1.0)
    add("one too-long sentence first of 9", {**siblings, "sentences": [LONG] + [PROMPT] * 8}, want_4xx=True,
        settle=1.0)
    add("tokens_to_generate=10**9 end_strings=[\\n]", {"tokens_to_generate": 10**9, "end_strings": ["\n"]})
    add("tokens_to_generate=10**9 sampled", {"tokens_to_generate": 10**9, "greedy": False, "top_k": 0,
                                             "top_p": 0.9, "random_seed": 1}, timeout=60, long=True)
    for value in (10**30, 2**63, 0, -1, NAN, INF, 1.5, "4", True, None):
        add(f"tokens_to_generate={value!a}", {"tokens_to_generate": value, "end_strings": ["\n"]})
    for name, fields in [("min_tokens_to_generate > tokens_to_generate", {"min_tokens_to_generate": 10}),
                         ("min_tokens_to_generate=10**9", {"min_tokens_to_generate": 10**9}),
                         ("min_tokens_to_generate=-1", {"min_tokens_to_generate": -1}),
                         ("min_tokens_to_generate=NaN", {"min_tokens_to_generate": NAN})]:
        add(name, fields)
    sampled = {"greedy": False, "random_seed": 1}
    for field, values in [("temperature", (NAN, INF, -INF, 0, -1, 1e308)), ("top_k", (10**30, 2**63, -1, NAN, 1e300)),
                          ("top_p", (NAN, -1, 2, INF)), ("repetition_penalty", (NAN, INF, 0.5, 1e308)),
                          ("random_seed", (2**63, 10**30, -1, NAN, 1.5))]:
        for value in values:
            add(f"{field}={value!a}", {**sampled, field: value})
    add("repetition_penalty=1e308 greedy", {"repetition_penalty": 1e308})
    add("10,000 end_strings", {"end_strings": [f"x{i}" for i in range(10_000)]})
    add("1 MB end_string", {"end_strings": ["x" * 1_000_000]})
    for value in ([5], "x", [""], [None], {"a": 1}, ["\ud800"], ["a\udfff"]):
        add(f"end_strings={value!a}", {"end_strings": value})
    for name, sentences in [("10,000 sentences", ["a"] * 10_000), ("129 sentences", ["a"] * 129), ("[]", []),
                            ("['']", [""]), ("[5]", [5]), ("[null]", [None]), ("'abc'", "abc"), ("[[]]", [[]]),
                            ("chat content=5", [[{"role": "user", "content": 5}]]),
                            ("chat content parts text=5",
                             [[{"role": "user", "content": [{"type": "text", "text": 5}]}]]),
                            ("chat no role", [[{"content": "hi"}]]),
                            ("chat role unknown", [[{"role": "x", "content": "hi"}]]),
                            ("chat message a string", [["hi"]]), ("lone surrogate", ["\ud800"]),
                            ("1 MB sentence", ["hi " * 350_000])]:
        add(f"sentences {name}", {"sentences": sentences})
    add("all_probs with 8 sentences", {"sentences": ["a"] * 8, "tokens_to_generate": 8, "all_probs": True})
    add("all_probs with a too-long sentence", {"sentences": ["a", LONG], "all_probs": True}, want_4xx=True)
    for name, fields in [("all_probs='yes'", {"all_probs": "yes"}), ("add_BOS='x'", {"add_BOS": "x"}),
                         ("greedy=1", {"greedy": 1}), ("task_ids", {"task_ids": [1]}),
                         ("neighbors=-1", {"neighbors": -1}), ("neighbors=10**30", {"neighbors": 10**30}),
                         ("5 MB body", {"junk": "a" * 5_000_000})]:
        add(name, fields)
    for name, raw in [("json array", b"[]"), ("json null", b"null"), ("NaN body", b"NaN"), ("empty body", b""),
                      ("Infinity literal", b'{"sentences": ["a"], "tokens_to_generate": Infinity}'),
                      ("invalid utf-8", b'{"sentences": ["\xff"]}')]:
        add(name, body=raw, want_4xx=True)
    cases.append(Hostile("nemo content-type text/plain", "PUT", "/generate", encode(base),
                         {"Content-Type": "text/plain"}))
    cases.append(Hostile("nemo POST instead of PUT", "POST", "/generate", encode(base)))


def _tensor(name, datatype, shape, data):
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def _prompts(*texts):
    return _tensor("prompts", "BYTES", [len(texts), 1], list(texts))


def _triton(cases: list) -> None:
    knobs = [_tensor("max_output_len", "INT64", [1, 1], [4])]

    def add(name, inputs, top=None, **options):
        _json(cases, "POST", INFER, f"triton {name}", {"id": "1", "inputs": inputs, **(top or {})}, **options)

    add("one too-long prompt among 8", [_prompts(*[PROMPT] * 8, LONG),
                                        _tensor("max_output_len", "INT64", [1, 1], [512]),
                                        _tensor("min_output_len", "INT64", [1, 1], [512])], want_4xx=True, settle=1.0)
    add("10,000 prompts", [_tensor("prompts", "BYTES", [10_000, 1], ["a"] * 10_000), *knobs])
    add("shape with 10**12 elements", [_tensor("prompts", "BYTES", [10**6, 10**6], ["a"]), *knobs], want_4xx=True)
    add("shape [-1, 1]", [_tensor("prompts", "BYTES", [-1, 1], ["a"])], want_4xx=True)
    add("shape 'x'", [_tensor("prompts", "BYTES", "x", ["a"])], want_4xx=True)
    add("shape [1.5]", [_tensor("prompts", "BYTES", [1.5], ["a"])], want_4xx=True)
    add("shape [true]", [_tensor("prompts", "BYTES", [True], ["a"])], want_4xx=True)
    add("shape [10**30]", [_tensor("prompts", "BYTES", [10**30], ["a"])], want_4xx=True)
    for name, tensor in [("max_output_len=[10**30]", _tensor("max_output_len", "INT64", [1, 1], [10**30])),
                         ("max_output_len=[2**63]", _tensor("max_output_len", "INT64", [1, 1], [2**63])),
                         ("max_output_len=[-1]", _tensor("max_output_len", "INT64", [1, 1], [-1])),
                         ("max_output_len=[0]", _tensor("max_output_len", "INT64", [1, 1], [0])),
                         ("max_output_len=[NaN]", _tensor("max_output_len", "INT64", [1, 1], [NAN])),
                         ("max_output_len=[1.5]", _tensor("max_output_len", "INT64", [1, 1], [1.5])),
                         ("max_output_len=['4']", _tensor("max_output_len", "INT64", [1, 1], ["4"])),
                         ("max_output_len FP32 [Infinity]", _tensor("max_output_len", "FP32", [1, 1], [INF])),
                         ("max_output_len FP32 [1e30]", _tensor("max_output_len", "FP32", [1, 1], [1e30])),
                         ("max_output_len UINT64 [2**64-1]", _tensor("max_output_len", "UINT64", [1, 1], [2**64 - 1])),
                         ("max_output_len BYTES", _tensor("max_output_len", "BYTES", [1, 1], ["4"])),
                         ("max_output_len empty", _tensor("max_output_len", "INT64", [0], []))]:
        add(name, [_prompts(PROMPT), tensor, _tensor("stop_words_list", "BYTES", [1, 1], ["\n"])])
    for name, tensors in [
            ("min_output_len > max_output_len", [_tensor("max_output_len", "INT64", [1, 1], [2]),
                                                  _tensor("min_output_len", "INT64", [1, 1], [10])]),
            ("min_output_len=[10**9]", [*knobs, _tensor("min_output_len", "INT64", [1, 1], [10**9])]),
            ("min_output_len=[-1]", [*knobs, _tensor("min_output_len", "INT64", [1, 1], [-1])]),
            ("temperature=[NaN]", [*knobs, _tensor("temperature", "FP32", [1, 1], [NAN])]),
            ("temperature=[Infinity]", [*knobs, _tensor("temperature", "FP32", [1, 1], [INF])]),
            ("temperature=[-Infinity]", [*knobs, _tensor("temperature", "FP32", [1, 1], [-INF])]),
            ("temperature FP32 [1e308]", [*knobs, _tensor("temperature", "FP32", [1, 1], [1e308])]),
            ("temperature FP64 [1e308]", [*knobs, _tensor("temperature", "FP64", [1, 1], [1e308])]),
            ("top_k=[2**63-1]", [*knobs, _tensor("top_k", "INT64", [1, 1], [2**63 - 1]),
                                 _tensor("temperature", "FP32", [1, 1], [1.0])]),
            ("top_k UINT64 [2**64-1]", [*knobs, _tensor("top_k", "UINT64", [1, 1], [2**64 - 1]),
                                        _tensor("temperature", "FP32", [1, 1], [1.0])]),
            ("top_p=[NaN]", [*knobs, _tensor("top_p", "FP32", [1, 1], [NAN]), _tensor("top_k", "INT64", [1, 1], [0])]),
            ("random_seed UINT64 [2**64-1]", [*knobs, _tensor("random_seed", "UINT64", [1, 1], [2**64 - 1]),
                                              _tensor("top_k", "INT64", [1, 1], [0])]),
            ("random_seed=[-2**63]", [*knobs, _tensor("random_seed", "INT64", [1, 1], [-(2**63)]),
                                      _tensor("top_k", "INT64", [1, 1], [0])]),
            ("repetition_penalty=[NaN]", [*knobs, _tensor("repetition_penalty", "FP32", [1, 1], [NAN])]),
            ("repetition_penalty=[1e-30]", [*knobs, _tensor("repetition_penalty", "FP32", [1, 1], [1e-30])]),
            ("10,000 stop words", [*knobs, _tensor("stop_words_list", "BYTES", [1, 10_000],
                                                   [f"x{i}" for i in range(10_000)])]),
            ("1 MB stop word", [*knobs, _tensor("stop_words_list", "BYTES", [1, 1], ["x" * 1_000_000])]),
            ("stop_words_list INT64", [*knobs, _tensor("stop_words_list", "INT64", [1, 1], [5])]),
            ("bad_words_list", [*knobs, _tensor("bad_words_list", "BYTES", [1, 1], ["x"])])]:
        add(name, [_prompts(PROMPT), *tensors])
    for name, inputs in [("no inputs", []), ("inputs a dict", {"prompts": ["a"]}), ("inputs null", None),
                         ("datatype WAT", [_tensor("prompts", "WAT", [1, 1], ["a"])]),
                         ("entry without name", [{"datatype": "BYTES", "shape": [1], "data": ["a"]}]),
                         ("entry a string", ["prompts"]), ("prompts INT64", [_tensor("prompts", "INT64", [1, 1], [5])]),
                         ("prompts data [5]", [_tensor("prompts", "BYTES", [1, 1], [5])]),
                         ("prompts data [null]", [_tensor("prompts", "BYTES", [1, 1], [None])]),
                         ("prompts lone surrogate", [_prompts("\ud800")]),
                         ("prompts 1 MB", [_prompts("hi " * 350_000)]),
                         ("parameters a string", [{**_prompts(PROMPT), "parameters": "x"}]),
                         ("shared memory", [{**_prompts(PROMPT), "parameters": {"shared_memory_region": "r"}}])]:
        add(name, inputs, want_4xx=True)
    add("prompts ['']", [_prompts(""), *knobs])  # the checkpoint's BOS alone is a prompt
    add("id=10**30 outputs='x'", [_prompts(PROMPT), *knobs], top={"id": 10**30, "outputs": "x"})
    add("parameters='x'", [_prompts(PROMPT), *knobs], top={"parameters": "x"})
    add("5 MB body", [_prompts(PROMPT), *knobs], top={"junk": "a" * 5_000_000})
    for name, raw in [("json array", b"[]"), ("NaN body", b"NaN"), ("empty body", b""),
                      ("invalid utf-8", b'{"inputs": [{"name": "\xff"}]}')]:
        _json(cases, "POST", INFER, f"triton {name}", raw, want_4xx=True)
    _json(cases, "POST", "/v2/models/no-such-model/infer", "triton unknown model", {"inputs": [_prompts(PROMPT)]},
          want_4xx=True)
    _triton_binary(cases)


def _bytes_entry(name="prompts", shape=(1, 1)):
    return {"name": name, "datatype": "BYTES", "shape": list(shape)}


def _triton_binary(cases: list) -> None:
    prompt = encode_bytes([PROMPT.encode()])
    max_len = ({"name": "max_output_len", "datatype": "INT64", "shape": [1, 1]}, struct.pack("<q", 4))

    def add(name, entries, extra=b"", length=None, want_4xx=True, top=None, settle=5.0):
        body, headers = binary_body(entries, extra, length, top)
        cases.append(Hostile(f"triton binary {name}", "POST", INFER, body, headers, want_4xx=want_4xx, settle=settle))

    header_size = len(binary_body([(_bytes_entry(), prompt), max_len])[0]) - len(prompt) - 8
    for name, length in [("header length > body", str(10**6)), ("header length = body + 1", str(header_size + 21)),
                         ("header length mid-JSON", str(header_size // 2)),
                         ("header length 1 short", str(header_size - 1)),
                         ("header length 1 long", str(header_size + 1)), ("header length negative", "-5"),
                         ("header length 'abc'", "abc"), ("header length ''", ""), ("header length 1e3", "1e3"),
                         ("header length 10**30", str(10**30)), ("header length 0", "0"),
                         ("header length 0x10", "0x10")]:
        add(name, [(_bytes_entry(), prompt), max_len], length=length)
    add("binary_data_size > buffer", [({**_bytes_entry(), "parameters": {"binary_data_size": 10**6}}, prompt), max_len])
    add("binary_data_size < buffer", [({**_bytes_entry(), "parameters": {"binary_data_size": 4}}, prompt), max_len])
    for value in (-1, "8", 8.0, True, 10**30, None):
        add(f"binary_data_size={value!a}", [({**_bytes_entry(), "parameters": {"binary_data_size": value}}, prompt)])
    add("trailing bytes", [(_bytes_entry(), prompt), max_len], extra=b"junk")
    add("INT64 [1,1] with 4 bytes", [(_bytes_entry(), prompt),
                                     ({"name": "max_output_len", "datatype": "INT64", "shape": [1, 1]}, b"\x04\0\0\0")])
    add("FP32 [2] with 4 bytes", [(_bytes_entry(), prompt),
                                  ({"name": "temperature", "datatype": "FP32", "shape": [2]}, struct.pack("<f", 1.0))])
    add("BOOL [1] with 2 bytes", [(_bytes_entry(), prompt),
                                  ({"name": "use_greedy", "datatype": "BOOL", "shape": [1]}, b"\x01\x01")])
    add("INT64 shape with 10**12 elements", [(_bytes_entry(), prompt),
                                             ({"name": "max_output_len", "datatype": "INT64", "shape": [10**6, 10**6]},
                                              struct.pack("<q", 4))])
    add("BYTES shape with 10**12 elements", [(_bytes_entry(shape=(10**6, 10**6)), prompt)])
    add("BYTES shape [10**12] no data",
        [({**_bytes_entry(shape=(10**12,)), "parameters": {"binary_data_size": 0}}, b"")])
    add("BYTES length prefix beyond buffer", [(_bytes_entry(), struct.pack("<I", 10**6) + b"x")])
    add("BYTES length prefix 2**32-1", [(_bytes_entry(), struct.pack("<I", 2**32 - 1) + b"abc")])
    add("BYTES prefix cut short", [(_bytes_entry(), b"\x05\x00")])
    add("BYTES invalid utf-8", [(_bytes_entry(), encode_bytes([b"\xff\xfe"]))])
    add("BYTES 2 elements for shape [1,1]", [(_bytes_entry(), encode_bytes([b"a", b"b"]))])
    add("temperature FP32 NaN bytes", [(_bytes_entry(), prompt),
                                       ({"name": "temperature", "datatype": "FP32", "shape": [1, 1]},
                                        struct.pack("<f", NAN))])
    add("max_output_len INT64 2**63-1", [(_bytes_entry(), prompt),
                                         ({"name": "max_output_len", "datatype": "INT64", "shape": [1, 1]},
                                          struct.pack("<q", 2**63 - 1)),
                                         (_bytes_entry("stop_words_list"), encode_bytes([b"\n"]))], want_4xx=False)
    add("min_output_len INT64 -1", [(_bytes_entry(), prompt), max_len,
                                    ({"name": "min_output_len", "datatype": "INT64", "shape": [1, 1]},
                                     struct.pack("<q", -1))])
    add("use_greedy BOOL byte 0xff", [(_bytes_entry(), prompt), max_len,
                                      ({"name": "use_greedy", "datatype": "BOOL", "shape": [1, 1]}, b"\xff")],
        want_4xx=False)
    add("one too-long prompt among 8", [(_bytes_entry(shape=(9, 1)),
                                         encode_bytes([PROMPT.encode()] * 8 + [LONG.encode()])),
                                        ({"name": "max_output_len", "datatype": "INT64", "shape": [1, 1]},
                                         struct.pack("<q", 512)),
                                        ({"name": "min_output_len", "datatype": "INT64", "shape": [1, 1]},
                                         struct.pack("<q", 512))], settle=1.0)
    cases.append(Hostile("triton binary header but JSON content-type", "POST", INFER,
                         binary_body([(_bytes_entry(), prompt), max_len])[0], dict(JSON_TYPE), want_4xx=True))
    _, headers = binary_body([(_bytes_entry(), prompt)])
    cases.append(Hostile("triton binary header is a JSON array", "POST", INFER, b"[]" + prompt,
                         {**headers, HEADER_LENGTH: "2"}, want_4xx=True))


def _body_limits(cases: list) -> None:
    """Bodies beyond the server's request size limit (16 MiB by default), with and without a Content-Length."""
    junk = "a" * 20_000_000
    for method, path, document in [
            ("POST", "/v1/completions", {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1, "junk": junk}),
            ("PUT", "/generate", {"sentences": [PROMPT], "tokens_to_generate": 1, "junk": junk}),
            ("POST", INFER, {"inputs": [_prompts(PROMPT)], "junk": junk})]:
        for chunked in (False, True):
            cases.append(Hostile(f"{path} 20 MB body{' chunked' if chunked else ''}", method, path, encode(document),
                                 want_4xx=True, chunked=chunked))
    cases.append(Hostile("/v1/completions small body chunked", "POST", "/v1/completions",
                         encode({"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1}), chunked=True))


def generation_cases() -> list[Hostile]:
    """Every hostile case for a server over the demo language model."""
    cases: list[Hostile] = []
    _completions(cases)
    _chat(cases)
    _tokenizer_routes(cases)
    _nemo(cases)
    _triton(cases)
    _body_limits(cases)
    _json(cases, "POST", "/v1/reward", "reward route on a language model", {"messages": REFERENCE_CONVERSATION},
          want_4xx=True)
    ids = [case.id for case in cases]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    return cases


def reward_cases() -> list[Hostile]:
    """Hostile cases for a server over the demo reward model (/v1/reward, chat, Triton ``reward_model``)."""
    cases: list[Hostile] = []
    conversation = REFERENCE_CONVERSATION

    def add(name, body, path="/v1/reward", method="POST", **options):
        _json(cases, method, path, f"reward {name}", body, **options)

    def tokens(data, datatype="INT64", shape=None, lengths=None):
        shape = shape or [len(data), len(data[0]) if data and isinstance(data[0], list) else 1]
        lengths = lengths if lengths is not None else [len(row) if isinstance(row, list) else 1 for row in data]
        return {"inputs": [_tensor("tokens", datatype, shape, data),
                           _tensor("sequence_lengths", "INT64", [len(lengths)], lengths)]}

    for name, data in [("[[999999]]", [[999999]]), ("[[-1]]", [[-1]]), ("[[4096]]", [[VOCAB]]),
                       ("[[2**63-1]]", [[2**63 - 1]]), ("[[5, 999999]]", [[5, 999999]]),
                       ("[[5, 6], [7, -1]]", [[5, 6], [7, -1]])]:
        add(f"triton tokens={name}", tokens(data), REWARD_INFER, want_4xx=True)
    add("triton tokens UINT64 [[2**64-1]]", tokens([[2**64 - 1]], "UINT64"), REWARD_INFER, want_4xx=True)
    add("triton tokens FP32 [[1.5]]", tokens([[1.5]], "FP32"), REWARD_INFER, want_4xx=True)
    add("triton tokens [[10**30]]", tokens([[10**30]]), REWARD_INFER, want_4xx=True)
    add("triton tokens 2,000 long", tokens([[5] * 2000]), REWARD_INFER, want_4xx=True)
    for name, lengths in [("[0]", [0]), ("[10**12]", [10**12]), ("[-1]", [-1]), ("two for one row", [1, 1]),
                          ("[]", [])]:
        add(f"triton sequence_lengths={name}", tokens([[5, 6]], lengths=lengths), REWARD_INFER, want_4xx=True)
    add("triton tokens 1-d", {"inputs": [_tensor("tokens", "INT64", [2], [5, 6]),
                                         _tensor("sequence_lengths", "INT64", [1], [2])]}, REWARD_INFER, want_4xx=True)
    add("triton tokens without lengths", {"inputs": [_tensor("tokens", "INT64", [1, 2], [5, 6])]}, REWARD_INFER,
        want_4xx=True)
    add("triton sentences lone surrogate", {"inputs": [_tensor("sentences", "BYTES", [1, 1], ["\ud800"])]},
        REWARD_INFER, want_4xx=True)
    add("triton 10,000 sentences", {"inputs": [_tensor("sentences", "BYTES", [10_000, 1], ["a"] * 10_000)]},
        REWARD_INFER, want_4xx=True)
    add("triton sentences ['']", {"inputs": [_tensor("sentences", "BYTES", [1, 1], [""])]}, REWARD_INFER, want_4xx=True)
    lengths = ({"name": "sequence_lengths", "datatype": "INT64", "shape": [1]}, struct.pack("<q", 2))
    for name, buffer in [("tokens [[5, 999999]]", struct.pack("<2q", 5, 999999)),
                         ("tokens short", struct.pack("<q", 5))]:
        body, headers = binary_body([({"name": "tokens", "datatype": "INT64", "shape": [1, 2]}, buffer), lengths])
        cases.append(Hostile(f"reward triton binary {name}", "POST", REWARD_INFER, body, headers, want_4xx=True))
    parts = [{"role": "user", "content": [{"type": "text", "text": 5}]}, conversation[1]]
    add("content parts text=5", {"messages": parts})
    add("content a dict", {"messages": [conversation[0], {"role": "assistant", "content": {"a": 1}}]})
    add("role unknown", {"messages": [{"role": "wizard", "content": "x"}, conversation[1]]})
    add("last message not assistant", {"messages": conversation[:1]})
    add("10,000 conversations", {"conversations": [conversation] * 10_000}, want_4xx=True)
    add("conversation 10,000 messages long", {"messages": conversation * 5_000}, want_4xx=True)
    add("messages and conversations", {"messages": conversation, "conversations": [conversation]}, want_4xx=True)
    for value in ([NAN] * 9, [INF] * 9, {"quality": NAN}, [1.0] * 100, {"nope": 1.0}, "x", [10**30] * 9, [],
                  [1e308] * 9, {"helpfulness": 1e308, "correctness": 1e308}, [-1e308] * 9):
        add(f"attribute_weights={ascii(value)[:30]}", {"messages": conversation, "attribute_weights": value})
    add("model=5", {"messages": conversation, "model": 5})
    chat = "/v1/chat/completions"
    add("chat n=10**6", {"messages": conversation, "n": 10**6}, chat, want_4xx=True)
    add("chat stream", {"messages": conversation, "stream": True}, chat)
    add("chat content parts text=5", {"messages": parts}, chat)
    add("chat top_logprobs=100", {"messages": conversation, "logprobs": True, "top_logprobs": 100}, chat)
    add("generate on a reward model", {"sentences": ["a"], "tokens_to_generate": 4}, "/generate", method="PUT")
    add("completions on a reward model", {"prompt": "a", "max_tokens": 4}, "/v1/completions", want_4xx=True)
    ids = [case.id for case in cases]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    return cases
