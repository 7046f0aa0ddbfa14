"""Hostile requests over every protocol, the answer contract they must get, and a server that survives them.

Shared by test_hostile.py (one case at a time), test_hostile_under_load.py (the same cases beside 32
streaming clients) and test_property_fuzz.py. The contract for every request, however hostile:

- the status is 2xx or 4xx, never 5xx, and the answer comes within the case's timeout;
- a 4xx body is JSON with a message: OpenAI routes (``/v1/...``, ``/tokenize``, ``/detokenize``) as
  ``{"error": {"message": ...}}``, NeMo and Triton routes as ``{"error": "..."}``;
- a 2xx stream ends with ``[DONE]`` and carries no error event;
- afterwards the engine is idle again (no request left, every KV block free), still answers a small
  greedy request with the reference text, and ``/health`` is 200.

Bodies are bytes written here, not by an HTTP client's JSON encoder: ``NaN``, ``Infinity`` and
``-Infinity`` go out as the JSON literals Python's json module (and so the server) reads, lone
surrogates as ``\\ud800`` escapes, and binary KServe bodies with whatever header lengths a case needs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import requests

from nemolite.demo import DEMO_REWARD_MODEL_PATH
from nemolite.engine.async_llm import AsyncLLM
from nemolite.kserve import HEADER_LENGTH

from tests.conftest import DEVICE
from tests.server.conftest import MODEL_NAME, start_server, stop_server

NAN, INF = math.nan, math.inf
PROMPT = "def f():"
VOCAB = 4096  # the demo models' vocabulary; their context is 1,024 tokens
LONG = "Return the square root of x. " * 400  # about 3,000 tokens: beyond the context
REFERENCE_PROMPT = "Return the square root of"
REFERENCE_TOKENS = 1  # each case is followed by this request: it must stay cheap
REFERENCE_CONVERSATION = [{"role": "user", "content": "What does len do?"},
                          {"role": "assistant", "content": "It counts the items of a list."}]
TIMEOUT = 30.0  # seconds a hostile request may take, unless its case says otherwise
INFER = f"/v2/models/{MODEL_NAME}/infer"
REWARD_INFER = "/v2/models/reward_model/infer"
JSON_TYPE = {"Content-Type": "application/json"}


def encode(value: object) -> bytes:
    """JSON with NaN/Infinity literals and every non-ASCII character (lone surrogates too) escaped."""
    return json.dumps(value, allow_nan=True, ensure_ascii=True).encode("ascii")


@dataclasses.dataclass(frozen=True)
class Hostile:
    id: str
    method: str
    path: str
    body: bytes
    headers: dict = dataclasses.field(default_factory=lambda: dict(JSON_TYPE))
    timeout: float = TIMEOUT
    want_4xx: bool = False  # only a 4xx is right: a 2xx ran what it cannot have understood, or beyond a limit
    settle: float = 5.0  # seconds after the answer by which the engine must be idle again
    long: bool = False  # valid and runs to the context: half a minute in a full batch, so not sent under load
    chunked: bool = False  # send the body with Transfer-Encoding: chunked (no Content-Length)

    def describe(self, limit: int = 300) -> str:
        body = self.body[:limit] + (b"..." if len(self.body) > limit else b"")
        headers = {k: v for k, v in self.headers.items() if k != "Content-Type" or v != "application/json"}
        chunked = ", chunked" if self.chunked else ""
        return f"{self.method} {self.path} {headers or ''} {body!r} ({len(self.body):,} bytes{chunked})"


def is_openai(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize", "/tokenizer_info")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON (RFC 8259): a strict client cannot read it")


def strict_json(text: str | bytes):
    """Parse as a standard JSON reader does: NaN and Infinity are refused, as browsers' JSON.parse does."""
    return json.loads(text, parse_constant=_refuse_constant)


def excerpt(response: requests.Response, limit: int = 300) -> str:
    text = response.content[:limit].decode("utf-8", "replace")
    return f"HTTP {response.status_code} {text!r}" + ("..." if len(response.content) > limit else "")


def answer_problems(path: str, response: requests.Response, want_4xx: bool = False) -> list[str]:
    """Why this answer breaks the contract (empty when it keeps it)."""
    status = response.status_code
    if status >= 500:
        return [f"server error: {excerpt(response)}"]
    if status < 200 or 300 <= status < 400:
        return [f"unexpected status: {excerpt(response)}"]
    if 400 <= status < 500:
        try:
            body = strict_json(response.content)
        except ValueError:
            return [f"4xx without a JSON body: {excerpt(response)}"]
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if is_openai(path) and isinstance(error, dict) else error
        if not isinstance(message, str) or not message.strip():
            form = '{"error": {"message": ...}}' if is_openai(path) else '{"error": "..."}'
            return [f"4xx without an error message in the form {form}: {excerpt(response)}"]
        return []
    problems = [f"a 2xx where only a 4xx is right: {excerpt(response)}"] if want_4xx else []
    content_type = response.headers.get("content-type", "")
    if content_type.startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            problems.append(f"stream does not end with [DONE]: {response.text[-300:]!r}")
        for event in events[:-1]:
            try:
                chunk = strict_json(event)
            except ValueError as error:
                problems.append(f"stream event is not JSON ({error}): {event[:200]!r}")
                break
            if isinstance(chunk, dict) and "error" in chunk:
                problems.append(f"stream carries an error event: {event[:300]}")
                break
    elif content_type.startswith("application/json"):
        try:
            strict_json(response.content)
        except ValueError as error:
            problems.append(f"2xx whose JSON body does not parse ({error}): {excerpt(response)}")
    return problems


def send(url: str, case: Hostile) -> tuple[requests.Response | None, str | None]:
    """The answer, or why there was none (a timeout, a dropped connection)."""
    body = (case.body[at:at + 2**16] for at in range(0, len(case.body), 2**16)) if case.chunked else case.body
    try:
        return requests.request(case.method, url + case.path, data=body, headers=case.headers,
                                timeout=case.timeout), None
    except requests.Timeout:
        return None, f"timeout: no answer within {case.timeout:.0f} s"
    except requests.RequestException as error:
        return None, f"no answer: {error!r}"


# ------------------------------------------------------------------------------------------- the server

class Harness:
    """A server on an engine of its own, started again when a case kills the engine, so that each death
    is blamed on the case that caused it and the cases after it are still tried."""

    def __init__(self, model=None, **engine_args):
        self.model, self.engine_args = model, {"max_num_seqs": 32, "kv_cache_gb": 0.2, **engine_args}
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        self.engine = AsyncLLM(self.model, dtype="float32", device=DEVICE, **self.engine_args)
        self.live, self._server, self._thread = start_server(self.engine)

    @property
    def url(self) -> str:
        return self.live.url

    def idle(self) -> tuple[bool, str]:
        stats = self.engine.stats()
        busy = self.engine.num_requests != 0 or stats["kv_blocks_free"] != stats["kv_blocks_total"]
        held = stats["kv_blocks_total"] - stats["kv_blocks_free"]
        return not busy, (f"{self.engine.num_requests} requests in flight, {held} of {stats['kv_blocks_total']} "
                          f"KV blocks held, {stats['num_running']} running, {stats['num_waiting']} waiting")

    def wait_idle(self, timeout: float) -> str | None:
        """None once idle within ``timeout``, else what is still busy."""
        deadline = time.monotonic() + timeout
        while True:
            idle, state = self.idle()
            if idle:
                return None
            if time.monotonic() > deadline:
                return state
            time.sleep(0.02)

    def ensure_fresh(self) -> None:
        """Start again if the engine died, or if work a previous case left behind will not end."""
        healthy = self.engine.dead is None
        if healthy:
            try:
                healthy = requests.get(f"{self.url}/health", timeout=10).status_code == 200
            except requests.RequestException:
                healthy = False
        if healthy and self.wait_idle(60.0) is None:
            return
        self.close()
        self.restarts += 1
        self._start()

    def close(self) -> None:
        stop_server(self._server, self._thread)
        self.engine.shutdown()


def reference_request() -> tuple[str, dict]:
    return "/v1/completions", {"model": MODEL_NAME, "prompt": REFERENCE_PROMPT, "max_tokens": REFERENCE_TOKENS,
                               "temperature": 0}


def health_problems(harness: Harness, expected, settle: float = 5.0, reward: bool = False) -> list[str]:
    """After a hostile request: idle again, a normal request answered as the reference, /health 200."""
    problems = []
    busy = harness.wait_idle(settle)
    if busy is not None:
        problems.append(f"not idle {settle:.0f} s after the answer: {busy}")
    try:
        if reward:
            response = requests.post(f"{harness.url}/v1/reward", timeout=15,
                                     json={"model": MODEL_NAME, "messages": REFERENCE_CONVERSATION})
            got = response.json()["data"][0]["attributes"] if response.status_code == 200 else None
            same = got is not None and got.keys() == expected.keys() and \
                all(abs(got[k] - expected[k]) <= 1e-4 for k in expected)
        else:
            path, body = reference_request()
            response = requests.post(harness.url + path, json=body, timeout=15)
            got = response.json()["choices"][0]["text"] if response.status_code == 200 else None
            same = got == expected
        if not same:
            problems.append(f"the next normal request got {excerpt(response, 200)}, expected {expected!r}")
        health = requests.get(f"{harness.url}/health", timeout=10)
        if health.status_code != 200:
            problems.append(f"/health afterwards: {excerpt(health, 200)}")
    except (requests.RequestException, ValueError, KeyError, IndexError) as error:
        problems.append(f"the next normal request failed: {error!r}")
    if harness.engine.dead is not None:
        problems.insert(0, f"ENGINE DIED: {harness.engine.dead!r} (every later request would get 503)")
    return problems


def run_case(harness: Harness, case: Hostile, expected, reward: bool = False) -> list[str]:
    response, failure = send(harness.url, case)
    problems = [failure] if failure else answer_problems(case.path, response, case.want_4xx)
    return problems + health_problems(harness, expected, case.settle, reward)


def report(case: Hostile, problems: list[str]) -> str:
    lines = [f"{case.id}: {len(problems)} problem(s)", f"  request: {case.describe()}"]
    lines += [f"  - {problem}" for problem in problems]
    return "\n".join(lines)


def start_reward_harness() -> Harness:
    return Harness(DEMO_REWARD_MODEL_PATH, max_num_seqs=16, kv_cache_gb=0.05)


def binary_body(entries: list[tuple[dict, bytes]], extra: bytes = b"", length: str | None = None,
                top: dict | None = None) -> tuple[bytes, dict]:
    """A KServe binary body: each (entry, buffer) gets binary_data_size = len(buffer) unless it says otherwise."""
    inputs = [{**entry, "parameters": {"binary_data_size": len(buffer), **entry.get("parameters", {})}}
              for entry, buffer in entries]
    header = encode({"id": "1", "inputs": inputs, **(top or {})})
    body = header + b"".join(buffer for _, buffer in entries) + extra
    return body, {"Content-Type": "application/octet-stream",
                  HEADER_LENGTH: str(len(header)) if length is None else length}
