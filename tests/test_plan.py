"""`nemolite plan`: the model card's memory claims for Nemotron-4-340B, from its config alone."""

from __future__ import annotations

import json

import pytest

from nemolite.cli import main
from nemolite.config import LayerSpec, config_from_hf
from nemolite.plan import balanced_stages, num_parameters, plan

NEMOTRON_4_340B = {"architectures": ["NemotronForCausalLM"], "model_type": "nemotron", "vocab_size": 256000,
                   "hidden_size": 18432, "intermediate_size": 73728, "num_hidden_layers": 96,
                   "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 192,
                   "partial_rotary_factor": 0.5, "max_position_embeddings": 4096, "norm_eps": 1e-5,
                   "hidden_act": "relu2", "tie_word_embeddings": False}


@pytest.fixture
def config_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(NEMOTRON_4_340B))
    return tmp_path


def test_340b_parameter_count():
    assert num_parameters(config_from_hf(NEMOTRON_4_340B)) == pytest.approx(341.0e9, rel=0.002)


@pytest.mark.parametrize("gpus, memory, fits", [(8, 80, False), (16, 80, True), (8, 141, True)])
def test_340b_fits_as_the_model_card_says(config_dir, capsys, gpus, memory, fits):
    assert main(["plan", str(config_dir), "--gpus", str(gpus), "--gpu-memory", str(memory)]) == (0 if fits else 1)
    out = capsys.readouterr().out
    assert ("suggested:" in out) == fits
    if (gpus, memory) == (16, 80):
        assert "--tensor-parallel-size 8 --pipeline-parallel-size 2" in out  # the card's two-node job


def test_kv_heads_are_replicated_beyond_tp_and_stages_balance():
    config = config_from_hf(NEMOTRON_4_340B)
    tp8, = [layout for layout in plan(config, 8, 141) if layout.tp == 8]
    assert tp8.kv_bytes_per_token == 96 * 2 * 1 * 192 * 2  # one KV head per rank at TP 8
    # heterogeneous (NAS-like) costs: stages are cut by cost, not by layer count
    assert balanced_stages([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 11)]
    assert [len(stage) for stage in balanced_stages([1.0] * 96, 8)] == [12] * 8


SMALL = {**NEMOTRON_4_340B, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 128,
         "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 2, "vocab_size": 1000}


def test_a_tp_that_does_not_split_the_heads_is_refused():
    layouts = {layout.tp: layout for layout in plan(config_from_hf(SMALL), 4, 16)}
    assert "heads" in layouts[4].problem and layouts[2].fits


def test_nas_no_op_layers_hold_nothing():
    config = config_from_hf(SMALL)
    full = num_parameters(config)
    config.layers[0] = LayerSpec("no_op", 0, "no_op", 0)
    d, f = SMALL["hidden_size"], SMALL["intermediate_size"]
    attention = 2 * d * 6 * 128 + 2 * d * 2 * 128 + d  # q, o; k, v; the norm
    assert full - num_parameters(config) == attention + 2 * d * f + d


def test_the_lm_head_is_sized_as_it_is_quantized():
    from nemolite.plan import weight_bytes

    config = config_from_hf(NEMOTRON_4_340B)
    head = config.vocab_size * config.hidden_size  # weights of the LM head
    fp = weight_bytes(config, quantization="int4")
    int4_head = weight_bytes(config, quantization="int4-head")
    int8_head = weight_bytes(config, quantization="int4-head8")
    assert fp - int4_head == pytest.approx(head * (2 - 0.5 - 2 / 32))  # bf16 -> 4 bits + an fp16 scale per 32
    assert int8_head - int4_head == pytest.approx(head * (1 - 0.5 - 2 / 32) + config.vocab_size * 2)
