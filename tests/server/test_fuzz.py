"""Malformed requests against every input route: the server must answer each with a 2xx or a 4xx that
carries a JSON error message, never a 5xx, and must be healthy (and idle) afterwards.

Cases come from a seeded generator (``build_cases(SEED)``), so every run sends the same bytes; a
failure prints each kind of bad answer with the method, path, headers and (shortened) body of the
requests that got it. The server is the ``live_server`` setup (same app, model, dtype and engine
settings) but on an engine of its own: a case that kills the engine must fail this test only, not
every server test that runs after it in the session.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import random

import pytest
import requests

from nemolite.engine.async_llm import AsyncLLM
from nemolite.engine.sampling_params import SamplingParams

from tests.conftest import DEVICE
from tests.server.conftest import MODEL_NAME, start_server, stop_server, wait_until_idle

SEED = 20240611
CASES_PER_ROUTE = 60
TIMEOUT = 60
PROMPT = "def f():"


@dataclasses.dataclass
class Case:
    method: str
    path: str
    body: bytes
    headers: dict
    label: str

    def describe(self) -> str:
        body = self.body[:160] + (b"..." if len(self.body) > 160 else b"")
        return f"{self.label}: {self.method} {self.path} {self.headers} {body!r} ({len(self.body)} bytes)"


def _long_prompt() -> str:
    return "Return the square root of x. " * 400  # about 3,000 tokens: beyond the 1,024-token context


def _deep(depth: int, leaf="x") -> object:
    value: object = leaf
    for _ in range(depth):
        value = [value]
    return value


# Values that are wrong for (nearly) every field; each is tried in place of a valid one.
BAD_VALUES = [
    None, True, False, 0, -1, -(10**30), 10**30, 2**63, -(2**63) - 1, 1.5, -0.0, 1e308, -1e308,
    math.nan, math.inf, -math.inf, "", "x", "1", "nan", "\x00", "\ud800", "é" * 3, "x" * 100_000,
    [], [None], [1, "a"], [[]], [[-1]], [10**30], {}, {"a": 1}, {"": None}, _deep(200), [PROMPT] * 200,
    10**6, 1000, 128, 129, 21, 4096, 1024, 1023,
]


def _encode(value: object) -> bytes:
    # allow_nan writes the NaN / Infinity literals that Python's json module (and so the server) reads
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


ROUTES = {
    ("PUT", "/generate"): {
        "sentences": [PROMPT], "tokens_to_generate": 4, "greedy": True, "temperature": 1.0, "top_k": 0,
        "top_p": 0.9, "add_BOS": False, "all_probs": False, "compute_logprob": True, "repetition_penalty": 1.0,
        "min_tokens_to_generate": 0, "end_strings": ["\n"], "random_seed": 1, "neighbors": None, "task_ids": None,
    },
    ("POST", "/v1/completions"): {
        "model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "top_p": 1.0, "top_k": -1,
        "min_p": 0.0, "n": 1, "stop": ["\n\n"], "seed": 1, "logprobs": 2, "echo": False, "stream": False,
        "min_tokens": 0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
        "ignore_eos": False, "stop_token_ids": [], "best_of": None, "suffix": None, "logit_bias": None,
        "stream_options": None, "user": "fuzz",
    },
    ("POST", "/v1/chat/completions"): {
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "What does len do?"}], "max_tokens": 4,
        "max_completion_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2, "n": 1,
        "stop": None, "seed": 1, "stream": False, "add_generation_prompt": True, "top_p": 1.0, "top_k": 0,
    },
    ("POST", "/tokenize"): {"prompt": PROMPT, "add_special_tokens": True},
    ("POST", "/detokenize"): {"tokens": [1012, 1398, 330]},
    ("POST", f"/v2/models/{MODEL_NAME}/infer"): {
        "id": "0", "inputs": [
            {"name": "prompts", "shape": [1, 1], "datatype": "BYTES", "data": [PROMPT]},
            {"name": "max_output_len", "shape": [1, 1], "datatype": "INT64", "data": [4]},
            {"name": "temperature", "shape": [1, 1], "datatype": "FP32", "data": [1.0]},
            {"name": "top_k", "shape": [1, 1], "datatype": "INT64", "data": [1]},
        ],
        "outputs": [{"name": "outputs"}],
    },
}

# The budget fields whose absence means "up to the context": ~1,000 decode steps on CPU, valid but slow.
NO_NONE = {"max_tokens", "max_completion_tokens"}


def _paths(value, prefix=()):
    """Every (path, value) inside a JSON value, so nested fields (messages[0].role, inputs[1].data) get fuzzed."""
    yield prefix, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _replace(document, path, new):
    if not path:
        return new
    copy = json.loads(json.dumps(document))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return copy


def _raw_bodies(rng: random.Random, base: dict) -> list[tuple[str, bytes]]:
    valid = _encode(base)
    cut = rng.randrange(1, len(valid) - 1)
    return [
        ("empty", b""),
        ("random bytes", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))),
        ("truncated json", valid[:cut]),
        ("invalid utf-8", valid[:-2] + b'\xff\xfe"}'),
        ("invalid utf-8 in string", valid.replace(b'"' + PROMPT.encode()[:3], b'"\xc3\x28', 1)),
        ("lone surrogate escape", valid.replace(PROMPT.encode(), b"\\ud800", 1)),
        ("deep array", b"[" * 100_000 + b"]" * 100_000),
        ("deep object", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
        ("deep array in field", valid[:-1] + b', "extra": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        ("NaN literal", b'{"sentences": NaN, "prompt": NaN, "tokens": NaN, "messages": NaN}'),
        ("Infinity literal", valid[:-1] + b', "max_tokens": Infinity, "tokens_to_generate": -Infinity}'),
        ("huge number literal", valid[:-1] + b', "n": 1' + b"0" * 5000 + b"}"),
        ("huge exponent", valid[:-1] + b', "temperature": 1e999999}'),
        ("json array", b"[1, 2, 3]"),
        ("json string", b'"hello"'),
        ("json null", b"null"),
        ("json number", b"42"),
        ("duplicate keys", valid[:-1] + b', "prompt": 5, "sentences": 5}'),
        ("trailing garbage", valid + b"garbage"),
        ("two documents", valid + valid),
        ("bom", b"\xef\xbb\xbf" + valid),
        ("huge body", valid[:-1] + b', "junk": "' + b"a" * 5_000_000 + b'"}'),
    ]


def _field_cases(rng: random.Random, base: dict) -> list[tuple[str, bytes]]:
    cases = []
    paths = [path for path, _ in _paths(base) if path]
    for _ in range(CASES_PER_ROUTE):
        path = rng.choice(paths)
        value = rng.choice(BAD_VALUES)
        if path[-1] in NO_NONE and value is None:
            value = 10**9
        cases.append((f"{'.'.join(map(str, path))}={ascii(value)[:24]}", _encode(_replace(base, path, value))))
    for key in base:  # every field missing, one at a time
        if key in NO_NONE:
            continue
        cases.append((f"without {key}", _encode({k: v for k, v in base.items() if k != key})))
    unknown = dict(base, unknown_field=[1, {"x": None}], **{"": 1, "\u00e9\u00e9": "x"})
    cases.append(("unknown fields", _encode(unknown)))
    return cases


def _semantic_cases(path: str) -> list[tuple[str, dict]]:
    """Well-formed JSON whose values are out of range for this model (context 1,024, vocabulary 4,096)."""
    long = _long_prompt()
    if path == "/generate":
        return [("empty sentence", {"sentences": [""], "tokens_to_generate": 2}),
                ("empty sentences", {"sentences": []}),
                ("129 sentences", {"sentences": ["a"] * 129, "tokens_to_generate": 1}),
                ("long sentence", {"sentences": [long], "tokens_to_generate": 4}),
                ("tokens_to_generate 10**30", {"sentences": [PROMPT], "tokens_to_generate": 10**30,
                                               "end_strings": ["\n", " "], "greedy": True}),
                ("top_k 10**30", {"sentences": [PROMPT], "tokens_to_generate": 2, "top_k": 10**30}),
                ("top_k 1e300", {"sentences": [PROMPT], "tokens_to_generate": 2, "top_k": 1e300}),
                ("random_seed 10**30", {"sentences": [PROMPT], "tokens_to_generate": 2, "random_seed": 10**30}),
                ("repetition_penalty 1e300", {"sentences": [PROMPT], "tokens_to_generate": 2,
                                              "repetition_penalty": 1e300}),
                ("repetition_penalty 1.5", {"sentences": [PROMPT], "tokens_to_generate": 2,
                                            "repetition_penalty": 1.5}),
                ("temperature 1e-300", {"sentences": [PROMPT], "tokens_to_generate": 2, "temperature": 1e-300}),
                ("min_tokens 10**30", {"sentences": [PROMPT], "tokens_to_generate": 2,
                                       "min_tokens_to_generate": 10**30}),
                ("chat sentence", {"sentences": [[{"role": "user", "content": 5}]], "tokens_to_generate": 2}),
                ("chat sentence no role", {"sentences": [[{"content": "hi"}]], "tokens_to_generate": 2}),
                ("end_strings huge", {"sentences": [PROMPT], "tokens_to_generate": 2, "end_strings": ["x" * 10**5]})]
    if path == "/v1/completions":
        base = {"model": MODEL_NAME, "max_tokens": 4, "temperature": 0}
        return [(name, {**base, **fields}) for name, fields in [
            ("empty prompt", {"prompt": ""}), ("empty list", {"prompt": []}), ("empty token list", {"prompt": [[]]}),
            ("long prompt", {"prompt": long}), ("long token prompt", {"prompt": [[5] * 2000]}),
            ("max_tokens 10**30", {"prompt": PROMPT, "max_tokens": 10**30}),
            ("max_tokens 100000", {"prompt": PROMPT, "max_tokens": 100_000}),
            ("max_tokens 1021", {"prompt": PROMPT, "max_tokens": 1021}),
            ("n 10**6", {"prompt": PROMPT, "n": 10**6}), ("logprobs 1000", {"prompt": PROMPT, "logprobs": 1000}),
            ("echo logprobs 1000", {"prompt": PROMPT, "echo": True, "logprobs": 1000, "max_tokens": 0}),
            ("token id -1", {"prompt": [-1]}), ("token id vocab", {"prompt": [4096]}),
            ("token id 10**30", {"prompt": [10**30]}), ("token id float", {"prompt": [1.5]}),
            ("token id bool", {"prompt": [True, False]}), ("mixed prompt", {"prompt": ["a", [1, 2]]}),
            ("seed 2**64", {"prompt": PROMPT, "seed": 2**64}), ("best_of 2", {"prompt": PROMPT, "best_of": 2}),
            ("stop 1000 strings", {"prompt": PROMPT, "stop": ["x"] * 1000}),
            ("stop huge", {"prompt": PROMPT, "stop": "y" * 10**5}),
            ("stop_token_ids bad", {"prompt": PROMPT, "stop_token_ids": [-5, 10**30]}),
            ("logit_bias", {"prompt": PROMPT, "logit_bias": {"5": 100}}),
            ("model unknown", {"prompt": PROMPT, "model": "gpt-4"}),
            ("n 128 echo", {"prompt": PROMPT, "n": 128, "max_tokens": 1, "echo": True, "logprobs": 20}),
            ("stream echo logprobs", {"prompt": PROMPT, "stream": True, "echo": True, "logprobs": 1}),
            ("stream n 3", {"prompt": [PROMPT, PROMPT], "stream": True, "n": 3, "logprobs": 0,
                            "stream_options": {"include_usage": True}}),
            ("stream_options bad", {"prompt": PROMPT, "stream": True, "stream_options": {"include_usage": "x"}}),
            ("many prompts", {"prompt": [PROMPT] * 300, "max_tokens": 1}),
            ("top_k 10**30", {"prompt": PROMPT, "top_k": 10**30, "temperature": 1}),
            ("repetition_penalty 1.5", {"prompt": PROMPT, "repetition_penalty": 1.5}),
            ("presence_penalty 1.5", {"prompt": PROMPT, "presence_penalty": 1.5}),
            ("frequency_penalty -2", {"prompt": PROMPT, "frequency_penalty": -2}),
            ("min_tokens 10**30", {"prompt": PROMPT, "min_tokens": 10**30}),
        ]]
    if path == "/v1/chat/completions":
        base = {"model": MODEL_NAME, "max_tokens": 4, "temperature": 0}
        hello = [{"role": "user", "content": "hi"}]
        return [(name, {**base, **fields}) for name, fields in [
            ("no messages", {"messages": []}), ("message not object", {"messages": ["hi"]}),
            ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}),
            ("content null", {"messages": [{"role": "user", "content": None}]}),
            ("content parts", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
            ("content image", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}),
            ("content parts bad", {"messages": [{"role": "user", "content": [{"type": 5}]}]}),
            ("long message", {"messages": [{"role": "user", "content": long}]}),
            ("max_tokens 10**30", {"messages": hello, "max_tokens": 10**30}),
            ("max_completion_tokens 0", {"messages": hello, "max_completion_tokens": 0}),
            ("n 10**6", {"messages": hello, "n": 10**6}),
            ("top_logprobs 1000", {"messages": hello, "logprobs": True, "top_logprobs": 1000}),
            ("top_logprobs without logprobs", {"messages": hello, "top_logprobs": 3}),
            ("stream n 2 logprobs", {"messages": hello, "stream": True, "n": 2, "logprobs": True, "top_logprobs": 2}),
            ("tools", {"messages": hello, "tools": [{"type": "function"}], "tool_choice": "auto"}),
            ("response_format", {"messages": hello, "response_format": {"type": "json_object"}}),
            ("top_k 10**30", {"messages": hello, "top_k": 10**30, "temperature": 1}),
            ("repetition_penalty 2", {"messages": hello, "repetition_penalty": 2}),
        ]]
    if path == "/tokenize":
        return [("both", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}), ("neither", {}),
                ("long", {"prompt": long}), ("empty", {"prompt": ""}), ("messages bad", {"messages": [{"role": 1}]}),
                ("messages empty", {"messages": []})]
    if path == "/detokenize":
        return [("empty", {"tokens": []}), ("negative", {"tokens": [-1]}), ("vocab", {"tokens": [4096]}),
                ("huge", {"tokens": [10**30]}), ("floats", {"tokens": [1.5]}), ("many", {"tokens": [5] * 100_000}),
                ("nested", {"tokens": [[1, 2]]}), ("strings", {"tokens": ["a"]})]
    infer = []
    for name, inputs in [
        ("no inputs", []), ("inputs not list", "x"), ("prompt shape mismatch",
                                                       [{"name": "prompts", "shape": [5, 1], "datatype": "BYTES",
                                                         "data": [PROMPT]}]),
        ("prompt wrong dtype", [{"name": "prompts", "shape": [1, 1], "datatype": "INT64", "data": [1]}]),
        ("prompt unknown dtype", [{"name": "prompts", "shape": [1, 1], "datatype": "WAT", "data": [PROMPT]}]),
        ("negative shape", [{"name": "prompts", "shape": [-1, 1], "datatype": "BYTES", "data": [PROMPT]}]),
        ("huge shape", [{"name": "prompts", "shape": [10**30, 1], "datatype": "BYTES", "data": [PROMPT]}]),
        ("binary size lie", [{"name": "prompts", "shape": [1, 1], "datatype": "BYTES",
                              "parameters": {"binary_data_size": 10**9}}]),
        ("long prompt", [{"name": "prompts", "shape": [1, 1], "datatype": "BYTES", "data": [long]},
                         {"name": "max_output_len", "shape": [1, 1], "datatype": "INT64", "data": [4]}]),
        ("max_output_len huge", [{"name": "prompts", "shape": [1, 1], "datatype": "BYTES", "data": [PROMPT]},
                                 {"name": "max_output_len", "shape": [1, 1], "datatype": "INT64", "data": [10**30]}]),
        ("max_output_len negative", [{"name": "prompts", "shape": [1, 1], "datatype": "BYTES", "data": [PROMPT]},
                                     {"name": "max_output_len", "shape": [1, 1], "datatype": "INT64", "data": [-4]}]),
        ("temperature NaN", [{"name": "prompts", "shape": [1, 1], "datatype": "BYTES", "data": [PROMPT]},
                             {"name": "temperature", "shape": [1, 1], "datatype": "FP32", "data": [math.nan]}]),
        ("random_seed huge", [{"name": "prompts", "shape": [1, 1], "datatype": "BYTES", "data": [PROMPT]},
                              {"name": "max_output_len", "shape": [1, 1], "datatype": "INT64", "data": [2]},
                              {"name": "random_seed", "shape": [1, 1], "datatype": "INT64", "data": [10**30]}]),
        ("top_k huge", [{"name": "prompts", "shape": [1, 1], "datatype": "BYTES", "data": [PROMPT]},
                        {"name": "max_output_len", "shape": [1, 1], "datatype": "INT64", "data": [2]},
                        {"name": "temperature", "shape": [1, 1], "datatype": "FP32", "data": [1.0]},
                        {"name": "top_k", "shape": [1, 1], "datatype": "INT64", "data": [10**30]}]),
        ("repetition_penalty 1.5", [{"name": "prompts", "shape": [1, 1], "datatype": "BYTES", "data": [PROMPT]},
                                    {"name": "max_output_len", "shape": [1, 1], "datatype": "INT64", "data": [2]},
                                    {"name": "repetition_penalty", "shape": [1, 1], "datatype": "FP32",
                                     "data": [1.5]}]),
    ]:
        infer.append((name, {"id": "0", "inputs": inputs}))
    return infer


def _binary_infer_cases(rng: random.Random, path: str) -> list[Case]:
    """KServe v2 binary extension: a JSON header whose length is in Inference-Header-Content-Length."""
    header = _encode({"id": "0", "inputs": [{"name": "prompts", "shape": [1, 1], "datatype": "BYTES",
                                             "parameters": {"binary_data_size": 4 + len(PROMPT)}}]})
    payload = len(PROMPT).to_bytes(4, "little") + PROMPT.encode()
    cases = []
    for name, length, body in [
        ("length too big", str(len(header) + 10**6), header + payload),
        ("length negative", "-5", header + payload),
        ("length not a number", "abc", header + payload),
        ("length zero", "0", header + payload),
        ("length mid-json", str(len(header) // 2), header + payload),
        ("buffer truncated", str(len(header)), header + payload[:3]),
        ("buffer length lies", str(len(header)), header + (10**6).to_bytes(4, "little") + b"x"),
        ("random buffer", str(len(header)), header + bytes(rng.randrange(256) for _ in range(40))),
        ("length 10**30", str(10**30), header + payload),
    ]:
        cases.append(Case("POST", path, body, {"Content-Type": "application/octet-stream",
                                               "Inference-Header-Content-Length": length}, f"binary {name}"))
    return cases


def build_cases(seed: int = SEED) -> list[Case]:
    rng = random.Random(seed)
    cases: list[Case] = []
    json_header = {"Content-Type": "application/json"}
    for (method, path), base in ROUTES.items():
        for name, body in _raw_bodies(rng, base) + _field_cases(rng, base):
            cases.append(Case(method, path, body, json_header, name))
        for name, document in _semantic_cases(path):
            cases.append(Case(method, path, _encode(document), json_header, name))
        valid = _encode(base)
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
            headers = {} if content_type is None else {"Content-Type": content_type}
            cases.append(Case(method, path, valid, headers, f"content-type {content_type}"))
        wrong = "GET" if method != "GET" else "DELETE"
        cases.append(Case(wrong, path, valid, json_header, f"method {wrong}"))
    cases += _binary_infer_cases(rng, f"/v2/models/{MODEL_NAME}/infer")
    cases.append(Case("POST", "/v2/models/no-such-model/infer", _encode(ROUTES[("POST", f"/v2/models/{MODEL_NAME}/infer")]),
                      {"Content-Type": "application/json"}, "unknown triton model"))
    rng.shuffle(cases)
    return cases


def _problem(case: Case, response: requests.Response) -> str | None:
    """Why this answer breaks the contract, or None."""
    status = response.status_code
    if status >= 500:
        return f"HTTP {status}: {response.text[:200]!r}"
    if case.path.startswith("/v2/") and status in (404, 405):
        return None  # the Triton routes may not be written yet
    if 400 <= status < 500:
        try:
            body = response.json()
        except ValueError:
            return f"HTTP {status} without a JSON body: {response.text[:200]!r}"
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        if not isinstance(message, str) or not message.strip():
            return f"HTTP {status} without an error message: {response.text[:200]!r}"
        return None
    if status == 200 and response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return f"stream does not end with [DONE]: {response.text[-200:]!r}"
        for event in events[:-1]:
            if '"server_error"' in event or '"code": 500' in event:
                return f"stream carries a server error: {event[:300]}"
    return None


def _send(url: str, case: Case) -> tuple[Case, str | None]:
    try:
        response = requests.request(case.method, url + case.path, data=case.body, headers=case.headers,
                                    timeout=TIMEOUT)
    except requests.RequestException as error:
        return case, f"no answer: {error!r}"
    return case, _problem(case, response)


def _report(problems: list[tuple[Case, str]], total: int, engine: AsyncLLM) -> str:
    """One paragraph per kind of bad answer (the problem's first words), with a few of its requests."""
    kinds: dict[str, list[str]] = {}
    for case, problem in problems:
        kinds.setdefault(problem[:70], []).append(f"{problem[:300]}\n        <- {case.describe()}")
    lines = [f"{len(problems)} of {total} requests broke the contract"]
    if engine.dead is not None:
        lines.append(f"THE ENGINE DIED ({engine.dead!r}); every later request got 503")
    for kind, examples in kinds.items():
        lines.append(f"--- {len(examples)} x {kind}")
        lines += [f"    {example}" for example in examples[:3]]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def fuzz_server():
    engine = AsyncLLM(None, dtype="float32", device=DEVICE, max_num_seqs=32, kv_cache_gb=0.2)
    live, server, thread = start_server(engine)
    yield live
    stop_server(server, thread)
    engine.shutdown()


def test_fuzz_no_server_errors(fuzz_server, demo_llm, caplog):
    caplog.set_level(logging.CRITICAL, logger="nemolite.server")  # each 500's stack trace; the report names them
    cases = build_cases()
    assert len(cases) >= 300
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda case: _send(fuzz_server.url, case), cases))
    problems = [(case, problem) for case, problem in results if problem is not None]
    if problems:
        pytest.fail(_report(problems, len(cases), fuzz_server.engine), pytrace=False)

    # Still healthy and correct: a greedy request equals the in-process reference, and nothing leaked.
    health = requests.get(f"{fuzz_server.url}/health", timeout=10)
    assert health.status_code == 200, health.text
    prompt = "Return the square root of"
    response = requests.post(f"{fuzz_server.url}/v1/completions", timeout=TIMEOUT, json={
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": 24, "temperature": 0})
    assert response.status_code == 200, response.text
    expected = demo_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert response.json()["choices"][0]["text"] == expected.outputs[0].text
    stats = wait_until_idle(fuzz_server.engine, timeout=30.0)
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_fuzz_cases_are_reproducible():
    first, second = build_cases(SEED), build_cases(SEED)
    assert [(c.method, c.path, c.body, c.headers, c.label) for c in first] == \
        [(c.method, c.path, c.body, c.headers, c.label) for c in second]
