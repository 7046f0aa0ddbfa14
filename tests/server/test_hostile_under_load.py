"""The hostile requests of tests/server/hostile_cases.py, sent while 32 well-behaved clients stream completions.

A hostile request must cost its own request only: every well-behaved stream (OpenAI ``/v1/completions``
with ``stream: true``) completes with a finish_reason and ``[DONE]`` and carries no error event, the
hostile requests themselves get 2xx/4xx answers in time, and afterwards the engine is alive and idle
(no request left, every KV block free). Left out: the valid cases that run to the context (``long``),
half a minute each in a full batch on a small CPU and tested one at a time in test_hostile.py.

A batch with one request that cannot run is refused whole, and its siblings must not go on
generating: after the 400 the engine is idle within a second although each sibling asked for 512 tokens.
"""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import struct
import threading
import time

import httpx
import pytest
import requests

from nemolite.kserve import encode_bytes

from tests.server.conftest import MODEL_NAME, wait_until_idle
from tests.server.hostile import (INFER, LONG, PROMPT, VOCAB, answer_problems, binary_body, encode, health_problems, send, strict_json)
from tests.server.hostile_cases import generation_cases

CLIENTS = 32
MAX_TOKENS = 8
MIN_SECONDS, MAX_SECONDS = 10.0, 30.0  # the load lasts at least as long as the hostile requests, within these
MAX_STREAMS_PER_CLIENT = 60
HOSTILE_WORKERS = 8
PROMPTS = ["def f():", "Return the square root of", "import os\n", "The list is empty when", "class A:\n    def",
           "numbers like 42 and", "# read a file\nwith open(", "x = [1, 2,"]


@pytest.fixture(autouse=True)
def quiet_server_logs(caplog):
    caplog.set_level(logging.CRITICAL, logger="nemolite")


def stream_once(http: httpx.Client, url: str, body: dict) -> str | None:
    """One streamed completion; None when it kept the contract, else what went wrong."""
    try:
        with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                return f"HTTP {response.status_code}: {response.read()[:200]!r}"
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    except httpx.HTTPError as error:
        return f"no answer: {error!r}"
    if not events or events[-1] != "[DONE]":
        return f"stream does not end with [DONE]: {events[-3:]!r}"
    finish_reasons = []
    for event in events[:-1]:
        try:
            chunk = strict_json(event)
        except ValueError as error:
            return f"stream event is not JSON ({error}): {event[:200]!r}"
        if "error" in chunk:
            return f"stream carries an error event: {event[:300]}"
        finish_reasons += [c["finish_reason"] for c in chunk.get("choices", []) if c.get("finish_reason")]
    if finish_reasons not in (["length"], ["stop"]):
        return f"stream finished with {finish_reasons!r}, not one 'length' or 'stop': {events[-3:]!r}"
    return None


def well_behaved_client(url: str, index: int, stop: threading.Event, deadline: float, results: list) -> None:
    with httpx.Client(timeout=httpx.Timeout(60.0)) as http:
        for count in range(MAX_STREAMS_PER_CLIENT):
            if stop.is_set() or time.monotonic() > deadline:
                return
            body = {"model": MODEL_NAME, "prompt": PROMPTS[(index + count) % len(PROMPTS)], "max_tokens": MAX_TOKENS,
                    "stream": True, "temperature": 0.8, "seed": index * 1000 + count}
            results.append((index, count, stream_once(http, url, body)))


def test_hostile_requests_beside_streaming_clients(harness, reference):
    cases = [case for case in generation_cases() if not case.long]
    harness.ensure_fresh()
    stop = threading.Event()
    started = time.monotonic()
    results: list = []
    clients = [threading.Thread(target=well_behaved_client, daemon=True,
                                args=(harness.url, index, stop, started + MAX_SECONDS, results))
               for index in range(CLIENTS)]
    for client in clients:
        client.start()
    time.sleep(1.0)  # every client is streaming before the first hostile request
    with concurrent.futures.ThreadPoolExecutor(HOSTILE_WORKERS) as pool:
        answers = list(pool.map(lambda case: (case, *send(harness.url, case)), cases))
    hostile_seconds = time.monotonic() - started
    time.sleep(max(0.0, started + MIN_SECONDS - time.monotonic()))
    stop.set()
    for client in clients:
        client.join(timeout=90)
    died = harness.engine.dead

    lines = []
    bad_streams = [(index, count, problem) for index, count, problem in results if problem is not None]
    if len(results) < CLIENTS * 2:
        lines.append(f"only {len(results)} streams ran in {MIN_SECONDS:.0f}+ s")
    if bad_streams:
        lines.append(f"{len(bad_streams)} of {len(results)} well-behaved streams failed:")
        kinds: dict[str, list] = {}
        for index, count, problem in bad_streams:
            kinds.setdefault(problem[:60], []).append(f"client {index} stream {count}: {problem[:300]}")
        lines += [f"  {len(examples)} x {examples[0]}" for examples in kinds.values()]
    bad_answers = []
    for case, response, failure in answers:
        problems = [failure] if failure else answer_problems(case.path, response, case.want_4xx)
        if problems:
            bad_answers.append(f"  {case.id}: {'; '.join(p[:250] for p in problems)}\n      <- {case.describe(160)}")
    if bad_answers:
        lines.append(f"{len(bad_answers)} of {len(cases)} hostile requests broke the contract under load:")
        lines += bad_answers
    if died is not None:
        lines.insert(0, f"THE ENGINE DIED under load: {died!r}")
    after = health_problems(harness, reference, settle=30.0)
    if after:
        lines.append("afterwards: " + "; ".join(after))
    if lines:
        pytest.fail(f"hostile requests took {hostile_seconds:.1f} s beside {CLIENTS} clients "
                    f"({len(results)} streams)\n" + "\n".join(lines), pytrace=False)
    wait_until_idle(harness.engine, timeout=10.0)


def _siblings_request(protocol: str) -> tuple[str, str, bytes, dict]:
    """A batch of 8 good prompts, each forced to 512 tokens, and one that cannot run (longer than the context)."""
    json_type = {"Content-Type": "application/json"}
    good = [f"{PROMPT} # {i}" for i in range(8)]
    if protocol == "nemo":
        return "PUT", "/generate", encode({"sentences": [*good[:4], LONG, *good[4:]], "tokens_to_generate": 512,
                                           "min_tokens_to_generate": 512, "end_strings": [], "greedy": True}), json_type
    knobs = [{"name": "max_output_len", "datatype": "INT64", "shape": [1, 1], "data": [512]},
             {"name": "min_output_len", "datatype": "INT64", "shape": [1, 1], "data": [512]}]
    if protocol == "triton":
        prompts = {"name": "prompts", "datatype": "BYTES", "shape": [9, 1], "data": [*good, LONG]}
        return "POST", INFER, encode({"id": "1", "inputs": [prompts, *knobs]}), json_type
    if protocol == "triton-binary":
        body, headers = binary_body([
            ({"name": "prompts", "datatype": "BYTES", "shape": [9, 1]},
             encode_bytes([LONG.encode(), *(p.encode() for p in good)])),
            ({"name": "max_output_len", "datatype": "INT64", "shape": [1, 1]}, struct.pack("<q", 512)),
            ({"name": "min_output_len", "datatype": "INT64", "shape": [1, 1]}, struct.pack("<q", 512))])
        return "POST", INFER, body, headers
    prompts = [*good, [5, 6, VOCAB + 7]] if protocol == "openai-ids" else [*good, LONG]
    return "POST", "/v1/completions", encode({"model": MODEL_NAME, "prompt": prompts, "max_tokens": 512,
                                              "min_tokens": 512, "ignore_eos": True, "temperature": 0}), json_type


@pytest.mark.parametrize("protocol", ["nemo", "triton", "triton-binary", "openai", "openai-ids"])
def test_failed_batch_leaves_no_sibling_running(harness, protocol):
    harness.ensure_fresh()
    method, path, body, headers = _siblings_request(protocol)
    before = harness.engine.stats()["generation_tokens"]
    response = requests.request(method, harness.url + path, data=body, headers=headers, timeout=60)
    answered = time.monotonic()
    problems = answer_problems(path, response, want_4xx=True)
    assert response.status_code == 400 and not problems, problems or response.text[:300]
    busy = harness.wait_idle(1.0)
    generated = harness.engine.stats()["generation_tokens"] - before
    assert busy is None, (f"{protocol}: 1 s after the 400 the batch's siblings still run: {busy}; the engine generated "
                          f"{generated} tokens for a request that was refused")
    assert time.monotonic() - answered < 5


def _forced_batch(protocol: str) -> tuple[str, str, dict]:
    """8 prompts, each forced to 512 tokens: seconds of work that only the client's leaving can end early."""
    good = [f"{PROMPT} # {i}" for i in range(8)]
    if protocol == "nemo":
        return "PUT", "/generate", {"sentences": good, "tokens_to_generate": 512, "min_tokens_to_generate": 512,
                                    "end_strings": [], "greedy": True}
    if protocol == "triton":
        return "POST", INFER, {"inputs": [
            {"name": "prompts", "datatype": "BYTES", "shape": [8, 1], "data": good},
            {"name": "max_output_len", "datatype": "INT64", "shape": [1, 1], "data": [512]},
            {"name": "min_output_len", "datatype": "INT64", "shape": [1, 1], "data": [512]}]}
    body = {"model": MODEL_NAME, "max_tokens": 512, "min_tokens": 512, "ignore_eos": True, "temperature": 0,
            "stream": protocol.endswith("stream")}
    if protocol.startswith("chat"):
        return "POST", "/v1/chat/completions", {**body, "n": 8, "messages": [{"role": "user", "content": PROMPT}]}
    return "POST", "/v1/completions", {**body, "prompt": good}


@pytest.mark.parametrize("protocol", ["completions", "completions-stream", "chat", "chat-stream", "nemo", "triton"])
def test_client_that_goes_away_frees_its_requests(harness, protocol):
    """A client that closes its connection mid-request: every engine request of it ends within a second."""
    harness.ensure_fresh()
    method, path, body = _forced_batch(protocol)
    payload = encode(body)
    before = harness.engine.stats()["generation_tokens"]
    with socket.create_connection(("127.0.0.1", harness.live.port), timeout=30) as connection:
        connection.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        deadline = time.monotonic() + 20
        while harness.engine.stats()["generation_tokens"] <= before:  # generating for this client now
            assert time.monotonic() < deadline, f"the request never started: {harness.idle()[1]}"
            time.sleep(0.02)
        running = harness.engine.num_requests
    busy = harness.wait_idle(1.0)
    assert busy is None, f"{protocol}: 1 s after the client left ({running} requests were running) the engine " \
                         f"still works for it: {busy}"
