"""``kill -9`` mid-run, rerun: the file an uninterrupted run writes, against a live server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nemolite.engine.async_llm import AsyncLLM

from tests.server.conftest import start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"sampling": {"max_tokens": 48},
          "open-qa": {"n_macro_topics": 3, "n_subtopics": 3, "n_questions": 3, "n_revisions": 2}}


@pytest.fixture(scope="module")
def server():
    engine = AsyncLLM(None, dtype="float32", max_num_seqs=32, kv_cache_gb=0.2)
    live, uvicorn_server, thread = start_server(engine)
    yield live
    stop_server(uvicorn_server, thread)
    engine.shutdown()


def sdg_command(server, out: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "nemolite", "sdg", "open-qa", "--endpoint", server.url, "--out", str(out),
            "--config", str(config), "--rows", "30", "--seed", "7", "--concurrency", "8"]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_kill_9_then_rerun_gives_the_uninterrupted_file(server, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    reference, resumed = tmp_path / "reference.jsonl", tmp_path / "resumed.jsonl"
    done = subprocess.run(sdg_command(server, reference, config), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert len(lines(reference)) == 30 and "30 rows written" in done.stderr

    process = subprocess.Popen(sdg_command(server, resumed, config), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(lines(resumed)) < 8 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    partial = lines(resumed)
    assert 8 <= len(partial) < 30
    assert [json.loads(line) for line in partial]  # whole lines only, every one valid JSON
    assert partial == lines(reference)[:len(partial)]

    again = subprocess.run(sdg_command(server, resumed, config), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert resumed.read_bytes() == reference.read_bytes()
    ids = [json.loads(line)["id"] for line in lines(resumed)]
    assert len(set(ids)) == len(ids) == 30
    assert f"({len(partial)} already there)" in again.stderr
