"""q/k/v and gate/up fused into one layer each (CausalLM.fuse_projections): the same logits, row by row."""

from __future__ import annotations

import pytest
import torch

from nemolite.checkpoint.hf import load_hf_model
from nemolite.model.layers import Linear
from nemolite.quant import QuantizedLinear, parse_quantization, quantize_weight
from nemolite.quant.model import quantize_model
from tests.conftest import make_llama, make_nemotron


@pytest.mark.parametrize("make, overrides", [(make_nemotron, {}), (make_llama, {}),
                                             (make_nemotron, dict(attention_bias=True, mlp_bias=True))],
                         ids=["nemotron", "llama-swiglu", "biases"])
@pytest.mark.parametrize("quantization", [None, "int8", "int4", "int4-asym-head"])
def test_fused_projections_give_the_same_logits(tmp_path, make, overrides, quantization):
    model = load_hf_model(make(tmp_path, tokenizer=False, **overrides), dtype=torch.float32, device="cpu")
    if quantization:
        quantize_model(model, parse_quantization(quantization))
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)
    swiglu = make is make_llama
    layers = len(model.model.layers)
    assert model.fuse_projections() == layers * (2 if swiglu else 1)
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        assert not any(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj"))
        kind = Linear if quantization is None else QuantizedLinear
        assert isinstance(attention.qkv_proj, kind)
        assert (getattr(mlp, "gate_up_proj", None) is not None) == swiglu and not hasattr(mlp, "gate_proj")
    with torch.no_grad():
        got = model(ids)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert model.fuse_projections() == 0  # nothing left to fuse


def test_layers_stored_differently_are_not_fused():
    weight = torch.randn(64, 64)
    int8, int4 = quantize_weight(weight, "int8"), quantize_weight(weight, "int4", 32)
    assert QuantizedLinear.concatenate([int4, quantize_weight(weight, "int4", 64)]) is None  # other groups
    assert QuantizedLinear.concatenate([int4, quantize_weight(weight, "int4", 32, symmetric=False)]) is None
    assert QuantizedLinear.concatenate([int8, int4]) is None
    plain, biased = Linear(64, 32), Linear(64, 32, bias=True)
    plain.bias = None
    assert Linear.concatenate([plain, biased]) is None
    fused = QuantizedLinear.concatenate([int4, int4])
    x = torch.randn(3, 64)
    assert fused.out_features == 128 and torch.equal(fused(x), torch.cat([int4(x), int4(x)], dim=-1))


def test_the_engine_fuses_projections(nemotron_llm):
    attention = nemotron_llm.model.model.layers[0].self_attn
    assert attention.qkv_proj is not None and not hasattr(attention, "q_proj")
