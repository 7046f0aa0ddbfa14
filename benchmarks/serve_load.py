"""Load and throughput check of ``nemolite serve`` (a script, not a test).

(a) Load: C concurrent clients (default 64) for D seconds (default 120) send a mix of streaming and
    plain /v1/completions, /v1/chat/completions and PUT /generate requests (random prompts,
    max_tokens 8-64, some with stop strings, logprobs or n=2). Every non-200, malformed SSE chunk,
    missing [DONE] or inconsistent token count is an error. Afterwards /metrics must show every KV
    block free and no request running or waiting, and its request and token counters must have moved
    by exactly what the clients counted.
(b) Throughput: 16 concurrent clients x 128 new tokens (greedy, ignore_eos) through HTTP
    (/v1/completions, not streamed) against ``LLM.generate`` of the same 16 prompts in this process,
    same model and engine settings; the bar is HTTP / in-process >= 0.8. The same requests streamed
    are measured too and printed for information.

    python benchmarks/serve_load.py                          # demo model, 64 clients, 120 s
    python benchmarks/serve_load.py --duration 20 --clients 16
    python benchmarks/serve_load.py --model /path/to/ckpt --dtype bfloat16 --device cuda
    python benchmarks/serve_load.py --skip-load               # (b) only

The server runs as a subprocess (``python -m nemolite serve``); its log goes to --server-log.
Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp

from nemolite.cli import _add_model_options, engine_options

MODEL_NAME = "bench"
WORDS = ("Return the number of items in a container. Serialize obj to a JSON formatted str. Delay execution "
         "for a given number of seconds. Join two or more pathname components. Shuffle list x in place. "
         "def class import os sys json re math time path file open read write list dict set tuple str int "
         "float bytes iterator generator context manager exception raise return yield lambda async await "
         "socket thread process queue lock event timeout buffer encoding decode format parse").split()
STOPS = ["\n\n", ".", "()", "\n"]


# ---------------------------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(args, port: int) -> list[str]:
    command = [sys.executable, "-m", "nemolite", "serve"]
    if args.model:
        command.append(args.model)
    command += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL_NAME,
                "--dtype", args.dtype, "--seed", str(args.seed), "--block-size", str(args.block_size),
                "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.device:
        command += ["--device", args.device]
    if args.kv_cache_gb is not None:
        command += ["--kv-cache-gb", str(args.kv_cache_gb)]
    if args.kv_cache_fraction is not None:
        command += ["--kv-cache-fraction", str(args.kv_cache_fraction)]
    if args.no_prefix_caching:
        command.append("--no-prefix-caching")
    command.append("--compile" if args.compile else "--no-compile")
    return command


def start_server(args, port: int, log_file) -> subprocess.Popen:
    command = serve_command(args, port)
    print("server:", " ".join(command), f"(log: {log_file.name})", flush=True)
    environment = dict(os.environ)
    if args.threads is not None:
        environment["OMP_NUM_THREADS"] = str(args.threads)
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment)
    deadline = time.monotonic() + args.start_timeout
    import urllib.request
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}; see {log_file.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return process
        except OSError:
            time.sleep(0.25)
    process.terminate()
    raise SystemExit(f"the server did not answer /health within {args.start_timeout} s; see {log_file.name}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=40)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')


async def scrape(session: aiohttp.ClientSession, base: str) -> dict[tuple[str, frozenset], float]:
    """{(metric name, frozenset of label pairs): value} from /metrics."""
    async with session.get(f"{base}/metrics") as response:
        text = await response.text()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = _SAMPLE.match(line)
        if match:
            name, labels, value = match.groups()
            pairs = frozenset(re.findall(r'(\w+)="([^"]*)"', labels or ""))
            samples[(name, pairs)] = float(value)
    return samples


def metric(samples: dict, name: str, **labels) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(value for (key, pairs), value in samples.items() if key == name and want <= pairs)


# ---------------------------------------------------------------------------------------------- clients

@dataclasses.dataclass
class Tally:
    requests: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (protocol, status)
    kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    error_examples: list = dataclasses.field(default_factory=list)
    generation_tokens: int = 0
    prompt_tokens: int = 0
    latencies: list = dataclasses.field(default_factory=list)
    first_token: list = dataclasses.field(default_factory=list)

    def error(self, kind: str, reason: str, body: dict) -> None:
        key = f"{kind}: {reason[:80]}"
        self.errors[key] += 1
        if len(self.error_examples) < 8:
            self.error_examples.append(f"{key} <- {json.dumps(body)[:300]}")


class Malformed(Exception):
    pass


def random_prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))


async def read_sse(response: aiohttp.ClientResponse, on_event) -> None:
    """Feed each JSON event to ``on_event``; the stream must be 'data: ...' lines ending with [DONE]."""
    done = False
    async for raw in response.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            continue
        if not line.startswith("data: "):
            raise Malformed(f"not an SSE data line: {line[:80]!r}")
        if done:
            raise Malformed("data after [DONE]")
        payload = line[6:]
        if payload == "[DONE]":
            done = True
            continue
        try:
            event = json.loads(payload)
        except json.JSONDecodeError:
            raise Malformed(f"chunk is not JSON: {payload[:80]!r}") from None
        if "error" in event:
            raise Malformed(f"error event: {json.dumps(event['error'])[:120]}")
        on_event(event)
    if not done:
        raise Malformed("stream ended without [DONE]")


def completion_body(rng: random.Random) -> dict:
    body = {"model": MODEL_NAME, "prompt": random_prompt(rng), "max_tokens": rng.randint(8, 64),
            "temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randrange(2**31), "stream": rng.random() < 0.85}
    if rng.random() < 0.25:
        body["stop"] = rng.sample(STOPS, rng.randint(1, 2))
    if rng.random() < 0.25:
        body["logprobs"] = rng.randint(0, 5)
    if rng.random() < 0.2:
        body["n"] = 2
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    return body


def chat_body(rng: random.Random) -> dict:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": random_prompt(rng)}],
            "max_tokens": rng.randint(8, 64), "temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randrange(2**31),
            "stream": rng.random() < 0.85}
    if rng.random() < 0.25:
        body["stop"] = rng.sample(STOPS, rng.randint(1, 2))
    if rng.random() < 0.25:
        body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 5)
    if rng.random() < 0.2:
        body["n"] = 2
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    return body


def generate_body(rng: random.Random, prompt: str) -> dict:
    body = {"sentences": [prompt], "tokens_to_generate": rng.randint(8, 64)}
    if rng.random() < 0.5:
        body["greedy"] = True
    else:
        body["temperature"], body["random_seed"] = 0.8, rng.randrange(2**31)
    if rng.random() < 0.25:
        body["end_strings"] = rng.sample(STOPS, rng.randint(1, 2))
    if rng.random() < 0.25:
        body["compute_logprob"] = True
    return body


async def openai_request(session, base: str, kind: str, body: dict, tally: Tally) -> None:
    """One /v1 request, checked; adds its tokens to the tally."""
    n = body.get("n", 1)
    started = time.monotonic()
    async with session.post(f"{base}/v1/{kind}", json=body) as response:
        tally.requests["openai", response.status] += 1
        if response.status != 200:
            raise Malformed(f"HTTP {response.status}: {(await response.text())[:120]}")
        if not body["stream"]:
            result = await response.json()
            choices = result["choices"]
            if sorted(c["index"] for c in choices) != list(range(n)) or any(not c["finish_reason"] for c in choices):
                raise Malformed("choices do not cover every index with a finish_reason")
            if body.get("logprobs") is not None and body.get("logprobs") is not False:
                counted = sum(len(c["logprobs"]["tokens"] if kind == "completions" else c["logprobs"]["content"])
                              for c in choices)
                if counted != result["usage"]["completion_tokens"]:
                    raise Malformed(f"logprobs cover {counted} tokens, usage says {result['usage']['completion_tokens']}")
            usage = result["usage"]
        else:
            finished: dict[int, str] = {}
            logprob_tokens = 0
            usage = None
            first = None

            def on_event(event: dict) -> None:
                nonlocal usage, first, logprob_tokens
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices", []):
                    index = choice["index"]
                    if not 0 <= index < n or index in finished:
                        raise Malformed(f"chunk for index {index} (n={n}, finished {sorted(finished)})")
                    text = choice.get("text") if kind == "completions" else choice.get("delta", {}).get("content")
                    if text and first is None:
                        first = time.monotonic()
                    if choice.get("logprobs"):
                        entries = choice["logprobs"]["tokens" if kind == "completions" else "content"]
                        logprob_tokens += len(entries)
                    if choice.get("finish_reason"):
                        finished[index] = choice["finish_reason"]

            await read_sse(response, on_event)
            if len(finished) != n:
                raise Malformed(f"{n - len(finished)} choice(s) never finished")
            if usage is None:
                raise Malformed("no usage chunk despite include_usage")
            if body.get("logprobs") and logprob_tokens != usage["completion_tokens"]:
                raise Malformed(f"streamed logprobs cover {logprob_tokens} tokens, usage says {usage['completion_tokens']}")
            if first is not None:
                tally.first_token.append(first - started)
    tally.latencies.append(time.monotonic() - started)
    tally.generation_tokens += usage["completion_tokens"]
    tally.prompt_tokens += usage["prompt_tokens"]


async def generate_request(session, base: str, body: dict, prompt_length: int, tally: Tally) -> None:
    started = time.monotonic()
    async with session.put(f"{base}/generate", json=body) as response:
        tally.requests["nemo", response.status] += 1
        if response.status != 200:
            raise Malformed(f"HTTP {response.status}: {(await response.text())[:120]}")
        result = await response.json()
    token_ids, sentence = result["token_ids"][0], result["sentences"][0]
    if not sentence.startswith(body["sentences"][0]):
        raise Malformed("the sentence does not start with the prompt")
    generated = len(token_ids) - prompt_length
    if not 0 <= generated <= body["tokens_to_generate"]:
        raise Malformed(f"{generated} tokens generated for tokens_to_generate={body['tokens_to_generate']}")
    if body.get("compute_logprob") and len(result["logprob"][0]) != len(token_ids) - 1:
        raise Malformed("logprob does not cover every token after the first")
    tally.latencies.append(time.monotonic() - started)
    tally.generation_tokens += generated
    tally.prompt_tokens += prompt_length


async def client(session, base: str, seed: int, deadline: float, prompts: list[tuple[str, int]], tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        kind = rng.choices(["completions", "chat/completions", "generate"], weights=[45, 35, 20])[0]
        if kind == "generate":
            prompt, length = rng.choice(prompts)
            body = generate_body(rng, prompt)
        else:
            body = completion_body(rng) if kind == "completions" else chat_body(rng)
        tally.kinds[kind] += 1
        try:
            if kind == "generate":
                await generate_request(session, base, body, length, tally)
            else:
                await openai_request(session, base, kind, body, tally)
        except Malformed as error:
            tally.error(kind, str(error), body)
        except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError, KeyError, TypeError) as error:
            tally.error(kind, f"{type(error).__name__}: {error}", body)


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def wait_idle(session, base: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(session, base)
        running = metric(samples, "nemolite_num_requests_running")
        waiting = metric(samples, "nemolite_num_requests_waiting")
        free, total = metric(samples, "nemolite_kv_cache_blocks_free"), metric(samples, "nemolite_kv_cache_blocks_total")
        if (running, waiting) == (0, 0) and free == total or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.2)


async def load_phase(args, base: str) -> list[str]:
    """(a); returns the failed checks."""
    failures = []
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=args.clients + 4)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, read_bufsize=2**20) as session:
        rng = random.Random(args.seed)
        prompts = []
        for _ in range(200):  # /generate's prompt lengths, measured before the counters' baseline
            prompt = random_prompt(rng)
            async with session.post(f"{base}/tokenize", json={"prompt": prompt, "add_special_tokens": False}) as r:
                prompts.append((prompt, len((await r.json())["tokens"])))
        before = await scrape(session, base)
        tally = Tally()
        started = time.monotonic()
        deadline = started + args.duration
        await asyncio.gather(*(client(session, base, args.seed * 1000 + i, deadline, prompts, tally)
                               for i in range(args.clients)))
        elapsed = time.monotonic() - started
        after = await wait_idle(session, base)

    total_requests = sum(tally.kinds.values())
    errors = sum(tally.errors.values())
    print(f"\n=== (a) load: {args.clients} clients, {args.duration:.0f} s (ran {elapsed:.1f} s) ===")
    print(f"requests: {total_requests} ({', '.join(f'{k} {v}' for k, v in sorted(tally.kinds.items()))}); "
          f"errors: {errors}")
    for example in tally.error_examples:
        print("  error:", example)
    print(f"tokens received: {tally.generation_tokens} ({tally.generation_tokens / elapsed:.1f} tok/s), "
          f"prompt tokens {tally.prompt_tokens}; {total_requests / elapsed:.2f} req/s")
    print(f"latency p50 {percentile(tally.latencies, 0.5):.3f} s, p99 {percentile(tally.latencies, 0.99):.3f} s; "
          f"first token (streams) p50 {percentile(tally.first_token, 0.5):.3f} s, "
          f"p99 {percentile(tally.first_token, 0.99):.3f} s")
    if errors:
        failures.append(f"{errors} client errors")

    running, waiting = metric(after, "nemolite_num_requests_running"), metric(after, "nemolite_num_requests_waiting")
    free, total = metric(after, "nemolite_kv_cache_blocks_free"), metric(after, "nemolite_kv_cache_blocks_total")
    print(f"/metrics after: running {running:.0f}, waiting {waiting:.0f}, KV blocks free {free:.0f}/{total:.0f}")
    if (running, waiting) != (0, 0) or free != total:
        failures.append(f"not idle after the load: running {running}, waiting {waiting}, KV free {free}/{total}")

    for (protocol, status), count in sorted(tally.requests.items()):
        delta = (metric(after, "nemolite_requests_total", protocol=protocol, status=str(status))
                 - metric(before, "nemolite_requests_total", protocol=protocol, status=str(status)))
        print(f"nemolite_requests_total{{protocol={protocol},status={status}}}: +{delta:.0f}, clients counted {count}")
        if delta != count:
            failures.append(f"requests_total{{{protocol},{status}}} moved by {delta:.0f}, clients counted {count}")
    for protocol in ("openai", "nemo"):
        delta = (metric(after, "nemolite_requests_total", protocol=protocol)
                 - metric(before, "nemolite_requests_total", protocol=protocol))
        counted = sum(c for (p, _), c in tally.requests.items() if p == protocol)
        if delta != counted:
            failures.append(f"requests_total{{{protocol}}} moved by {delta:.0f} in all, clients counted {counted}")
    for name, counted in (("nemolite_generation_tokens_total", tally.generation_tokens),
                          ("nemolite_prompt_tokens_total", tally.prompt_tokens)):
        delta = metric(after, name) - metric(before, name)
        print(f"{name}: +{delta:.0f}, clients counted {counted}")
        if errors == 0 and delta != counted:
            failures.append(f"{name} moved by {delta:.0f}, clients counted {counted}")
    return failures


# ---------------------------------------------------------------------------------------------- throughput

async def http_batch(base: str, prompts: list[str], new_tokens: int, stream: bool) -> tuple[float, int, list[str]]:
    """(seconds, completion tokens, texts) of len(prompts) concurrent greedy requests."""
    async def one(session, prompt: str) -> tuple[int, str]:
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                "ignore_eos": True, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        async with session.post(f"{base}/v1/completions", json=body) as response:
            if response.status != 200:
                raise SystemExit(f"throughput request failed: HTTP {response.status} {await response.text()}")
            if not stream:
                result = await response.json()
                return result["usage"]["completion_tokens"], result["choices"][0]["text"]
            parts, usage = [], {}

            def on_event(event):
                nonlocal usage
                usage = event.get("usage") or usage
                parts.extend(choice["text"] for choice in event.get("choices", []))

            await read_sse(response, on_event)
            return usage["completion_tokens"], "".join(parts)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=len(prompts) + 2)) as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(session, prompt) for prompt in prompts))
        seconds = time.perf_counter() - started
    return seconds, sum(tokens for tokens, _ in results), [text for _, text in results]


def throughput_phase(args, base: str) -> list[str]:
    """(b); returns the failed checks."""
    from nemolite import LLM, SamplingParams

    rng = random.Random(args.seed + 1)
    prompts = [random_prompt(rng) for _ in range(args.throughput_clients)]
    new = args.new_tokens
    print(f"\n=== (b) throughput: {len(prompts)} concurrent requests x {new} new tokens, greedy, ignore_eos ===")
    asyncio.run(http_batch(base, prompts, 8, stream=False))  # warm-up
    http = {}
    for stream in (False, True):
        best = min((asyncio.run(http_batch(base, prompts, new, stream)) for _ in range(args.repeats)),
                   key=lambda result: result[0])
        http[stream] = best

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, seed=args.seed, **engine_options(args))
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    runs = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        runs.append((time.perf_counter() - started, outputs))
    local_seconds, outputs = min(runs, key=lambda run: run[0])
    local_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    local_rate = local_tokens / local_seconds
    local_texts = [o.outputs[0].text for o in outputs]

    failures = []
    print(f"in-process LLM.generate: {local_tokens} tokens in {local_seconds:.2f} s = {local_rate:.1f} tok/s")
    for stream, (seconds, tokens, texts) in http.items():
        rate = tokens / seconds
        same = sum(a == b for a, b in zip(texts, local_texts))
        label = "HTTP streaming (info)" if stream else "HTTP (bar: ratio >= 0.8)"
        print(f"{label}: {tokens} tokens in {seconds:.2f} s = {rate:.1f} tok/s; ratio {rate / local_rate:.3f}; "
              f"{same}/{len(texts)} texts equal to in-process")
        if tokens != local_tokens:
            failures.append(f"HTTP ({'stream' if stream else 'plain'}) generated {tokens} tokens, in-process {local_tokens}")
        if not stream and rate / local_rate < 0.8:  # the bar; streaming's ratio is for information
            failures.append(f"HTTP / in-process = {rate / local_rate:.3f} < 0.8")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint to serve (default: the bundled demo model)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients in (a)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load in (a)")
    parser.add_argument("--throughput-clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (b) measurement; the best counts")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--server-log", default=None, help="file for the server's output (default: a temp file)")
    parser.add_argument("--url", default=None, help="use this running server (served as 'bench') instead of "
                                                    "starting one; (b) then assumes it has the settings given here")
    _add_model_options(parser)  # --threads among them: OMP_NUM_THREADS of the server, torch threads in (b)
    args = parser.parse_args()

    failures: list[str] = []

    def run(base: str) -> None:
        if not args.skip_load:
            failures.extend(asyncio.run(load_phase(args, base)))
        if not args.skip_throughput:
            failures.extend(throughput_phase(args, base))

    if args.url:
        run(args.url.rstrip("/"))
    else:
        port = free_port()
        log_path = args.server_log or os.path.join(tempfile.gettempdir(), f"nemolite-serve-load-{port}.log")
        with open(log_path, "w") as log_file:
            process = start_server(args, port, log_file)
            try:
                run(f"http://127.0.0.1:{port}")
            finally:
                stop_server(process)
    print("\n" + ("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
