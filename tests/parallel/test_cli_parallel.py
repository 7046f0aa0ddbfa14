"""The commands under torchrun: ``generate`` prints the single process's text, ``serve`` answers NeMo and
OpenAI requests as a single-process server does, SIGTERM to rank 0 stops every rank, and a rank that
dies takes the job down instead of leaving it hanging."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from nemolite.engine.async_llm import AsyncLLM
from tests.parallel.test_parallel import environment, torchrun
from tests.server.conftest import free_port, start_server, stop_server

GENERATE = ["generate", "Return the", "--max-tokens", "12"]
NEMO_BODY = {"sentences": ["Return the", "The list"], "tokens_to_generate": 10, "greedy": True}
OPENAI_BODY = {"prompt": ["Return the", "The list"], "max_tokens": 10, "temperature": 0, "model": "nemolite-demo"}


@pytest.fixture(scope="module")
def single():
    """``nemolite generate`` in one process: what the parallel runs must print."""
    result = subprocess.run([sys.executable, "-m", "nemolite", *GENERATE], env=environment(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_generate_under_torchrun_prints_the_single_process_text(single):
    parallel = subprocess.run(torchrun(2, "-m", "nemolite", *GENERATE, "--tensor-parallel-size", "2"),
                              env=environment(), capture_output=True, text=True, timeout=300)
    assert parallel.returncode == 0, parallel.stderr[-2000:]
    assert parallel.stdout == single.stdout and len(single.stdout.strip()) > 10


def test_generate_under_srun_environment(single):
    """srun's view (SLURM_PROCID/NTASKS/LOCALID, the job's node list): two tasks started by hand."""
    port = str(free_port())
    tasks = [subprocess.Popen([sys.executable, "-m", "nemolite", *GENERATE, "--tensor-parallel-size", "2"],
                              env={**environment(), "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2",
                                   "SLURM_LOCALID": str(rank), "SLURM_JOB_NODELIST": "localhost",
                                   "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [task.communicate(timeout=300) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][1][-2000:]
    assert outputs[0][0] == single.stdout and outputs[1][0] == ""


def ranks_of(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    ranks = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        rank = child.environ().get("RANK")
        if rank is not None and "nemolite" in " ".join(child.cmdline()):
            ranks[int(rank)] = child
    return ranks


def start_parallel_server(port: int) -> subprocess.Popen:
    launcher = subprocess.Popen(
        torchrun(2, "-m", "nemolite", "serve", "--tensor-parallel-size", "2", "--port", str(port),
                 "--host", "127.0.0.1", "--dtype", "float32", "--kv-cache-gb", "0.05"),
        env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return launcher
        except requests.ConnectionError:
            time.sleep(0.3)
        assert launcher.poll() is None, launcher.stdout.read()[-3000:]
    launcher.kill()
    raise AssertionError("the parallel server did not start")


def wait_gone(launcher: subprocess.Popen, processes: list[psutil.Process], seconds: float) -> float:
    started = time.monotonic()
    _, alive = psutil.wait_procs(processes, timeout=seconds)
    launcher.wait(timeout=max(1.0, seconds - (time.monotonic() - started)))
    assert not alive, f"ranks still running: {alive}"
    return time.monotonic() - started


@pytest.fixture(scope="module")
def single_answers():
    engine = AsyncLLM(None, dtype="float32", device="cpu", kv_cache_gb=0.05)
    live, server, thread = start_server(engine)
    try:
        nemo = requests.put(f"{live.url}/generate", json=NEMO_BODY).json()
        openai = requests.post(f"{live.url}/v1/completions", json={**OPENAI_BODY, "model": "demo"}).json()
    finally:
        stop_server(server, thread)
        engine.shutdown()
    return nemo, [choice["text"] for choice in openai["choices"]]


def test_serve_under_torchrun_answers_like_one_process_and_stops_on_sigterm(single_answers):
    nemo, texts = single_answers
    port = free_port()
    launcher = start_parallel_server(port)
    try:
        ranks = ranks_of(launcher)
        assert sorted(ranks) == [0, 1]
        answer = requests.put(f"http://127.0.0.1:{port}/generate", json=NEMO_BODY).json()
        assert answer["sentences"] == nemo["sentences"] and answer["token_ids"] == nemo["token_ids"]
        completions = requests.post(f"http://127.0.0.1:{port}/v1/completions", json=OPENAI_BODY).json()
        assert [choice["text"] for choice in completions["choices"]] == texts
        os.kill(ranks[0].pid, signal.SIGTERM)
        assert wait_gone(launcher, list(ranks.values()), 10) < 10
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_a_dead_rank_takes_the_job_down():
    port = free_port()
    launcher = start_parallel_server(port)
    try:
        ranks = ranks_of(launcher)
        ranks[1].kill()  # SIGKILL: no goodbye
        wait_gone(launcher, [ranks[0]], 60)
        assert launcher.returncode != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
