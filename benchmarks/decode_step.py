"""Where a batch-1 decode step's time goes: the compiled graph, the runner around it, the sampler and
output processing, and the rest of the engine loop, in ms per step (medians over --repeat runs).

    python benchmarks/decode_step.py --model /path/to/checkpoint --quantization int4-head

Without --model it uses (creating it once) the 204 M-parameter benchmark checkpoint of `nemolite bench`. The graph's
share is what the kernels cost (weights streamed, attention, norms); everything else is per-step
overhead that llama.cpp does not pay in Python. Timing wraps the engine's own methods, so the figures
include the wrappers' few microseconds.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time


def timed(owner, name: str, label: str, totals: dict) -> None:
    function = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - started

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the benchmark checkpoint)")
    parser.add_argument("--quantization", default=None, help="none, int8, int4, int4-head ...")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per run (default 128)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs (default 5)")
    args = parser.parse_args()

    from nemolite import LLM, SamplingParams
    from nemolite.bench import default_checkpoint, make_bench_checkpoint
    from nemolite.engine import compiled

    model = args.model or make_bench_checkpoint(default_checkpoint())
    quantization = None if args.quantization in (None, "none") else args.quantization
    llm = LLM(model, compile=True, quantization=quantization, max_num_seqs=4)
    engine = llm.engine
    decoder = engine.runner.decoder
    totals: dict[str, float] = collections.defaultdict(float)
    timed(decoder, "graph", "graph", totals)  # a step's first calls, through Dynamo
    timed(compiled._DirectStep, "__call__", "graph", totals)  # the later ones, called directly
    timed(engine.runner, "_execute_compiled", "runner", totals)
    timed(engine.runner, "execute", "execute", totals)
    timed(engine, "_process", "sample + outputs", totals)
    timed(engine, "step_requests", "engine step", totals)
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    prompt = [[5 + i for i in range(32)]]
    llm.generate(prompt_token_ids=prompt, sampling_params=params, use_tqdm=False)  # compiles
    runs = []
    for _ in range(args.repeat):
        totals.clear()
        started = time.perf_counter()
        llm.generate(prompt_token_ids=prompt, sampling_params=params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        steps = args.tokens - 1  # the first token comes from the (eager) prefill step
        graph, runner, execute = totals["graph"], totals["runner"], totals["execute"]
        process, step = totals["sample + outputs"], totals["engine step"]
        runs.append({"tok/s": args.tokens / elapsed, "graph": graph / steps,
                     "runner around the graph": (runner - graph) / steps,
                     "sample + outputs": process / args.tokens,
                     "rest of the engine step": (step - execute - process) / args.tokens,
                     "outside the engine": (elapsed - step) / args.tokens,
                     "prefill step (once)": execute - runner})
    print(f"batch-1 decode, {args.tokens} tokens, {args.quantization or 'none'}, medians of {args.repeat} runs:")
    for key in runs[0]:
        value = statistics.median(run[key] for run in runs)
        print(f"  {key:>24}: {value:8.1f}" if key == "tok/s" else f"  {key:>24}: {value * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
