"""Decode throughput of concurrent JSON-schema requests against the same number of unconstrained ones.

Both sets run in one process, one after the other, alternating for ``--repeat`` rounds; each request
samples at temperature 0.8 for exactly ``--max-tokens`` tokens (the unconstrained ones ignore EOS, the
schema asks for a long array of records, so that none ends early and both keep the batch full).
Decode throughput is the tokens after each request's first over the time from the last first token
to the end. Prints the medians and their ratio.

    python benchmarks/structured_output.py [MODEL] --requests 16 --max-tokens 128 --repeat 3 [--compile] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nemolite import LLM, SamplingParams

SCHEMA = {
    "type": "array", "minItems": 100,
    "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "age", "kind", "tags", "score"],
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "kind": {"enum": ["person", "place", "thing"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
    },
}


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
    engine = llm.engine
    for index, (prompt, param) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{index}-{time.monotonic_ns()}", None, prompt, param)
    first: dict[str, float] = {}
    tokens: dict[str, int] = {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for request, _ in engine.step_requests():
            if request.error is not None:
                raise request.error
            count = len(request.seqs[0].output.token_ids)
            if count and request.request_id not in first:
                first[request.request_id] = time.perf_counter()
            tokens[request.request_id] = count
    end = time.perf_counter()
    decode_start = max(first.values())
    decode_tokens = sum(count - 1 for count in tokens.values())
    return {"decode_tok_s": decode_tokens / (end - decode_start), "e2e_tok_s": sum(tokens.values()) / (end - start),
            "tokens": sum(tokens.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="checkpoint (default: the demo model)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's CPU threads (fewer than the cores: the masks are computed on the free one "
                             "while the forward pass runs)")
    args = parser.parse_args()
    llm = LLM(args.model, dtype=args.dtype, device="cpu", compile=args.compile, max_num_seqs=args.requests,
              cpu_threads=args.threads)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(7, llm.config.vocab_size, (args.prompt_len,), generator=generator).tolist()
               for _ in range(args.requests)]
    free = [SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens, ignore_eos=True)
            for i in range(args.requests)]
    constrained = [SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens,
                                  structured_outputs={"json": SCHEMA}) for i in range(args.requests)]
    run(llm, prompts, free)  # warm-up: every batch size once (and the compiled step)
    run(llm, prompts, constrained)
    results: dict[str, list[dict]] = {"unconstrained": [], "json-schema": []}
    for _ in range(args.repeat):
        results["unconstrained"].append(run(llm, prompts, free))
        results["json-schema"].append(run(llm, prompts, constrained))
    medians = {}
    for name, rows in results.items():
        medians[name] = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
        print(f"{name:14s} decode {medians[name]['decode_tok_s']:7.1f} tok/s  e2e {medians[name]['e2e_tok_s']:7.1f} "
              f"tok/s  ({medians[name]['tokens']:.0f} tokens; runs: "
              f"{', '.join(format(row['decode_tok_s'], '.0f') for row in rows)})")
    ratio = medians["json-schema"]["decode_tok_s"] / medians["unconstrained"]["decode_tok_s"]
    print(f"json-schema / unconstrained decode throughput: {ratio:.2f}x ({args.requests} requests, "
          f"{args.max_tokens} tokens, compile={args.compile}, masks during the forward pass: "
          f"{llm.engine._masks.free_core()})")


if __name__ == "__main__":
    main()
