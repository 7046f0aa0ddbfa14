"""``kv_cache_dtype="fp8"``: K/V stored as e4m3 (with per-layer scales), twice the blocks in the same
budget, and attention over the widened values: the demo model's answers barely move."""

from __future__ import annotations

import pytest
import torch

from nemolite import LLM, SamplingParams
from nemolite.engine.kv_cache import FP8, PagedKVCache
from nemolite.errors import NemoliteError

PROMPTS = ["Return a list of the words in the string", "The json module"]


@pytest.fixture(scope="module")
def engines():
    return LLM(dtype="bfloat16", kv_cache_gb=0.02), LLM(dtype="bfloat16", kv_cache_gb=0.02, kv_cache_dtype="fp8")


def test_fp8_cache_holds_twice_the_blocks_as_bytes(engines):
    plain, fp8 = engines
    assert fp8.engine.cache.num_blocks // 2 == plain.engine.cache.num_blocks  # budget // half the bytes
    cache = fp8.engine.cache
    assert cache.fp8 and next(t for t in cache.keys if t is not None).dtype == torch.uint8
    assert cache.num_bytes() == pytest.approx(plain.engine.cache.num_bytes(), rel=0.01)


def test_fp8_cache_scores_and_generates_like_the_model_dtype_cache(engines):
    plain, fp8 = engines
    scoring = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    for prompt in PROMPTS:
        a = plain.generate([prompt], scoring, use_tqdm=False)[0].prompt_logprobs[1:]
        b = fp8.generate([prompt], scoring, use_tqdm=False)[0].prompt_logprobs[1:]
        got = torch.tensor([next(iter(d.values())).logprob for d in b])
        expected = torch.tensor([next(iter(d.values())).logprob for d in a])
        assert (got - expected).abs().max() < 0.15 and not torch.equal(got, expected)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = plain.generate(PROMPTS, greedy, use_tqdm=False)
    b = fp8.generate(PROMPTS, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids[:3] for o in a] == [o.outputs[0].token_ids[:3] for o in b]


def test_scales_divide_on_the_way_in_and_multiply_on_the_way_out():
    from nemolite.checkpoint import model_config

    config = model_config(None)
    cache = PagedKVCache(config, 4, 4, torch.float32, "cpu", FP8, scales={0: (4.0, 0.5)})
    keys = cache.keys[0]
    shape = (3, keys.shape[1], keys.shape[2])
    slots = torch.tensor([0, 5, 9])
    new = torch.stack([torch.full(shape[1:], 96.0), torch.full(shape[1:], 100.0), torch.full(shape[1:], -5000.0)])
    cache.store(keys, slots, new, 4.0)  # 24, 25 -> 24 (e4m3 has 3 mantissa bits), -1250 -> -448
    back = cache.read(keys, slots, 4.0)
    assert back[0].eq(96).all() and back[1].eq(96).all() and back[2].eq(-448 * 4).all()
    assert keys.dtype == torch.uint8 and cache.scales[1] == (1.0, 1.0) and cache.scales[0] == (4.0, 0.5)


def test_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(NemoliteError, match="kv-cache-dtype"):
        LLM(kv_cache_dtype="int2")
