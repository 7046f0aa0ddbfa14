"""The ``nemolite`` command: generate, chat, serve, convert, plan, bench, sdg.

Logging: nemolite's own messages (loading, serving, progress of long work: nemolite.progress) at
INFO on stderr, other libraries' at WARNING; ``-v`` shows DEBUG, ``-q`` warnings and errors only.
"""

from __future__ import annotations

import argparse
import logging
import sys

from nemolite.errors import NemoliteError

log = logging.getLogger("nemolite")

QUANTIZATION_HELP = ("weight-only quantization of the linear layers: int8 (one scale per output channel), "
                     "int4 (groups of 32 columns, symmetric), int4-g64 / int4-g128 (groups of 64 / 128), "
                     "int4-asym / int4-g128-asym (with zero points); add -head to quantize the LM head too "
                     "(e.g. int8-head, int4-head), or -head8 to an int4 one for an int8 head; none (default): the checkpoint's weights as they are")


def quantization_arg(text: str) -> str | None:
    """argparse type of ``--quantization``: a spelling nemolite.quant.spec.parse_quantization accepts,
    normalised (None for none); anything else is a usage error that lists the spellings."""
    from nemolite.quant.spec import parse_quantization

    try:
        spec = parse_quantization(text)
    except NemoliteError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return None if spec is None else str(spec)


def quantization_list(text: str) -> list[str | None]:
    """argparse type of ``bench --quantizations``: comma-separated spellings, "none" for the float model."""
    return [quantization_arg(part.strip()) for part in text.split(",") if part.strip()]


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nemolite")
    except PackageNotFoundError:  # run from a source tree that is not installed
        import nemolite

        return nemolite.__version__


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16 or float32")
    parser.add_argument("--quantization", type=quantization_arg, default=None, metavar="METHOD", help=QUANTIZATION_HELP)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--kv-cache-gb", type=float, default=None,
                        help="KV cache size (default: room for --max-num-seqs full contexts, at most 25%% of free memory and 2 GB on CPU)")
    engine.add_argument("--kv-cache-fraction", type=float, default=None,
                        help="KV cache size as a fraction of the device's free memory (instead of --kv-cache-gb)")
    engine.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                        help="auto: the model's dtype; fp8: e4m3 with the checkpoint's k/v scales (1.0 when absent), "
                             "twice the blocks in the same memory")
    engine.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    engine.add_argument("--max-num-seqs", type=int, default=64, help="sequences in the running batch at most")
    engine.add_argument("--max-num-batched-tokens", type=int, default=512,
                        help="tokens per step at most (longer prompts are prefilled in chunks)")
    engine.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prefixes")
    engine.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the decode step: slower start, faster steady state")
    engine.add_argument("--threads", type=int, default=None,
                        help="CPU threads of the engine (default: OMP_NUM_THREADS, else all cores; serve and sdg "
                             "leave one core to the HTTP side)")
    engine.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters beside the base model")
    engine.add_argument("--max-loras", type=int, default=4, help="distinct adapters one step may mix (default 4)")
    engine.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank (default 16)")
    engine.add_argument("--max-cpu-loras", type=int, default=None,
                        help="adapters kept read in host memory (default: --max-loras)")
    parallel = parser.add_argument_group("parallelism (launch one process per rank with torchrun or srun)")
    parallel.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                          help="split every layer over this many ranks (Megatron style)")
    parallel.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                          help="split the layers into this many consecutive stages")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """DST and how an HF directory is written (convert, merge-lora)."""
    parser.add_argument("destination", metavar="DST")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="cast the weights (default: keep the checkpoint's)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")


def engine_options(args) -> dict:
    return {"kv_cache_gb": args.kv_cache_gb, "kv_cache_fraction": args.kv_cache_fraction,
            "kv_cache_dtype": args.kv_cache_dtype,
            "block_size": args.block_size, "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens, "enable_prefix_caching": not args.no_prefix_caching,
            "compile": args.compile, "tensor_parallel_size": args.tensor_parallel_size,
            "pipeline_parallel_size": args.pipeline_parallel_size, "cpu_threads": args.threads,
            "quantization": args.quantization, "enable_lora": args.enable_lora, "max_loras": args.max_loras,
            "max_lora_rank": args.max_lora_rank, "max_cpu_loras": args.max_cpu_loras}


def _add_sampling_options(parser: argparse.ArgumentParser, *, max_tokens: int, temperature: float) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    parser.add_argument("--min-tokens", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    from nemolite.engine.validation import RequestLimits

    parser = argparse.ArgumentParser(prog="nemolite", description="Run NVIDIA Nemotron models.")
    parser.add_argument("--version", action="version", version=f"nemolite {package_version()}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete one prompt and print the completion",
                                   description="Print the completion of PROMPT on stdout (logs go to stderr). "
                                               "Without MODEL the bundled demo model is used.")
    generate.add_argument("args", nargs="+", metavar="[MODEL] PROMPT")
    _add_model_options(generate)
    _add_sampling_options(generate, max_tokens=64, temperature=0.0)
    generate.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")

    chat = commands.add_parser("chat", help="talk to a model in the terminal (streams tokens)")
    chat.add_argument("model", nargs="?", default=None)
    chat.add_argument("--system", default="", help="system prompt")
    _add_model_options(chat)
    _add_sampling_options(chat, max_tokens=256, temperature=0.7)

    serve = commands.add_parser("serve", help="serve a model over HTTP: NeMo PUT /generate, OpenAI /v1, Triton /v2",
                                description="One server, three protocols: NeMo's PUT /generate, OpenAI's /v1 "
                                            "(completions, chat, models) with /tokenize, and Triton's KServe v2 "
                                            "(NemoQuery). Without MODEL the bundled demo model is served.")
    serve.add_argument("model", nargs="?", default=None)
    serve.add_argument("--host", default="0.0.0.0", help="interface to listen on (default: all)")
    serve.add_argument("--port", type=int, default=1424, help="TCP port (default 1424, as NVIDIA's Nemotron-4 recipe)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model's name in every protocol (default: the checkpoint directory's name)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every route but health (or set NEMOLITE_API_KEY)")
    limits = serve.add_argument_group("limits (a request beyond one is refused with a 4xx that names the flag)")
    limits.add_argument("--max-queue", type=int, default=None,
                        help="sequences (prompts x n) allowed to wait beyond the running batch; more get 503 "
                             "(default 1024)")
    limits.add_argument("--max-request-bytes", type=int, default=None,
                        help="request body size; larger bodies get 413 (default 16 MiB)")
    defaults = RequestLimits()
    limits.add_argument("--max-seqs-per-request", type=int, default=defaults.max_seqs_per_request,
                        help=f"sequences (prompts x n) in one request (default {defaults.max_seqs_per_request})")
    limits.add_argument("--max-stop-strings", type=int, default=defaults.max_stop_strings,
                        help=f"stop strings (end_strings) per request (default {defaults.max_stop_strings})")
    limits.add_argument("--max-stop-length", type=int, default=defaults.max_stop_length,
                        help=f"characters in one stop string (default {defaults.max_stop_length})")
    limits.add_argument("--max-logprobs", type=int, default=defaults.max_logprobs,
                        help=f"logprobs / top_logprobs per position (default {defaults.max_logprobs})")
    limits.add_argument("--max-full-logprob-values", type=int, default=defaults.max_full_logprob_values,
                        help="positions x vocabulary of whole-distribution outputs (NeMo all_probs) per request "
                             f"(default {defaults.max_full_logprob_values})")
    serve.add_argument("--no-playground", action="store_true",
                       help="do not serve the playground web page at / (chat, completion, live metrics)")
    serve.add_argument("--seed", type=int, default=0, help="seed of requests that give none")
    serve.add_argument("--reward-weights", default=None, metavar="W,W,...|NAME=W,...",
                       help="a reward model's attribute weights for its scalar score: one number per attribute, or "
                            "name=weight pairs (default: HelpSteer2's 0,0,0,0,0.3,0.74,0.46,0.47,-0.33)")
    _add_model_options(serve)
    lora = serve.add_argument_group("LoRA adapters (the request's model name, or NeMo's and Triton's adapter_id, "
                                    "picks one)")
    lora.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                      help='adapters to serve: NAME=PATH or {"name": ..., "path": ..., "base_model_name": ...} '
                           "(PATH: a PEFT directory)")
    lora.add_argument("--lora-dir", default=None, help="serve every adapter directory in DIR, named after itself")
    lora.add_argument("--allow-runtime-lora", action="store_true",
                      help="answer POST /v1/load_lora_adapter and /v1/unload_lora_adapter (clients then choose paths "
                           "this server reads)")

    convert = commands.add_parser("convert", help="write a NeMo (or HF) checkpoint as a Hugging Face directory",
                                  description="Convert SRC (a .nemo file, a NeMo checkpoint directory with "
                                              "model_config.yaml, or an HF directory) into DST: config.json, "
                                              "sharded safetensors with an index, tokenizer files. DST appears "
                                              "only when complete. With --quantization the linear layers are "
                                              "written quantized in the compressed-tensors pack-quantized format "
                                              "(what vLLM, transformers and nemolite load). A NeMo LoRA adapter "
                                              "(.nemo with peft.lora_tuning) is written as a PEFT directory.")
    convert.add_argument("source", metavar="SRC")
    _add_output_options(convert)
    convert.add_argument("--quantization", type=quantization_arg, default=None, metavar="METHOD",
                         help=QUANTIZATION_HELP.replace("none (default): the checkpoint's weights as they are",
                                                        "none (default): float weights"))

    merge = commands.add_parser("merge-lora", help="merge a LoRA adapter into its base model's weights",
                                description="Write BASE (HF or NeMo) with ADAPTER (PEFT or NeMo LoRA) merged in as "
                                            "an HF directory DST: W + B A with the adapter's scale applied "
                                            "(alpha / r, or alpha / adapter_dim for NeMo).")
    merge.add_argument("base", metavar="BASE")
    merge.add_argument("adapter", metavar="ADAPTER")
    _add_output_options(merge)

    plan = commands.add_parser("plan", help="how a model splits over GPUs, from its config alone",
                               description="For each tensor x pipeline layout of --gpus GPUs: weights and KV "
                                           "cache per GPU, the longest context and the batch that fit.")
    plan.add_argument("model", metavar="MODEL", help="HF directory (config.json) or NeMo checkpoint")
    plan.add_argument("--gpus", type=int, required=True)
    plan.add_argument("--gpu-memory", type=float, required=True, help="GiB per GPU, e.g. 80 or 141")
    plan.add_argument("--dtype", default="bfloat16", help="weights: bfloat16, float16, float32 or fp8")
    plan.add_argument("--quantization", default=None, metavar="METHOD",
                      help="size quantized weights instead: int8 (8 bits + a scale per row), int4 (4 bits + an "
                           "fp16 scale per 128 columns: about 4.125 bits a weight; int4-g32 / -g64 for smaller "
                           "groups, -asym adds zero points) or fp8 (8 bits, per-channel scales); the embedding, "
                           "norms and the LM head stay --dtype (add -head to quantize the head too). The KV "
                           "cache stays --kv-dtype.")
    plan.add_argument("--kv-dtype", default=None, help="KV cache (default: --dtype)")
    plan.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                      help="share of each GPU nemolite may use (default 0.9)")

    from nemolite.bench import WORKLOADS

    bench = commands.add_parser("bench", help="measure nemolite against transformers on named workloads",
                                description="Runs each workload against nemolite and, in the same run, its peers "
                                            "(each in its own process) and prints tok/s, GB/s, TTFT, ITL, peak RSS "
                                            "and the ratios. Without --model it creates the 204 M-parameter "
                                            "benchmark checkpoint.")
    bench.add_argument("--workload", action="append", choices=sorted(WORKLOADS), default=None,
                       help="repeatable (default: all)")
    bench.add_argument("--model", default=None, help="checkpoint directory (default: the benchmark checkpoint)")
    bench.add_argument("--backends", default="nemolite,transformers,llama.cpp",
                       help="comma-separated: nemolite, transformers, llama.cpp (needs llama-cpp-python and --gguf)")
    bench.add_argument("--gguf", action="append", default=None,
                       help="GGUF of the same checkpoint for the llama.cpp backend (repeatable: BF16, Q8_0, Q4_0 ...; "
                            "run under $NEMOLITE_LLAMA_CPP_PYTHON when set)")
    bench.add_argument("--quantizations", type=quantization_list, default=None, metavar="LIST",
                       help="comma-separated, one nemolite run each, e.g. none,int8,int4-head (instead of --quantization)")
    bench.add_argument("--lora", type=int, default=0, metavar="N",
                       help="also run each nemolite row with N random rank-16 adapters spread over the batch")
    bench.add_argument("--repeat", type=int, default=1,
                       help="run every backend this many times, interleaved, and report the median (default 1)")
    bench.add_argument("--json", default=None, help="also write the results to this file")
    _add_model_options(bench)
    bench.set_defaults(dtype="bfloat16", compile=True)

    from nemolite.sdg.config import PIPELINES

    sdg = commands.add_parser("sdg", help="generate synthetic data with a Nemotron-4 340B pipeline (resumable JSONL)",
                              description="Write PIPELINE's rows to --out, one JSON line each, in a fixed order. "
                                          "Rerunning the same command resumes: finished requests replay from "
                                          "FILE.cache.jsonl and only missing rows are added. Without --endpoint "
                                          "the demo model (and the demo reward model, when installed) run in "
                                          "this process.")
    sdg.add_argument("pipeline", choices=PIPELINES, metavar="PIPELINE", help=", ".join(PIPELINES))
    sdg.add_argument("--out", required=True, metavar="FILE.jsonl")
    sdg.add_argument("--config", default=None, metavar="CONFIG.yaml",
                     help="YAML merged over the defaults (nemolite/sdg/prompts.yaml): sizes, templates, filter...")
    sdg.add_argument("--endpoint", default=None, metavar="URL", help="an OpenAI-compatible server, e.g. "
                                                                      "http://localhost:1424")
    sdg.add_argument("--api-key", default=None, help="sent as a Bearer token (or set NEMOLITE_API_KEY)")
    sdg.add_argument("--model", default=None, metavar="NAME",
                     help="the served model's name (default: the first of /v1/models); without --endpoint, "
                          "a checkpoint to run in-process")
    sdg.add_argument("--reward-endpoint", default=None, metavar="URL", help="a nemolite reward server (/v1/reward)")
    sdg.add_argument("--rows", type=int, default=None, help="stop after N kept rows (default: the whole pipeline)")
    sdg.add_argument("--seed", type=int, default=0, help="every request's seed derives from it and the row id")
    sdg.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    sdg.add_argument("--num-shards", type=int, default=1, help="split the top-level items over K jobs (Slurm array)")
    sdg.add_argument("--shard-id", type=int, default=0, help="this job's shard, 0..K-1")
    sdg.add_argument("--quantization", type=quantization_arg, default=None, metavar="METHOD",
                     help="without --endpoint: quantize the in-process generator; " + QUANTIZATION_HELP.split(": ", 1)[1])
    return parser


def _sampling_params(args):
    from nemolite.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                          ignore_eos=args.ignore_eos)


def _load(model, args):
    from nemolite.engine.llm import LLM

    log.info("loading %s%s", model or "the bundled demo model", f" ({args.quantization})" if args.quantization else "")
    return LLM(model, dtype=args.dtype, device=args.device, seed=args.seed, **engine_options(args))


def run_generate(args) -> int:
    if len(args.args) > 2:
        raise NemoliteError("give at most MODEL and PROMPT; quote the prompt if it has spaces")
    model, prompt = (args.args[0], args.args[1]) if len(args.args) == 2 else (None, args.args[0])
    params = _sampling_params(args)
    llm = _load(model, args)
    ids = llm.tokenizer.encode(prompt, add_bos=False if args.no_bos else None)
    try:
        llm.stream(ids, params, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    finally:
        llm.engine.close()  # in a parallel job: stop the other ranks
    sys.stdout.write("\n")
    return 0


def run_chat(args) -> int:
    params = _sampling_params(args)
    llm = _load(args.model, args)
    params = llm.chat_params(params)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("nemolite chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            user = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if user.strip() in ("/exit", "/quit"):
            return 0
        if user.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        prompt = llm.tokenizer.apply_chat_template(messages)
        ids = llm.tokenizer.encode(prompt, add_bos=False)
        try:
            output = llm.stream(ids, params, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
            messages.pop()
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": output.text.strip()})


def run_bench(args) -> int:
    import json
    from pathlib import Path

    from nemolite.bench import WORKLOADS, bench

    engine = engine_options(args)
    options = {"dtype": args.dtype, "device": args.device, "engine": engine, "gguf": args.gguf or [],
               "quantization": engine.pop("quantization"), "quantizations": args.quantizations, "repeat": args.repeat,
               "lora": args.lora}
    rows = bench(args.workload or list(WORKLOADS), Path(args.model) if args.model else None,
                 [b.strip() for b in args.backends.split(",") if b.strip()], options)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 1 if any(row.get("error") for row in rows) else 0


def run_serve(args) -> int:
    import os

    from nemolite.checkpoint import resolve_model_path
    from nemolite.engine.async_llm import AsyncLLM
    from nemolite.server.app import serve
    from nemolite.engine.validation import RequestLimits
    from nemolite.server.state import DEFAULT_MAX_QUEUE, DEFAULT_MAX_REQUEST_BYTES

    path = resolve_model_path(args.model)
    name = args.served_model_name or (path.name if args.model is not None else "nemolite-demo")
    api_key = args.api_key or os.environ.get("NEMOLITE_API_KEY") or None
    max_queue = DEFAULT_MAX_QUEUE if args.max_queue is None else args.max_queue
    if max_queue < 0:
        raise NemoliteError("--max-queue must be >= 0")
    logging.getLogger("nemolite.access").setLevel(logging.INFO)
    log.info("loading %s%s", path, f" ({args.quantization})" if args.quantization else "")
    max_request_bytes = DEFAULT_MAX_REQUEST_BYTES if args.max_request_bytes is None else args.max_request_bytes
    if max_request_bytes < 1:
        raise NemoliteError("--max-request-bytes must be >= 1")
    limits = RequestLimits(args.max_seqs_per_request, args.max_stop_strings, args.max_stop_length, args.max_logprobs,
                           args.max_full_logprob_values)
    engine = AsyncLLM(path, dtype=args.dtype, device=args.device, seed=args.seed, limits=limits,
                      **engine_options(args))
    weights = _reward_weights(args.reward_weights, engine.config.reward_attributes)
    doors = ("reward model: POST /v1/reward, /v1/chat/completions, Triton reward_model"
             if engine.config.is_reward_model else "NeMo PUT /generate, OpenAI /v1, Triton /v2")
    log.info("serving %r on http://%s:%d (%s)", name, args.host, args.port, doors)
    if not args.no_playground:
        log.info("playground: http://%s:%d/", "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host, args.port)
    serve(engine, name, args.host, args.port, api_key=api_key, max_queue=max_queue, reward_weights=weights,
          max_request_bytes=max_request_bytes, lora_modules=lora_modules(args.lora_modules, args.lora_dir),
          allow_runtime_lora=args.allow_runtime_lora, enable_playground=not args.no_playground)
    return 0


def lora_modules(specs: list[str], directory: str | None) -> dict[str, str]:
    """``--lora-modules`` (NAME=PATH or vLLM's JSON form) and ``--lora-dir`` (NIM's: one adapter per
    sub-directory, named after it) as {name: path}."""
    import json
    from pathlib import Path

    modules: dict[str, str] = {}
    for spec in specs:
        if spec.lstrip().startswith("{"):
            try:
                entry = json.loads(spec)
            except ValueError as error:
                raise NemoliteError(f"--lora-modules {spec!r} is not valid JSON ({error})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                    or not isinstance(entry.get("path"), str):
                raise NemoliteError(f'--lora-modules {spec!r}: give {{"name": ..., "path": ...}}')
            name, path = entry["name"], entry["path"]
        else:
            name, _, path = spec.partition("=")
            if not name or not path:
                raise NemoliteError(f"--lora-modules {spec!r}: give NAME=PATH")
        if name in modules:
            raise NemoliteError(f"--lora-modules names {name!r} twice")
        modules[name] = path
    if directory is not None:
        root = Path(directory)
        if not root.is_dir():
            raise NemoliteError(f"--lora-dir {directory} is not a directory")
        for child in sorted(root.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and child.name not in modules:
                modules[child.name] = str(child)
    return modules


def _reward_weights(text: str | None, names: tuple[str, ...]) -> list[float] | None:
    """``--reward-weights``: "0.3,0.74,..." in head order, or "helpfulness=0.5,verbosity=-1"."""
    from nemolite.reward import resolve_weights

    if text is None:
        return None
    if not names:
        raise NemoliteError("--reward-weights is for reward models; this checkpoint has no reward head")
    try:
        if "=" in text:
            pairs = (item.split("=", 1) for item in text.split(","))
            weights = {name.strip(): float(value) for name, value in pairs}
        else:
            weights = [float(item) for item in text.split(",")]
    except ValueError:
        raise NemoliteError(f"--reward-weights {text!r}: give numbers, e.g. 0,0,0,0,0.3,0.74,0.46,0.47,-0.33 "
                            "or helpfulness=1,verbosity=-0.5") from None
    return resolve_weights(weights, names)


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    upper = text.strip().upper()
    for unit, scale in units.items():
        if upper.endswith(unit):
            number = upper[:-len(unit)]
            break
    else:
        number, scale = upper, 1
    try:
        return int(float(number) * scale)
    except ValueError:
        raise NemoliteError(f"cannot read the size {text!r}; write e.g. 5GB or 500MB") from None


def run_convert(args) -> int:
    from pathlib import Path

    from nemolite.checkpoint.convert import convert
    from nemolite.lora.export import is_nemo_lora, write_peft
    from nemolite.lora.nemo import read_nemo_adapter
    from nemolite.lora.peft import is_peft_adapter

    if is_peft_adapter(Path(args.source)):
        raise NemoliteError(f"{args.source} is a PEFT adapter already; serve it with --lora-modules, or merge it "
                            "into its base model with `nemolite merge-lora BASE ADAPTER DST`")
    if is_nemo_lora(args.source):  # a NeMo LoRA adapter: written as a PEFT directory
        if args.quantization or args.dtype not in (None, "auto"):
            raise NemoliteError("--quantization and --dtype are for models; an adapter is written in fp32")
        adapter = read_nemo_adapter(args.source, Path(args.source).stem, {})
        print(write_peft(adapter, args.destination, overwrite=args.overwrite))
        return 0
    destination = convert(args.source, args.destination, dtype=args.dtype, max_shard_bytes=_size(args.max_shard_size),
                          overwrite=args.overwrite, quantization=args.quantization)
    print(destination)
    return 0


def run_merge_lora(args) -> int:
    from nemolite.checkpoint.convert import convert

    destination = convert(args.base, args.destination, dtype=args.dtype, max_shard_bytes=_size(args.max_shard_size),
                          overwrite=args.overwrite, lora=args.adapter)
    print(destination)
    return 0


def run_plan(args) -> int:
    from nemolite.checkpoint import model_config
    from nemolite.plan import format_plan, plan

    config = model_config(args.model)
    layouts = plan(config, args.gpus, args.gpu_memory, args.dtype, args.kv_dtype, args.gpu_memory_utilization,
                   args.quantization)
    print(format_plan(config, layouts, args.gpus, args.gpu_memory, args.dtype, args.quantization))
    return 0 if any(layout.fits for layout in layouts) else 1


def run_sdg(args) -> int:
    import os

    from nemolite.sdg import run_pipeline

    if args.quantization and args.endpoint:
        raise NemoliteError("--quantization is for the in-process model; the server at --endpoint runs its own "
                            "(start it with `nemolite serve MODEL --quantization ...`)")
    summary = run_pipeline(args.pipeline, args.out, endpoint=args.endpoint, model=args.model,
                           quantization=args.quantization,
                           api_key=args.api_key or os.environ.get("NEMOLITE_API_KEY") or None,
                           reward_endpoint=args.reward_endpoint, config=args.config, rows=args.rows, seed=args.seed,
                           concurrency=args.concurrency, num_shards=args.num_shards, shard_id=args.shard_id,
                           progress=sys.stderr.isatty())
    print(summary.format(), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # nemolite's own progress and status at INFO; other libraries (httpx, torch...) stay at WARNING.
    level = log.level
    log.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    handlers = {"generate": run_generate, "chat": run_chat, "serve": run_serve, "convert": run_convert,
                "plan": run_plan, "bench": run_bench, "sdg": run_sdg, "merge-lora": run_merge_lora}
    try:
        return handlers[args.command](args)
    except NemoliteError as error:
        print(f"nemolite: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        log.setLevel(level)  # main() called in-process (tests, scripts) leaves the logger as it was
