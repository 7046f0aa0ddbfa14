"""`nemolite serve` as users start it: a process, the demo model, SIGTERM to stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import requests

from tests.server.conftest import free_port


def test_serve_answers_every_protocol_and_stops_on_sigterm():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "nemolite", "serve", "--port", str(port), "--host", "127.0.0.1",
                                "--served-model-name", "tiny", "--dtype", "float32"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        assert requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == "tiny"
        nemo = requests.put(f"{url}/generate", json={"sentences": ["Return the"], "tokens_to_generate": 8,
                                                     "greedy": True}, timeout=30).json()
        openai = requests.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "Return the",
                                                              "max_tokens": 8, "temperature": 0}, timeout=30).json()
        assert nemo["sentences"][0].startswith("Return the") and openai["choices"][0]["text"]

        # A long generation in flight when SIGTERM arrives either finishes or is cut off cleanly.
        outcome = {}

        def long_request():
            try:
                outcome["status"] = requests.post(f"{url}/v1/completions", json={
                    "prompt": "Return the", "max_tokens": 200, "ignore_eos": True}, timeout=60).status_code
            except requests.RequestException as error:
                outcome["error"] = error

        client = threading.Thread(target=long_request)
        client.start()
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        client.join(timeout=30)
        assert process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        assert outcome.get("status") == 200, outcome  # the in-flight request was allowed to finish
        log = process.stdout.read()
        assert "Traceback" not in log, log
        assert '"path": "/generate", "status": 200' in log  # the structured access log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
