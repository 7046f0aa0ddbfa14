"""The batching engine: same outputs alone or batched, under preemption, chunking and prefix caching."""

from __future__ import annotations

import asyncio
import gc
import sys

import pytest

from nemolite import LLM, SamplingParams
from nemolite.engine.async_llm import AsyncLLM
from tests.conftest import DEVICE

PROMPTS = ["the model returns a value", "python reads files", "numbers like 42 and 1024 stay", "café",
           "each line ends with a newline character and the string holds one or more words", "emoji 🙂",
           "the list is empty", "são paulo"]


def params_for(index: int) -> SamplingParams:
    if index % 2:
        return SamplingParams(temperature=0.9, top_p=0.95, seed=100 + index, max_tokens=12 + index, ignore_eos=True)
    return SamplingParams(temperature=0, max_tokens=10 + index, ignore_eos=True)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def alone(nemotron_llm):
    return [nemotron_llm.generate(p, params_for(i))[0].outputs[0].token_ids for i, p in enumerate(PROMPTS)]


def test_batched_equals_alone(nemotron_llm, alone):
    batched = nemotron_llm.generate(PROMPTS, [params_for(i) for i in range(len(PROMPTS))], use_tqdm=False)
    assert token_ids(batched) == alone


def test_small_kv_budget_preempts_and_still_agrees(nemotron_dir, alone):
    llm = LLM(nemotron_dir, dtype="float32", device=DEVICE, block_size=4, kv_cache_gb=20 * 2048 / 1e9)  # 2048 bytes a block
    assert llm.engine.block_manager.num_blocks == 20
    outputs = llm.generate(PROMPTS, [params_for(i) for i in range(len(PROMPTS))], use_tqdm=False)
    assert token_ids(outputs) == alone
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == 20


def test_chunked_prefill_agrees(nemotron_dir, alone):
    llm = LLM(nemotron_dir, dtype="float32", device=DEVICE, max_num_batched_tokens=5, max_num_seqs=3)
    outputs = llm.generate(PROMPTS, [params_for(i) for i in range(len(PROMPTS))], use_tqdm=False)
    assert token_ids(outputs) == alone


def test_prefix_cache_hits_and_agrees(nemotron_dir):
    shared = "each line ends with a newline character and the string holds one or more words " * 3
    prompts = [shared + tail for tail in ("python", "the model", "numbers")]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    cached = LLM(nemotron_dir, dtype="float32", device=DEVICE, block_size=4)
    first = cached.generate(prompts[0], greedy)
    rest = cached.generate(prompts[1:], greedy, use_tqdm=False)
    assert cached.engine.block_manager.prefix_hit_rate > 0.5
    plain = LLM(nemotron_dir, dtype="float32", device=DEVICE, enable_prefix_caching=False)
    assert token_ids(first + rest) == token_ids(plain.generate(prompts, greedy, use_tqdm=False))
    assert plain.engine.block_manager.prefix_hit_rate == 0


def test_n_samples_share_the_prompt(nemotron_dir):
    llm = LLM(nemotron_dir, dtype="float32", device=DEVICE, block_size=4)
    prompt = "each line ends with a newline character and the string holds one or more words"
    [result] = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True))
    assert len(result.outputs) == 4 and len({tuple(o.token_ids) for o in result.outputs}) > 1
    assert llm.engine.block_manager.prefix_hits > 0


def test_async_stream_and_abort(nemotron_dir):
    engine = AsyncLLM(nemotron_dir, dtype="float32", device=DEVICE)
    ids = engine.tokenizer.encode("the model returns")

    async def main():
        texts = []
        async for output in engine.generate(ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)):
            texts.append(output.outputs[0].text)
        assert output.finished and output.outputs[0].finish_reason == "length"
        assert texts == sorted(texts, key=len) and len(texts) >= 2
        stream = engine.generate(ids, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()  # the client went away: the request is aborted
        async for empty in engine.generate(ids, SamplingParams(max_tokens=0)):
            assert empty.finished and empty.outputs[0].token_ids == []
        return texts[-1]

    try:
        final = asyncio.run(main())
        stats = engine.stats()
        assert stats["num_running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
        assert sys.getswitchinterval() <= 0.001  # the engine thread gets the GIL back within 1 ms
        assert gc.get_freeze_count() > 0  # the startup heap is out of the cyclic GC's way
        assert final == LLM(nemotron_dir, dtype="float32", device=DEVICE).generate(
            "the model returns", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].text
    finally:
        engine.shutdown()


def test_prompt_logprobs_match_transformers(nemotron_dir):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = "each line ends with a newline character and the string holds one or more words"
    llm = LLM(nemotron_dir, dtype="float32", device=DEVICE, max_num_batched_tokens=7, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)
    llm.generate(prompt, SamplingParams(max_tokens=2))  # a cached prefix must not skip any scored position
    [result, _] = llm.generate([prompt, "python"], params, use_tqdm=False)
    ids = result.prompt_token_ids
    reference = AutoModelForCausalLM.from_pretrained(nemotron_dir, dtype=torch.float32)
    expected = reference(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert len(result.prompt_logprobs) == len(ids) and result.prompt_logprobs[0] is None
    for position, entry in enumerate(result.prompt_logprobs[1:]):
        token = ids[position + 1]
        assert abs(entry[token].logprob - expected[position, token].item()) <= 1e-4
        assert entry[token].rank == int((expected[position] > expected[position, token]).sum()) + 1
        assert len(entry) >= 2


def test_stale_cache_memory_never_leaks_into_outputs(nemotron_dir, alone):
    """The cache is allocated uninitialised; blocks are zeroed when handed out."""
    llm = LLM(nemotron_dir, dtype="float32", device=DEVICE, block_size=4, kv_cache_gb=40 * 2048 / 1e9)
    for cache in llm.engine.cache.keys + llm.engine.cache.values:
        cache.fill_(float("nan"))
    outputs = llm.generate(PROMPTS, [params_for(i) for i in range(len(PROMPTS))], use_tqdm=False)
    assert token_ids(outputs) == alone


def test_compiled_decode_equals_eager(nemotron_dir, alone):
    """The torch.compile'd decode step (fp32 here) gives the eager engine's tokens."""
    llm = LLM(nemotron_dir, dtype="float32", device=DEVICE, compile=True)
    outputs = llm.generate(PROMPTS[:2], [params_for(0), params_for(1)], use_tqdm=False)
    assert token_ids(outputs) == alone[:2]
    decoder = llm.engine.runner.decoder
    assert decoder.compiled_buckets == {1, 2}
    if DEVICE == "cpu":  # after a step checked it, a kind is called without Dynamo (CUDA replays CUDA graphs)
        assert set(decoder._direct) == {(1, True, False), (2, True, False)}


def test_a_direct_step_that_disagrees_with_dynamo_is_not_used(nemotron_dir, alone, monkeypatch):
    """The direct call of a compiled step is checked once against Dynamo's; outputs that differ (a wrong
    mapping of inputs or outputs) keep the step on Dynamo, and the tokens stay right."""
    from nemolite.engine import compiled

    if DEVICE != "cpu":
        pytest.skip("CUDA replays CUDA graphs through Dynamo")
    call = compiled._DirectStep.__call__

    def swapped(self, inputs):
        logits, keys, values = call(self, inputs)
        return logits, values, keys  # keys where values belong

    monkeypatch.setattr(compiled._DirectStep, "__call__", swapped)
    llm = LLM(nemotron_dir, dtype="float32", device=DEVICE, compile=True)
    assert token_ids(llm.generate(PROMPTS[:1], params_for(0), use_tqdm=False)) == alone[:1]
    decoder = llm.engine.runner.decoder
    assert decoder.compiled_buckets == {1} and decoder._direct == {} and decoder._unchecked == {}


def test_two_compiled_engines_in_one_process_keep_their_own_graphs(nemotron_dir, llama_dir, alone):
    """Both engines trace the same code; once warm they skip all but the guards that tell graphs apart, so
    each step must still run its own engine's graph (different weights, different vocabularies)."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llama_eager = LLM(llama_dir, dtype="float32", device=DEVICE).generate(PROMPTS[:3], params, use_tqdm=False)
    nemotron = LLM(nemotron_dir, dtype="float32", device=DEVICE, compile=True)
    llama = LLM(llama_dir, dtype="float32", device=DEVICE, compile=True)
    for _ in range(2):  # the second round runs every graph warm
        assert token_ids(nemotron.generate(PROMPTS[:1], params_for(0), use_tqdm=False)) == alone[:1]
        assert token_ids(llama.generate(PROMPTS[:3], params, use_tqdm=False)) == token_ids(llama_eager)
        assert token_ids(nemotron.generate(PROMPTS[:2], [params_for(0), params_for(1)], use_tqdm=False)) == alone[:2]


def test_kv_budget_flags(nemotron_dir):
    from nemolite.errors import NemoliteError

    small = LLM(nemotron_dir, dtype="float32", device=DEVICE, kv_cache_gb=2 * 8192 / 1e9)
    assert small.engine.block_manager.num_blocks == 2  # blocks of 16 tokens x 2 layers x 2 KV heads x 16 x fp32, K and V
    fraction = LLM(nemotron_dir, dtype="float32", device=DEVICE, kv_cache_fraction=0.001)
    assert fraction.engine.block_manager.num_blocks > 0
    with pytest.raises(NemoliteError, match="not both"):
        LLM(nemotron_dir, dtype="float32", device=DEVICE, kv_cache_gb=1, kv_cache_fraction=0.1)
    with pytest.raises(NemoliteError, match="kv-cache-fraction"):
        LLM(nemotron_dir, dtype="float32", device=DEVICE, kv_cache_fraction=2.0)
    with pytest.raises(NemoliteError, match="cannot hold"):
        small.generate("the model", SamplingParams(max_tokens=100))


def test_full_vocabulary_logprobs_match_transformers(nemotron_dir):
    """NeMo all_probs: the whole logprob row of every prompt position after the first and every new token."""
    import torch
    from transformers import AutoModelForCausalLM

    llm = LLM(nemotron_dir, dtype="float32", device=DEVICE, max_num_batched_tokens=6)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=0, full_logprobs=True)
    [result] = llm.generate("the model returns a value", params)
    output = result.outputs[0]
    sequence = result.prompt_token_ids + output.token_ids
    reference = AutoModelForCausalLM.from_pretrained(nemotron_dir, dtype=torch.float32)
    expected = reference(torch.tensor([sequence])).logits[0].log_softmax(-1)
    rows = result.prompt_full_logprobs + output.full_logprobs
    assert len(rows) == len(sequence) - 1
    assert all(row.shape == (llm.config.vocab_size,) for row in rows)
    assert (torch.stack(rows) - expected[:-1]).abs().max().item() <= 1e-4


def test_zero_max_tokens_beside_running_requests(nemotron_llm):
    outputs = nemotron_llm.generate(["the model", "python reads"], [SamplingParams(max_tokens=5, ignore_eos=True),
                                                                    SamplingParams(max_tokens=0)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [5, 0]
    assert outputs[1].outputs[0].finish_reason == "length" and outputs[1].finished
