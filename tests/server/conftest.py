"""A live nemolite server on a free port (uvicorn in a thread) over the demo model in fp32."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import uvicorn

from nemolite.engine.async_llm import AsyncLLM
from nemolite.engine.llm import LLM
from nemolite.server.app import build_app

from tests.conftest import DEVICE

MODEL_NAME = "demo"


@dataclasses.dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    port: int
    engine: AsyncLLM
    app: object

    @property
    def state(self):
        return self.app.state.nemolite


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(engine: AsyncLLM, **app_options) -> tuple[LiveServer, uvicorn.Server, threading.Thread]:
    app = build_app(engine, MODEL_NAME, shutdown_engine=False, **app_options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", port, engine, app), server, thread


def stop_server(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(timeout=30)


@contextlib.contextmanager
def serve_process(*args: str, timeout: float = 240.0):
    """``python -m nemolite serve ARGS`` on a free port of 127.0.0.1, as users start it: yields the process
    (stdout and stderr merged, as text) and its URL once /health answers; killed afterwards if still running.
    The timeout covers a first start that builds the CPU kernels (about 80 s on 2 cores)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "nemolite", "serve", "--port", str(port), "--host", "127.0.0.1",
                                *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def demo_engine():
    engine = AsyncLLM(None, dtype="float32", device=DEVICE, max_num_seqs=32, kv_cache_gb=0.2)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def demo_llm() -> LLM:
    """The in-process reference: the same checkpoint, dtype and device as the server's engine."""
    return LLM(None, dtype="float32", device=DEVICE, kv_cache_gb=0.2)


@pytest.fixture(scope="session")
def live_server(demo_engine):
    live, server, thread = start_server(demo_engine)
    yield live
    stop_server(server, thread)


def wait_until_idle(engine: AsyncLLM, timeout: float = 10.0) -> dict:
    """Wait until ``engine`` has no request left and every KV block is free again; its stats then."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if engine.num_requests == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle: {engine.num_requests} requests, {stats}")
        time.sleep(0.02)


@pytest.fixture
def wait_idle(demo_engine):
    """Call to wait until the shared engine is idle (see wait_until_idle)."""
    return lambda timeout=10.0: wait_until_idle(demo_engine, timeout)


# The hostile-request servers (tests/server/hostile.py): engines of their own, one per test module.

@pytest.fixture(scope="module")
def harness():
    from tests.server.hostile import Harness

    harness = Harness()
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def reward_harness():
    from tests.server.hostile import start_reward_harness

    harness = start_reward_harness()
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def reference(demo_llm) -> str:
    """The demo model's greedy answer to the hostile tests' reference prompt."""
    from nemolite.engine.sampling_params import SamplingParams
    from tests.server.hostile import REFERENCE_PROMPT, REFERENCE_TOKENS

    params = SamplingParams(temperature=0, max_tokens=REFERENCE_TOKENS)
    return demo_llm.generate([REFERENCE_PROMPT], params, use_tqdm=False)[0].outputs[0].text
