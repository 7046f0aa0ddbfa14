"""One rank of a parallel test job (or the single-process reference): greedy tokens and full prompt
log-probabilities of fixed prompts (a reward model: the rewards of fixed conversations), saved by rank 0
to OUT.

    torchrun --nproc-per-node N tests/parallel/rank_main.py MODEL TP PP OUT [QUANTIZATION]
"""

import os
import sys

import torch

from nemolite import LLM, LoRARequest, SamplingParams

PROMPTS = [[5, 17, 42, 7, 99, 3 + 1, 250, 18], [9, 9, 120, 33], list(range(30, 90, 3))]


def main() -> None:
    model, tp, pp, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    quantization = sys.argv[5] if len(sys.argv) > 5 else None
    adapter = os.environ.get("NEMOLITE_TEST_LORA")  # a LoRA adapter for the first and last prompts
    llm = LLM(model, dtype="float32", device="cpu", kv_cache_gb=0.01, block_size=4, max_num_batched_tokens=16,
              tensor_parallel_size=tp, pipeline_parallel_size=pp, quantization=quantization,  # small chunks: prefill spans several steps
              **({"enable_lora": True, "max_lora_rank": 8} if adapter else {}))
    lora = [LoRARequest("a", 1, adapter), None, LoRARequest("a", 1, adapter)] if adapter else None
    if llm.config.is_reward_model:
        conversations = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "an answer"}]
                         for i in range(5)]
        rewards = [list(r["attributes"].values()) for r in llm.reward(conversations, use_tqdm=False)]
        llm.engine.close()
        torch.save({"tokens": [], "logprobs": [torch.tensor(rewards)]}, out)
        return
    greedy = llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False, lora_request=lora)
    scored = llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(
        max_tokens=0, prompt_logprobs=0, full_logprobs=True), use_tqdm=False, lora_request=lora)
    llm.engine.close()
    torch.save({"tokens": [o.outputs[0].token_ids for o in greedy],
                "logprobs": [torch.stack(o.prompt_full_logprobs) for o in scored]}, out)


if __name__ == "__main__":
    main()
