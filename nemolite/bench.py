"""``nemolite bench``: named workloads against nemolite and, in the same run, its peers.

Each backend runs in its own subprocess (so peak RSS is its own) on the same checkpoint and
the same random prompts; the parent prints tokens/s, achieved GB/s (weight bytes read per
decode step x steps/s), time to first token, inter-token latency, peak RSS and the ratios.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# The benchmark model: a random Nemotron-4-architecture checkpoint, 204 M parameters in bf16.
BENCH_CONFIG = {
    "architectures": ["NemotronForCausalLM"], "model_type": "nemotron", "vocab_size": 32000, "hidden_size": 1024,
    "intermediate_size": 4096, "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 64, "hidden_act": "relu2", "max_position_embeddings": 4096, "norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    "bos_token_id": 2, "eos_token_id": 3, "tie_word_embeddings": False, "dtype": "bfloat16",
}


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    description: str


WORKLOADS = {w.name: w for w in (
    Workload("decode-1", 1, 32, 128, "batch-1 greedy decode, 32-token prompt, 128 new tokens"),
    Workload("batch-16", 16, 32, 128, "16 concurrent requests x 128 new tokens"),
    Workload("batch-64", 64, 32, 64, "64 concurrent requests x 64 new tokens"),
    Workload("prefix-1000", 1, 1000, 1, "time to first token of a request whose 1,000-token prefix is cached"),
)}
SOLO_WORKLOADS = {"prefix-1000"}  # measure nemolite against itself (no peer has a prefix cache here)


def default_checkpoint() -> Path:
    return Path(os.environ.get("NEMOLITE_CACHE", Path.home() / ".cache" / "nemolite")) / "bench-nemotron-204m"


def make_bench_checkpoint(path: Path) -> Path:
    """Random weights (std 0.02) saved in bf16, plus a word-level tokenizer covering the vocabulary."""
    if (path / "model.safetensors").exists():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from nemolite.checkpoint.hf import save_hf_model
    from nemolite.config import config_from_hf
    from nemolite.model import CausalLM

    print(f"creating the benchmark checkpoint in {path}", file=sys.stderr)
    torch.manual_seed(0)
    model = CausalLM(config_from_hf(BENCH_CONFIG)).to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.02) if param.dim() == 2 else param.zero_()
    tmp = path.with_name(path.name + ".partial")
    save_hf_model(model, tmp, BENCH_CONFIG)
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{f"w{i}": i for i in range(4, BENCH_CONFIG["vocab_size"])}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tmp.rename(path)
    return path


def weight_bytes(path: Path) -> int:
    """Bytes of weights read per decode step: every matrix but the embedding (one row of it is read)."""
    from nemolite.checkpoint.hf import checkpoint_entries

    entries = checkpoint_entries(path)
    return sum(e.num_bytes for name, e in entries.items() if name != "model.embed_tokens.weight")


def prompts(workload: Workload, vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(4, vocab_size, (workload.batch_size, workload.prompt_len), generator=generator).tolist()


# --- backends (each runs in a subprocess: python -m nemolite.bench BACKEND WORKLOAD CHECKPOINT ARGS_JSON) ---

def bench_adapters(llm, count: int, rank: int = 16) -> list:
    """``count`` random rank-``rank`` PEFT adapters of every adaptable layer of ``llm``'s model, in a
    temporary directory: LoRARequests for them."""
    import tempfile

    from nemolite import LoRARequest
    from nemolite.lora.peft import write_peft_adapter

    root = Path(tempfile.mkdtemp(prefix="nemolite-bench-lora-"))
    shapes = llm.engine.lora.shapes
    generator = torch.Generator().manual_seed(7)
    requests = []
    for index in range(count):
        weights = {name: (torch.randn(rank, k, generator=generator) * 0.01,
                          torch.randn(n, rank, generator=generator) * 0.01) for name, (n, k) in shapes.items()}
        requests.append(LoRARequest(f"bench-{index}", index + 1,
                                    str(write_peft_adapter(root / f"bench-{index}", weights, rank, 2 * rank))))
    return requests


def run_nemolite(workload: Workload, path: Path, options: dict) -> dict:
    from nemolite import LLM, SamplingParams

    started = time.perf_counter()
    adapters = int(options.get("lora") or 0)
    engine_args = {**options.get("engine", {}),
                   **({"enable_lora": True, "max_loras": adapters, "max_lora_rank": 16} if adapters else {})}
    llm = LLM(path, dtype=options["dtype"], device=options.get("device"), quantization=options.get("quantization"),
              **engine_args)
    load_s = time.perf_counter() - started
    params = SamplingParams(temperature=0, max_tokens=workload.new_tokens, ignore_eos=True)
    batch = prompts(workload, llm.config.vocab_size)
    loras = bench_adapters(llm, adapters) if adapters else [None]
    lora_of = [loras[index % len(loras)] for index in range(len(batch))]  # spread over the batch
    warmup_started = time.perf_counter()
    # The whole workload once on other prompts: every batch size and context length the timed run
    # meets (requests join over several prefill chunks) is compiled before the clock starts.
    llm.generate(prompt_token_ids=[[t + 1 for t in p] for p in batch], sampling_params=params, use_tqdm=False,
                 lora_request=lora_of)
    warmup_s = time.perf_counter() - warmup_started
    engine = llm.engine
    first_token, token_times = {}, {}
    started = time.perf_counter()
    ids = [engine.add_request(None, None, p, params, lora) for p, lora in zip(batch, lora_of)]
    done = 0
    while done < len(ids):
        outputs = engine.step()
        now = time.perf_counter() - started
        for output in outputs:
            count = len(output.outputs[0].token_ids)
            first_token.setdefault(output.request_id, now)
            token_times.setdefault(output.request_id, []).append((count, now))
            done += output.finished
    elapsed = time.perf_counter() - started
    decoder = engine.runner.decoder
    compile_s = decoder.compile_seconds if decoder is not None else 0.0
    return _result(workload, elapsed, first_token, token_times, load_s, warmup_s, engine.stats()) | {
        "compile_s": compile_s, "weight_bytes": model_weight_bytes(llm.model)}


def model_weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every linear layer as stored (quantized values, scales and
    mins, or float), norms; not the embedding table, of which one row is read."""
    from nemolite.quant import quantized_weight_bytes

    embedding = model.model.embed_tokens.weight if model.model.embed_tokens is not None else None
    return quantized_weight_bytes(model) + sum(p.numel() * p.element_size() for p in model.parameters()
                       if p is not embedding and p.numel())


def gguf_weight_bytes(file: str) -> int:
    """The same for a GGUF file: every tensor's bytes but the token embedding's."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(file).tensors if t.name != "token_embd.weight")


def gguf_label(file: str) -> str:
    """llama.cpp's name of the file's type (BF16, Q8_0, Q4_0, Q4_K_M...), from general.file_type."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(file).fields.get("general.file_type")
    try:
        return LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
    except (AttributeError, ValueError, IndexError, TypeError):
        return Path(file).stem


def run_prefix(workload: Workload, path: Path, options: dict) -> dict:
    """TTFT of a 1,000-token prompt cold, then of another one sharing its first 1,000 tokens."""
    from nemolite import LLM, SamplingParams

    llm = LLM(path, dtype=options["dtype"], device=options.get("device"), **options.get("engine", {}))
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    # 1,000 tokens, or what the model's context leaves room for beside a 16-token suffix.
    prefix = prompts(workload, llm.config.vocab_size)[0][:llm.config.max_position_embeddings - 24]
    llm.generate(prompt_token_ids=[[5] * 64], sampling_params=params, use_tqdm=False)  # warm-up
    times = []
    for suffix in ([11] * 16, [12] * 16):
        started = time.perf_counter()
        llm.generate(prompt_token_ids=[prefix + suffix], sampling_params=params, use_tqdm=False)
        times.append(time.perf_counter() - started)
    return {"tokens": 2, "seconds": sum(times), "tokens_per_s": 2 / sum(times), "ttft_s": times[1],
            "cold_ttft_s": times[0], "speedup": times[0] / times[1], "itl_s": None, "steps_per_s": 0.0,
            "peak_rss_gb": _peak_rss_gb(), "engine": llm.engine.stats()}


def run_llama_cpp(workload: Workload, path: Path, options: dict) -> dict:
    """llama.cpp through llama-cpp-python on a GGUF of the same checkpoint (batch 1 only)."""
    import llama_cpp

    started = time.perf_counter()
    llm = llama_cpp.Llama(options["gguf"], n_ctx=workload.prompt_len + workload.new_tokens + 16,
                          n_threads=torch.get_num_threads(), n_batch=512, verbose=False)
    load_s = time.perf_counter() - started
    prompt = prompts(workload, llm.n_vocab())[0]

    def run(new_tokens: int) -> tuple[float, float]:
        llm.reset()
        begin = time.perf_counter()
        llm.eval(prompt)
        first = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([llm.sample(temp=0.0)])
        return first - begin, time.perf_counter() - first

    run(8)
    ttft, decode = run(workload.new_tokens)
    # the loop evaluates each sampled token, so the last of its evals produces nothing: the request's
    # own time is TTFT and new_tokens - 1 steps, the same span nemolite's figures cover
    itl = decode / workload.new_tokens
    seconds = ttft + itl * (workload.new_tokens - 1)
    return {"tokens": workload.new_tokens, "seconds": seconds, "tokens_per_s": workload.new_tokens / seconds,
            "decode_tokens_per_s": 1 / itl, "ttft_s": ttft, "itl_s": itl, "steps_per_s": 1 / itl,
            "load_s": load_s, "peak_rss_gb": _peak_rss_gb(), "weight_bytes": gguf_weight_bytes(options["gguf"])}


def run_transformers(workload: Workload, path: Path, options: dict) -> dict:
    from transformers import AutoModelForCausalLM

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "auto": torch.bfloat16}[options["dtype"]]
    started = time.perf_counter()
    device = torch.device(options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    load_s = time.perf_counter() - started
    batch = torch.tensor(prompts(workload, model.config.vocab_size), device=device)
    with torch.inference_mode():
        model.generate(batch[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        started = time.perf_counter()
        model.generate(batch, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        ttft = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(batch, max_new_tokens=workload.new_tokens, min_new_tokens=workload.new_tokens,
                             do_sample=False, pad_token_id=0)
        _synchronize(device)
        elapsed = time.perf_counter() - started
    generated = (out.shape[1] - workload.prompt_len) * workload.batch_size
    itl = (elapsed - ttft) / max(1, workload.new_tokens - 1)
    return {"tokens": generated, "seconds": elapsed, "tokens_per_s": generated / elapsed, "ttft_s": ttft,
            "decode_tokens_per_s": workload.batch_size / itl if itl > 0 else None, "itl_s": itl, "load_s": load_s,
            "steps_per_s": (out.shape[1] - workload.prompt_len) / elapsed, "peak_rss_gb": _peak_rss_gb()}


def _result(workload, elapsed, first_token, token_times, load_s, warmup_s, stats) -> dict:
    """tokens_per_s: end to end (every token over the whole time, prefill included); decode_tokens_per_s:
    the tokens after each request's first over the time after the first token came (the decode rate)."""
    generated = sum(times[-1][0] for times in token_times.values())
    after_first = generated - sum(times[0][0] for times in token_times.values())
    decode_s = elapsed - min(first_token.values())
    gaps = []
    for times in token_times.values():
        for (count_a, time_a), (count_b, time_b) in zip(times, times[1:]):
            if count_b > count_a:
                gaps.append((time_b - time_a) / (count_b - count_a))
    return {"tokens": generated, "seconds": elapsed, "tokens_per_s": generated / elapsed,
            "decode_tokens_per_s": after_first / decode_s if decode_s > 0 and after_first else None,
            "ttft_s": statistics.median(first_token.values()), "itl_s": statistics.median(gaps) if gaps else None,
            "steps_per_s": workload.new_tokens / elapsed, "load_s": load_s, "warmup_s": warmup_s,
            "peak_rss_gb": _peak_rss_gb(), "engine": stats}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


BACKENDS = {"nemolite": run_nemolite, "transformers": run_transformers, "llama.cpp": run_llama_cpp,
            "nemolite-prefix": run_prefix}


def run_in_subprocess(backend: str, workload: Workload, path: Path, options: dict) -> dict | None:
    """One run in a fresh process. The llama.cpp backend runs under $NEMOLITE_LLAMA_CPP_PYTHON when set
    (a venv with llama-cpp-python built for this CPU), with this nemolite on its path."""
    python, env = sys.executable, None
    if backend == "llama.cpp" and os.environ.get("NEMOLITE_LLAMA_CPP_PYTHON"):
        python = os.environ["NEMOLITE_LLAMA_CPP_PYTHON"]
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    command = [python, "-m", "nemolite.bench", backend, workload.name, str(path), json.dumps(options)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print(f"{backend} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def _variants(backends: list[str], options: dict, workload: Workload) -> list[tuple[str, str, dict]]:
    """(label, backend, options) of every run: nemolite once per ``options["quantizations"]`` entry (or
    the single ``quantization``), llama.cpp once per GGUF in ``options["gguf"]`` (batch 1 only)."""
    runs = []
    quantizations = options.get("quantizations") or [options.get("quantization")]
    ggufs = options.get("gguf") or []
    ggufs = [ggufs] if isinstance(ggufs, str) else list(ggufs)
    for backend in backends:
        if backend == "nemolite":
            for quantization in quantizations:
                label = "nemolite" + (f" {quantization}" if quantization else "")
                runs.append((label, backend, {**options, "quantization": quantization, "lora": 0}))
                if options.get("lora"):  # the same engine with adapters spread over the batch, beside it
                    runs.append((f"{label} lora x{options['lora']}", backend, {**options, "quantization": quantization}))
        elif backend == "llama.cpp":
            if workload.batch_size == 1:
                runs.extend((f"llama.cpp {gguf_label(g)}", backend, {**options, "gguf": g}) for g in ggufs)
        else:
            runs.append((backend, backend, options))
    return runs


def bench(workload_names: list[str], path: Path | None, backends: list[str], options: dict) -> list[dict]:
    """Run and print every workload; a backend that fails gets a row with an "error"."""
    path = path or make_bench_checkpoint(default_checkpoint())
    read_per_step = weight_bytes(path)
    rows = []
    for name in workload_names:
        workload = WORKLOADS[name]
        print(f"\n== {workload.name}: {workload.description} ({read_per_step / 1e6:.0f} MB of weights per step)")
        if name in SOLO_WORKLOADS:
            result = run_in_subprocess("nemolite-prefix", workload, path, options)
            if result is None:
                rows.append({"workload": name, "backend": "nemolite", "error": True})
            else:
                print(f"     nemolite: TTFT cold {result['cold_ttft_s'] * 1e3:.1f} ms, with the prefix cached "
                      f"{result['ttft_s'] * 1e3:.1f} ms: {result['speedup']:.1f} x lower "
                      f"(hit rate {result['engine']['prefix_cache_hit_rate']:.2f})")
                rows.append({"workload": name, "backend": "nemolite", **result})
            continue
        runs = _variants(backends, options, workload)
        results: dict[str, list[dict]] = {label: [] for label, _, _ in runs}
        for _ in range(max(1, int(options.get("repeat", 1)))):  # interleaved: drift hits every backend alike
            for label, backend, variant in runs:
                result = run_in_subprocess(backend, workload, path, variant)
                if result is not None:
                    results[label].append(result)
        medians = {}
        for label, _, _ in runs:
            if not results[label]:
                rows.append({"workload": name, "backend": label, "error": True})
                print(f"{label:>18}: failed")
                continue
            result = sorted(results[label], key=lambda r: r["tokens_per_s"])[len(results[label]) // 2]
            medians[label] = result
            gbps = result["steps_per_s"] * result.get("weight_bytes", read_per_step) / 1e9
            itl = f"{result['itl_s'] * 1e3:7.1f} ms" if result.get("itl_s") else "      -"
            compiled = f"  (compile {result['compile_s']:.0f} s, not timed)" if result.get("compile_s") else ""
            spread = (f"  [{min(r['tokens_per_s'] for r in results[label]):.1f}-"
                      f"{max(r['tokens_per_s'] for r in results[label]):.1f}]") if len(results[label]) > 1 else ""
            decode = result.get("decode_tokens_per_s")
            decode = f"{decode:8.1f}" if decode else "       -"
            print(f"{label:>18}: {result['tokens_per_s']:8.1f} tok/s{spread}  decode {decode} tok/s  "
                  f"{gbps:6.1f} GB/s of weights  TTFT {result['ttft_s'] * 1e3:7.1f} ms  ITL {itl}  "
                  f"peak RSS {result['peak_rss_gb']:.2f} GB{compiled}")
            rows.append({"workload": name, "backend": label, "gb_per_s": gbps, "runs": len(results[label]), **result})
        for label in medians:
            base = label.rsplit(" lora x", 1)[0]
            if label != base and base in medians:
                print(f"{'':>18}  {label} / {base}: {medians[label]['tokens_per_s'] / medians[base]['tokens_per_s']:.2f} x "
                      f"end to end, {medians[label]['decode_tokens_per_s'] / medians[base]['decode_tokens_per_s']:.2f} "
                      "x decode")
        for ours, other in _peers(list(medians)):
            mine, theirs = medians[ours], medians[other]
            line = f"{'':>18}  {ours} / {other}: {mine['tokens_per_s'] / theirs['tokens_per_s']:.2f} x end to end"
            if mine.get("decode_tokens_per_s") and theirs.get("decode_tokens_per_s"):
                line += f", {mine['decode_tokens_per_s'] / theirs['decode_tokens_per_s']:.2f} x decode"
            print(line)
    return rows


def weight_bits(label: str) -> int | None:
    """Bits per weight a row's label names: 16 for nemolite unquantized or a BF16/F16 GGUF, 8 for int8 or
    Q8_0, 4 for int4 or Q4_*; None where it names none (transformers, F32, other GGUF types)."""
    name = label.split(" ", 1)[1] if " " in label else ""
    if label.startswith("nemolite"):
        return 16 if not name else {"int8": 8, "int4": 4}.get(name.split("-")[0])
    if name.upper() in ("BF16", "F16"):
        return 16
    return int(name[1]) if len(name) > 1 and name[0].upper() == "Q" and name[1].isdigit() else None


def _peers(labels: list[str]) -> list[tuple[str, str]]:
    """(nemolite row, peer row) pairs to print a ratio for: each peer row of the same bits per weight
    (bf16 with BF16, int8 with Q8_0, int4 with Q4_0 and Q4_K_M); rows of no such width (transformers)
    against every nemolite row."""
    ours = [label for label in labels if label.startswith("nemolite")]
    pairs = []
    for other in (label for label in labels if not label.startswith("nemolite")):
        bits = weight_bits(other)
        pairs.extend((label, other) for label in ours if bits is None or weight_bits(label) == bits)
    return sorted(pairs, key=lambda pair: ours.index(pair[0]))


if __name__ == "__main__":
    backend_name, workload_name, checkpoint, options_json = sys.argv[1:5]
    outcome = BACKENDS[backend_name](WORKLOADS[workload_name], Path(checkpoint), json.loads(options_json))
    print(json.dumps(outcome))
