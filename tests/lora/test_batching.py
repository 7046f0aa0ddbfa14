"""Many adapters in one batch: each request gets exactly the tokens it gets alone."""

from __future__ import annotations

import pytest

from nemolite import LLM, LoRARequest, SamplingParams
from tests.conftest import DEVICE

PROMPTS = [[2, 17, 45, 99, 3, 250, 31, 8, 77, 120, 200, 5, 64, 9, 10, 11, 12, 13, 14],
           [2, 300, 12, 19, 101, 7], [2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
           [2, 44, 45, 46]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, logprobs=1, ignore_eos=True)


def requests(peft_adapters) -> list[LoRARequest | None]:
    return [LoRARequest("qv", 1, str(peft_adapters["qv"])), LoRARequest("all", 2, str(peft_adapters["all-rslora"])),
            None, LoRARequest("patterns", 3, str(peft_adapters["patterns"]))]


def outputs(llm: LLM, prompts, loras) -> list[tuple[list[int], list[float]]]:
    results = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, lora_request=loras, use_tqdm=False)
    return [(r.outputs[0].token_ids, [next(iter(e.values())).logprob for e in r.outputs[0].logprobs]) for r in results]


@pytest.fixture(scope="module")
def alone(lora_base, peft_adapters):
    llm = LLM(lora_base, dtype="float32", device=DEVICE, enable_lora=True, max_loras=4, max_lora_rank=8)
    return [outputs(llm, [prompt], [lora])[0] for prompt, lora in zip(PROMPTS, requests(peft_adapters))]


@pytest.mark.parametrize("max_loras", [4, 2])
def test_mixed_batch_equals_each_request_alone(lora_base, peft_adapters, alone, max_loras):
    # with 2 slots for 3 adapters the scheduler holds a request back until a slot frees, and slots are reused
    llm = LLM(lora_base, dtype="float32", device=DEVICE, enable_lora=True, max_loras=max_loras, max_lora_rank=8)
    together = outputs(llm, PROMPTS, requests(peft_adapters))
    assert [tokens for tokens, _ in together] == [tokens for tokens, _ in alone]
    assert [logprobs for _, logprobs in together] == [logprobs for _, logprobs in alone]  # fp32: identical
    assert len({tuple(tokens) for tokens, _ in alone}) == 4  # the adapters do change the answers
    if max_loras == 2:
        assert llm.engine.lora.num_evictions >= 1


def test_prefix_cache_is_keyed_by_adapter(lora_base, peft_adapters, alone):
    llm = LLM(lora_base, dtype="float32", device=DEVICE, enable_lora=True, max_loras=4, max_lora_rank=8)
    adapter = requests(peft_adapters)[0]
    same_prompt = [PROMPTS[0], PROMPTS[0]]
    first = outputs(llm, [PROMPTS[0]], [adapter])  # fills the cache with the adapter's K/V of this prompt
    base_after = outputs(llm, same_prompt[:1], [None])[0]
    fresh = LLM(lora_base, dtype="float32", device=DEVICE, enable_lora=True, max_lora_rank=8)
    assert base_after[0] == outputs(fresh, [PROMPTS[0]], [None])[0][0]
    assert first[0][0] == alone[0][0]
    hits = llm.engine.block_manager.prefix_hits
    outputs(llm, [PROMPTS[0]], [adapter])  # the same adapter again: its blocks are reused
    assert llm.engine.block_manager.prefix_hits > hits


def test_compiled_decode_step_with_adapters(lora_base, peft_adapters, alone):
    llm = LLM(lora_base, dtype="float32", device=DEVICE, enable_lora=True, max_loras=4, max_lora_rank=8,
              compile=True)
    together = outputs(llm, PROMPTS, requests(peft_adapters))
    assert [tokens for tokens, _ in together] == [tokens for tokens, _ in alone]
    for (_, got), (_, want) in zip(together, alone):
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4
    assert any(kind[2] for kind in llm.engine.runner.decoder.compiled_kinds)  # the LoRA graph ran
