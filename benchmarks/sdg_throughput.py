"""SDG throughput: the same open-QA job with 1 request in flight and with 16 (a script, not a test).

Starts ``nemolite serve --dtype float32`` (the demo model unless --model) as a subprocess, runs
``open-qa`` against it once per concurrency into fresh files (no cache to replay), and prints rows/s,
completion tokens/s and the ratio; the bar is 16 / 1 >= 5 in rows/s.

    python benchmarks/sdg_throughput.py                    # demo model, 64 rows per run
    python benchmarks/sdg_throughput.py --rows 200 --concurrency 1 16 32
    python benchmarks/sdg_throughput.py --rows 200 --in-process   # no server; demo reward model scores too
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from nemolite.sdg import run_pipeline


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str | None, port: int, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "nemolite", "serve", *([model] if model else []), "--dtype", "float32",
               "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}; see its log")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not start in 300 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint to serve (default: the demo model)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--server-log", default=os.devnull)
    parser.add_argument("--in-process", action="store_true",
                        help="no server: the demo model and demo reward model in this process, as `nemolite sdg` "
                             "without --endpoint runs them")
    args = parser.parse_args()

    port = free_port()
    with open(args.server_log, "w") as log, tempfile.TemporaryDirectory() as directory:
        server = None if args.in_process else start_server(args.model, port, log)
        endpoint = None if args.in_process else f"http://127.0.0.1:{port}"
        try:
            results = {}
            for concurrency in args.concurrency:
                out = os.path.join(directory, f"c{concurrency}.jsonl")
                started = time.perf_counter()
                summary = run_pipeline("open-qa", out, endpoint=endpoint, rows=args.rows, seed=args.seed,
                                       concurrency=concurrency, progress=False)
                elapsed = time.perf_counter() - started
                results[concurrency] = (summary.rows_written / elapsed, summary.completion_tokens / elapsed)
                print(f"concurrency {concurrency:3d}: {summary.rows_written} rows in {elapsed:6.1f} s = "
                      f"{results[concurrency][0]:6.2f} rows/s, {results[concurrency][1]:7.1f} completion tok/s "
                      f"({summary.llm_calls} calls, {summary.completion_tokens} completion tokens)", flush=True)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=60)
    low, high = min(results), max(results)
    ratio = results[high][0] / results[low][0]
    print(f"rows/s ratio concurrency {high} / {low}: {ratio:.2f}x (bar: >= 5x for 16 / 1)")
    return 0 if high != 16 or low != 1 or ratio >= 5 else 1


if __name__ == "__main__":
    sys.exit(main())
