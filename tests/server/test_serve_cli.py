"""`nemolite serve` as users start it: a process, the demo model, SIGTERM to stop."""

from __future__ import annotations

import signal
import threading
import time

import requests

from tests.server.conftest import serve_process


def test_serve_answers_every_protocol_and_stops_on_sigterm():
    with serve_process("--served-model-name", "tiny", "--dtype", "float32") as (process, url):
        assert requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"] == "tiny"
        assert requests.get(f"{url}/metrics", timeout=10).ok and requests.get(f"{url}/", timeout=10).ok
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
        assert '"path": "/metrics"' not in log and '"path": "/health"' not in log  # scrapes and probes: DEBUG
        assert "playground: http://127.0.0.1:" in log
