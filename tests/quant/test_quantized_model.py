"""Quantization at load on a trained model (the bundled demo model): what it replaces, what it keeps,
the memory it takes, and how little perplexity it costs."""

from __future__ import annotations

import math

import pytest
import torch

from nemolite import LLM, SamplingParams
from nemolite.checkpoint import load_checkpoint, resolve_model_path
from nemolite.errors import NemoliteError
from nemolite.model.layers import Linear
from nemolite.quant import QuantizedLinear, parse_quantization, quantized_weight_bytes

TEXT = ("Return a list of the words in the string, using sep as the delimiter string. If maxsplit is given, "
        "at most maxsplit splits are done. If sep is not specified or is None, any whitespace string is a "
        "separator and empty strings are removed from the result. ") * 3


def perplexity(model, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).float()
    return math.exp(torch.nn.functional.cross_entropy(logits[0], torch.tensor(ids[1:])).item())


@pytest.fixture(scope="module")
def demo():
    model, tokenizer = load_checkpoint(resolve_model_path(None), "bfloat16", torch.device("cpu"))
    return model, tokenizer, tokenizer.encode(TEXT)


@pytest.mark.parametrize("spec, most_loss", [("int8", 0.01), ("int4", 0.06), ("int4-g128-asym", 0.06),
                                             ("int4-head", 0.08)])
def test_quantized_demo_model_keeps_its_perplexity(demo, spec, most_loss):
    reference, _, ids = demo
    model, _ = load_checkpoint(resolve_model_path(None), "bfloat16", torch.device("cpu"),
                               quantization=parse_quantization(spec))
    base, quantized = perplexity(reference, ids), perplexity(model, ids)
    assert quantized <= base * (1 + most_loss), (base, quantized)
    assert quantized != base  # the weights really changed


def test_every_decoder_linear_is_quantized_and_heads_stay_float(demo):
    reference, _, _ = demo
    model, _ = load_checkpoint(resolve_model_path(None), "bfloat16", torch.device("cpu"),
                               quantization=parse_quantization("int4"))
    assert not any(isinstance(m, Linear) and m.weight.numel() for name, m in model.named_modules()
                   if name != "lm_head")
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 6 * len(model.model.layers)  # q, k, v, o, up, down
    assert isinstance(model.lm_head, Linear) and model.lm_head.weight.dtype == torch.bfloat16
    float_bytes = sum(m.weight.numel() * 2 for n, m in reference.named_modules() if isinstance(m, Linear) and n != "lm_head")
    assert quantized_weight_bytes(model) <= 0.3 * float_bytes  # 4 bits + an fp16 scale per 32: 0.28
    head, _ = load_checkpoint(resolve_model_path(None), "bfloat16", torch.device("cpu"),
                              quantization=parse_quantization("int8-head"))
    assert isinstance(head.lm_head, QuantizedLinear) and head.lm_head.method == "int8"
    hidden = head.lm_head.in_features
    for spelling, method, group in (("int4-head", "int4", 32), ("int4-g128-head8", "int8", hidden)):
        head, _ = load_checkpoint(resolve_model_path(None), "bfloat16", torch.device("cpu"),
                                  quantization=parse_quantization(spelling))
        assert (head.lm_head.method, head.lm_head.group_size) == (method, group), spelling


def test_llm_generates_through_the_quantized_kernels():
    llm = LLM(quantization="int8", dtype="bfloat16", kv_cache_gb=0.05)
    plain = LLM(dtype="bfloat16", kv_cache_gb=0.05)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    got = llm.generate(["Return a list of the words in"], params, use_tqdm=False)[0].outputs[0]
    expected = plain.generate(["Return a list of the words in"], params, use_tqdm=False)[0].outputs[0]
    assert len(got.token_ids) == 12
    assert got.token_ids[:4] == expected.token_ids[:4]  # a trained model: int8 keeps its confident choices


@pytest.mark.parametrize("spelling, message", [
    ("int3", "not supported"), ("int4-g48", "group size"), ("int8-asym", "unknown option"), ("fp8", "not supported"),
    ("int8-head8", "unknown option"),
])
def test_bad_quantization_spellings_fail_before_loading(spelling, message):
    with pytest.raises(NemoliteError, match=message):
        LLM(quantization=spelling)


def test_spellings_round_trip():
    for text in ("int8", "int4", "int4-g128", "int4-asym", "int4-g64-asym-head", "int8-head", "int4-g128-head8"):
        assert str(parse_quantization(text)) == text
    assert parse_quantization("none") is None and parse_quantization(None) is None


def test_compiled_dense_path_reads_the_quantized_weight_every_step():
    """A batch bucket above the kernel's row limit (pinned at 8 in the tests) dequantizes in the graph. With
    frozen weights inductor folded that into a float copy kept beside the quantized weight (the int8 bench
    model's RSS 0.94 -> 1.50 GB); the op must run each step instead, so changing the stored scales changes
    what the compiled step computes."""
    llm = LLM(quantization="int8", dtype="bfloat16", kv_cache_gb=0.05, compile=True)
    decoder, cache = llm.engine.runner.decoder, llm.engine.cache
    ids, positions = torch.arange(5, 21), torch.zeros(16, dtype=torch.long)
    no_context = torch.zeros(16, 0, dtype=torch.long), torch.zeros(16, 0, dtype=torch.bool)

    def step() -> torch.Tensor:
        return decoder(ids, positions, *no_context, cache.keys, cache.values)[0].clone()

    before = step()
    assert torch.equal(step(), before)  # the step is deterministic (and now called without Dynamo)
    layer = next(m for m in llm.model.modules() if isinstance(m, QuantizedLinear))
    layer.scales.mul_(0.5)  # in place: the graph's constant is this very tensor
    assert not torch.equal(step(), before)
