"""`nemolite plan --quantization`: the model cards' quantized rows, from the published configs alone.

- Nemotron-4-340B in int4 on one node of 8 x H100 80 GB (bf16 needs two nodes: test_plan.py).
- Llama-3.1-Nemotron-51B-Instruct in FP8 on a single H100 80 GB: the card's "fitting the model on a
  single GPU at high workloads (H100-80GB)", https://huggingface.co/nvidia/Llama-3_1-Nemotron-51B-Instruct.
  Its block_configs are those of https://huggingface.co/nvidia/Llama-3_1-Nemotron-51B-Instruct/blob/main/config.json
  (per layer: attention with 64 / n_heads_in_group KV heads, replaced by a linear layer, or no-op; an
  FFN of ffn_mult).
"""

from __future__ import annotations

import json

import pytest

from nemolite.cli import main
from nemolite.config import config_from_hf
from nemolite.errors import NemoliteError
from nemolite.plan import GiB, num_parameters, plan, weight_bytes, weight_format
from tests.test_plan import NEMOTRON_4_340B

# (attention: KV-head group size, "linear" or "no_op"; ffn_mult) for layers 0..79.
_51B_LAYERS = ([(8, 1.3125), (16, 2.625), (8, 5.25), (8, 5.25), (8, 5.25), (32, 2.625), (32, 2.625), (64, 2.625),
                (64, 2.625), (32, 2.625), (32, 2.625), ("linear", 2.625), (64, 2.625), (32, 2.625), (32, 2.625),
                ("linear", 1.3125)] + [(8, 5.25)] * 19 + [("linear", 2.625), (8, 5.25), (8, 5.25), ("linear", 2.625),
                ("linear", 5.25), ("linear", 2.625), ("linear", 2.625), ("linear", 2.625), ("no_op", 1.3125),
                ("linear", 1.3125), (8, 5.25), ("no_op", 1.3125), ("linear", 1.3125), ("no_op", 1.3125), (8, 5.25),
                ("linear", 1.3125), ("no_op", 1.3125), ("linear", 1.3125), ("linear", 1.3125), ("no_op", 1.3125),
                ("no_op", 1.3125), ("linear", 1.3125), ("no_op", 1.3125), ("no_op", 1.3125)]
               + [("linear", 1.3125)] * 4 + [(8, 5.25)] * 17)


def _block(attention, ffn_mult):
    part = {"no_op": True} if attention == "no_op" else {"replace_with_linear": True} if attention == "linear" \
        else {"n_heads_in_group": attention}
    return {"attention": part, "ffn": {"ffn_mult": ffn_mult}}


NEMOTRON_51B = {"architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "vocab_size": 128256,
                "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128009,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                "block_configs": [_block(*layer) for layer in _51B_LAYERS]}


def _write(directory, config):
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


def test_bits_per_weight():
    assert weight_format("int4-g128").bits_per_weight() == pytest.approx(4.125)
    assert weight_format("int4").bits_per_weight() == pytest.approx(4.5)  # group 32, as --quantization int4 runs
    assert weight_format("int4-g128-asym").bits_per_weight() == pytest.approx(4.25)
    assert weight_format("int8").bits_per_weight() == pytest.approx(8, abs=0.01)
    assert weight_format("fp8").bits_per_weight() == pytest.approx(8, abs=0.01)
    assert weight_format("none") is None and weight_format(None) is None
    with pytest.raises(NemoliteError, match="plan also sizes fp8"):
        weight_format("int3")


def test_the_51b_config_is_the_published_model():
    config = config_from_hf(NEMOTRON_51B)
    assert len(config.layers) == 80 and num_parameters(config) == pytest.approx(51.5e9, rel=0.01)
    assert sum(spec.has_kv_cache for spec in config.layers) == 54  # 16 linear, 10 no-op attention


@pytest.mark.parametrize("quantization", ["int4", "int4-g128"])
def test_340b_int4_fits_one_node_of_h100(tmp_path, capsys, quantization):
    model = _write(tmp_path, NEMOTRON_4_340B)
    assert main(["plan", model, "--gpus", "8", "--gpu-memory", "80"]) == 1  # bf16: no
    capsys.readouterr()
    assert main(["plan", model, "--gpus", "8", "--gpu-memory", "80", "--quantization", quantization]) == 0
    out = capsys.readouterr().out
    assert "suggested: --tensor-parallel-size 8 --pipeline-parallel-size 1" in out
    config = config_from_hf(NEMOTRON_4_340B)
    tp8, = [layout for layout in plan(config, 8, 80, quantization=quantization) if layout.tp == 8]
    bits = weight_format(quantization).bits_per_weight()
    linear = num_parameters(config) - 2 * 256000 * 18432  # all but the embedding and the head
    assert weight_bytes(config, "bfloat16", quantization) == pytest.approx(
        linear * bits / 8 + 2 * 256000 * 18432 * 2, rel=0.001)
    assert tp8.fits and tp8.weight_bytes < 25 * GiB and tp8.max_batch >= 100  # 4096-token contexts


def test_51b_fp8_fits_one_h100(tmp_path, capsys):
    """FP8 weights fit with 20 GiB to spare; a whole 131072-token context needs the KV cache in FP8 too
    (bf16 KV holds 113 k tokens: any shorter context, many of them)."""
    model = _write(tmp_path, NEMOTRON_51B)
    assert main(["plan", model, "--gpus", "1", "--gpu-memory", "80"]) == 1  # bf16: 96 GiB of weights
    capsys.readouterr()
    assert main(["plan", model, "--gpus", "1", "--gpu-memory", "80", "--quantization", "fp8", "--kv-dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "suggested: --tensor-parallel-size 1 --pipeline-parallel-size 1" in out
    config = config_from_hf(NEMOTRON_51B)
    layout, = plan(config, 1, 80, quantization="fp8", kv_dtype="fp8")
    assert 48 * GiB < layout.weight_bytes < 51 * GiB and layout.fits and layout.max_tokens > 200_000
    bf16_kv, = plan(config, 1, 80, quantization="fp8")
    assert bf16_kv.weight_bytes == layout.weight_bytes and 100_000 < bf16_kv.max_tokens < 131072
    kv_heads = sum(64 // group for group, _ in _51B_LAYERS if isinstance(group, int))  # 64 / n_heads_in_group each
    assert kv_heads == 371 and bf16_kv.kv_bytes_per_token == kv_heads * 2 * 128 * 2  # K and V, head_dim 128, bf16


def test_groups_that_straddle_tensor_parallel_ranks_are_refused():
    small = {**NEMOTRON_4_340B, "hidden_size": 1024, "intermediate_size": 1536, "num_attention_heads": 8,
             "head_dim": 128, "num_hidden_layers": 2, "vocab_size": 1000}
    layouts = {layout.tp: layout for layout in plan(config_from_hf(small), 8, 80, quantization="int4-g128")}
    assert layouts[4].fits  # down_proj: 1536 / 4 = 384 columns, three groups
    assert "groups of 128 columns" in layouts[8].problem  # 192 columns a rank
