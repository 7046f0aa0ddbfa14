"""Each serve limit refuses what exceeds it with a 4xx that names its flag, and admits what fits."""

from __future__ import annotations

import json
import socket

import pytest
import requests

from nemolite.engine.async_llm import AsyncLLM
from nemolite.engine.validation import RequestLimits
from tests.conftest import DEVICE
from tests.server.conftest import start_server, stop_server, wait_until_idle

LIMITS = RequestLimits(max_seqs_per_request=4, max_stop_strings=2, max_stop_length=16, max_logprobs=3,
                       max_full_logprob_values=50_000)


@pytest.fixture(scope="module")
def limited():
    engine = AsyncLLM(None, dtype="float32", device=DEVICE, max_num_seqs=4, kv_cache_gb=0.05, limits=LIMITS)
    live, server, thread = start_server(engine, max_queue=2, max_request_bytes=4096)
    yield live
    stop_server(server, thread)
    engine.shutdown()


def _post(live, path, body, method="POST"):
    return requests.request(method, live.url + path, json=body, timeout=60)


def _message(response) -> str:
    error = response.json()["error"]
    return error["message"] if isinstance(error, dict) else error


@pytest.mark.parametrize("path, body, flag", [
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2}, "--max-seqs-per-request"),
    ("/v1/completions", {"prompt": "a", "stop": ["x", "y", "z"], "max_tokens": 2}, "--max-stop-strings"),
    ("/v1/completions", {"prompt": "a", "stop": ["12345678901234567"], "max_tokens": 2}, "--max-stop-length"),
    ("/v1/completions", {"prompt": "a", "logprobs": 4, "max_tokens": 2}, "--max-logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": True,
                              "top_logprobs": 4, "max_tokens": 2}, "--max-logprobs"),
    ("/generate", {"sentences": ["a"], "tokens_to_generate": 64, "all_probs": True}, "--max-full-logprob-values"),
    ("/generate", {"sentences": ["a"] * 5, "tokens_to_generate": 2}, "--max-seqs-per-request"),
    ("/generate", {"sentences": ["a"], "tokens_to_generate": 2, "end_strings": ["1", "2", "3"]},
     "--max-stop-strings"),
])
def test_limit_names_its_flag(limited, path, body, flag):
    response = _post(limited, path, body, method="PUT" if path == "/generate" else "POST")
    assert response.status_code == 400, response.text
    assert flag in _message(response)
    wait_until_idle(limited.engine)


def test_requests_within_the_limits_run(limited):
    ok = _post(limited, "/v1/completions", {"prompt": ["a", "b"], "n": 2, "max_tokens": 2, "logprobs": 3,
                                           "stop": ["1234567890123456", "x"]})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 4
    nemo = _post(limited, "/generate", {"sentences": ["a"], "tokens_to_generate": 2, "all_probs": True}, "PUT")
    assert nemo.status_code == 200 and len(nemo.json()["full_logprob"][0]) == 2


def test_body_limit_by_content_length_and_while_streaming(limited):
    big = json.dumps({"prompt": "x" * 5000, "max_tokens": 1}).encode()
    response = requests.post(limited.url + "/v1/completions", data=big,
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 413 and "--max-request-bytes" in _message(response)
    # Chunked (no Content-Length): refused once the limit is passed.
    chunked = requests.put(limited.url + "/generate", data=(big[i:i + 1000] for i in range(0, len(big), 1000)),
                            headers={"Content-Type": "application/json"}, timeout=30)
    assert chunked.status_code == 413 and "--max-request-bytes" in _message(chunked)
    with socket.create_connection(("127.0.0.1", limited.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n{}")
        assert sock.recv(4096).split(b" ", 2)[1] in (b"400", b"413")
    assert requests.get(limited.url + "/health", timeout=10).status_code == 200


def test_queue_counts_sequences(limited):
    # 4 running + 2 queued sequences at most: one request of 4 fits, two more of 2 do not.
    def stream(n):
        return requests.post(limited.url + "/v1/completions", json={"prompt": "a", "n": n, "max_tokens": 200,
                                                                   "ignore_eos": True, "stream": True},
                             stream=True, timeout=60)

    first, second = stream(4), stream(2)
    try:
        assert first.status_code == 200 and second.status_code == 200
        third = _post(limited, "/v1/completions", {"prompt": "a", "max_tokens": 2})
        assert third.status_code == 503 and "--max-queue" in _message(third)
    finally:
        first.close()
        second.close()
    wait_until_idle(limited.engine, timeout=30)
