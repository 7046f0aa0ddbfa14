"""How often a request's tokens are the same alone and inside a full mixed batch, in a given dtype.

In fp32 the engine's outputs are identical (tests/engine/test_engine.py); in bf16 a GEMM of
16 rows may round differently from one of 1 row, and greedy decoding can then diverge.

    python benchmarks/batch_invariance.py [MODEL] --dtype bfloat16 --requests 16 --max-tokens 64
"""

from __future__ import annotations

import argparse

import torch

from nemolite import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="checkpoint (default: the demo model)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    llm = LLM(args.model, dtype=args.dtype, device="cpu")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, llm.config.vocab_size, (8 + 3 * i,), generator=generator).tolist()
               for i in range(args.requests)]
    params = [SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True) if i % 2 == 0 else
              SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens, ignore_eos=True)
              for i in range(args.requests)]
    alone = [llm.generate(prompt_token_ids=[p], sampling_params=q, use_tqdm=False)[0].outputs[0].token_ids
             for p, q in zip(prompts, params)]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params,
                                                            use_tqdm=False)]
    same_requests = sum(a == b for a, b in zip(alone, batched))
    same_prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(alone, batched)]
    total = sum(len(a) for a in alone)
    print(f"{args.dtype}: {same_requests}/{args.requests} requests identical alone and batched; "
          f"{sum(same_prefix)}/{total} tokens ({100 * sum(same_prefix) / total:.1f}%) before the first divergence")


if __name__ == "__main__":
    main()
