from __future__ import annotations

import pytest

from nemolite.config import config_from_hf
from nemolite.errors import NemoliteError

NEMOTRON = {"model_type": "nemotron", "vocab_size": 256, "hidden_size": 96, "intermediate_size": 384,
            "num_hidden_layers": 2, "num_attention_heads": 4}
LLAMA = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def test_nemotron_defaults_follow_transformers():
    config = config_from_hf(NEMOTRON)
    assert config.norm == "layernorm1p"
    assert config.head_dim == 24
    assert config.partial_rotary_factor == 0.5 and config.rotary_dim == 12
    assert all(spec.num_kv_heads == 4 and spec.mlp == "relu2" for spec in config.layers)  # missing = MHA
    assert config.rope_theta == 10000.0 and config.norm_eps == 1e-5 and not config.tie_word_embeddings


@pytest.mark.parametrize("extra, expected", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}}, 0.25),
    ({"partial_rotary_factor": 0.25}, 0.25),
    ({"rope_percent": 1.0}, 1.0),
    ({"rope_pct": 0.5}, 0.5),
])
def test_rotary_fraction_spellings(extra, expected):
    assert config_from_hf({**NEMOTRON, **extra}).partial_rotary_factor == expected


def test_head_dim_may_differ_from_hidden_over_heads():
    config = config_from_hf({**NEMOTRON, "head_dim": 48, "num_key_value_heads": 2})
    assert config.head_dim == 48 and config.layers[0].num_kv_heads == 2


@pytest.mark.parametrize("rope", [
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}, "rope_theta": 500000.0},
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    {"rope_scaling": {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
     "rope_theta": 500000.0},
])
def test_llama3_rope_scaling_in_old_and_new_spellings(rope):
    config = config_from_hf({**LLAMA, **rope})
    assert config.norm == "rmsnorm" and config.rotary_dim == 16 and config.rope_theta == 500000.0
    assert config.rope_scaling["rope_type"] == "llama3" and config.rope_scaling["factor"] == 8.0
    assert config.layers[0].mlp == "swiglu"


def test_eos_list_kept():
    assert config_from_hf({**LLAMA, "eos_token_id": [7, 8, 9]}).eos_token_ids == [7, 8, 9]


@pytest.mark.parametrize("raw, field", [
    ({**NEMOTRON, "model_type": "gpt2"}, "model_type"),
    ({k: v for k, v in NEMOTRON.items() if k != "vocab_size"}, "vocab_size"),
    ({**NEMOTRON, "num_key_value_heads": 3}, "num_key_value_heads"),
    ({**NEMOTRON, "hidden_act": "gelu"}, "hidden_act"),
    ({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
    ({**NEMOTRON, "partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    ({**LLAMA, "model_type": "nemotron-nas", "block_configs": [{"attention": {"n_heads_in_group": 3},
                                                                 "ffn": {"ffn_mult": 1.0}}] * 2},
     "n_heads_in_group"),
    ({**LLAMA, "model_type": "nemotron-nas", "block_configs": [{"attention": {"no_op": True}, "ffn": {"no_op": True}}]},
     "block_configs"),
    ({**LLAMA, "model_type": "nemotron-nas", "block_configs": [
        {"attention": {"no_op": True, "replace_with_linear": True}, "ffn": {"no_op": True}}] * 2}, "attention"),
    ({**LLAMA, "model_type": "nemotron-nas", "block_configs": [
        {"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": None}}] * 2}, "ffn_mult"),
])
def test_bad_configs_name_the_field(raw, field):
    with pytest.raises(NemoliteError, match=field.replace(".", r"\.")):
        config_from_hf(raw)


def test_decilm_architecture_is_recognised_without_model_type():
    raw = {**LLAMA, "model_type": "deci", "architectures": ["DeciLMForCausalLM"],
           "block_configs": [{"attention": {"replace_with_linear": True}, "ffn": {"ffn_mult": 1.0}},
                             {"attention": {"n_heads_in_group": 4}, "ffn": {"replace_with_linear": True}}]}
    config = config_from_hf(raw)
    assert config.model_type == "nemotron-nas"
    assert [(s.attention, s.num_kv_heads, s.mlp) for s in config.layers] == [("linear", 0, "swiglu"),
                                                                             ("attention", 1, "linear")]
