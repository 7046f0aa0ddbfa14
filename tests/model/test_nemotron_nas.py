"""Nemotron-NAS (DeciLM) semantics, checked against transformers' Llama with patched sublayers.

transformers has no DeciLM model; the rules (DESIGN.md) are: no_op skips a sublayer and its
norm, replace_with_linear is x + W·norm(x), attention layers have their own KV-head count and
FFN widths follow find_multiple(int(2*ffn_mult*hidden/3), 256).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from nemolite.checkpoint.hf import load_hf_model
from nemolite.config import config_from_hf
from nemolite.model import KVCache
from tests.conftest import DEVICE, randomize_norms

HIDDEN, HEADS = 64, 4
BLOCKS = [
    {"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 6.0}},  # 2 KV heads, width 256
    {"attention": {"no_op": True}, "ffn": {"ffn_mult": 12.0}},  # width 512
    {"attention": {"replace_with_linear": True}, "ffn": {"no_op": True}},
    {"attention": {"n_heads_in_group": 4}, "ffn": {"replace_with_linear": True}},  # 1 KV head
    {"attention": {"n_heads_in_group": 1}, "ffn": {"ffn_mult": 6.0}},  # MHA
]


class Zero(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        out = torch.zeros_like(hidden_states)
        return out if not kwargs and not args else (out, None)


class LinearAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear_attn = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, hidden_states, **kwargs):
        return self.linear_attn(hidden_states), None


class LinearMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear_mlp = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x):
        return self.linear_mlp(x)


def llama_settings(**overrides):
    settings = dict(vocab_size=300, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=len(BLOCKS),
                    num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=256,
                    rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    settings.update(overrides)
    return settings


def nas_config(blocks, **overrides) -> dict:
    settings = llama_settings(**overrides)
    settings.pop("intermediate_size")
    settings.pop("num_key_value_heads")
    settings["num_hidden_layers"] = len(blocks)
    return {**settings, "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "block_configs": blocks}


def patched_llama(blocks):
    """transformers Llama whose layers are patched to the NAS rules; its state dict is the NAS checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

    config = LlamaConfig(**llama_settings(num_hidden_layers=len(blocks)))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    for index, (layer, block) in enumerate(zip(model.model.layers, blocks)):
        attention, ffn = block["attention"], block["ffn"]
        if attention.get("no_op"):
            layer.input_layernorm, layer.self_attn = nn.Identity(), Zero()
        elif attention.get("replace_with_linear"):
            layer.self_attn = LinearAttention()
        else:
            layer_config = copy.deepcopy(config)
            layer_config.num_key_value_heads = HEADS // attention["n_heads_in_group"]
            layer.self_attn = LlamaAttention(layer_config, index)
        if ffn.get("no_op"):
            layer.post_attention_layernorm, layer.mlp = nn.Identity(), Zero()
        elif ffn.get("replace_with_linear"):
            layer.mlp = LinearMLP()
        else:
            layer_config = copy.deepcopy(config)
            layer_config.intermediate_size = int(2 * ffn["ffn_mult"] * HIDDEN / 3)  # multiples of 256 here
            layer.mlp = LlamaMLP(layer_config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.05)
    randomize_norms(model)
    return model.eval()


def write_nas(directory, reference, blocks):
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in reference.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(nas_config(blocks)))
    return directory


@pytest.fixture(scope="module")
def nas_pair(tmp_path_factory):
    reference = patched_llama(BLOCKS)
    directory = write_nas(tmp_path_factory.mktemp("nas"), reference, BLOCKS)
    return reference, load_hf_model(directory, dtype="float32", device=DEVICE)


def ids(length=48, vocab=300):
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def test_mixed_blocks_match_patched_llama(nas_pair):
    reference, model = nas_pair
    prompt = ids()
    expected = reference(prompt, use_cache=False).logits
    assert (model(prompt.to(DEVICE)).cpu() - expected).abs().max().item() <= 1e-4


@torch.no_grad()
def test_all_plain_blocks_equal_llama(tmp_path):
    plain = [{"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 6.0}}] * 3
    reference = patched_llama(plain)
    model = load_hf_model(write_nas(tmp_path, reference, plain), dtype="float32", device=DEVICE)
    assert all(spec.attention == "attention" and spec.num_kv_heads == 2 and spec.intermediate_size == 256
               for spec in model.config.layers)
    prompt = ids()
    assert (model(prompt.to(DEVICE)).cpu() - reference(prompt).logits).abs().max().item() <= 1e-4


def test_sublayers_follow_the_block_configs(nas_pair):
    _, model = nas_pair
    layers = model.model.layers
    assert not hasattr(layers[1], "input_layernorm") and not hasattr(layers[1], "self_attn")
    assert not hasattr(layers[2], "post_attention_layernorm") and not hasattr(layers[2], "mlp")
    assert layers[2].self_attn.linear_attn.weight.shape == (HIDDEN, HIDDEN)
    assert layers[3].mlp.linear_mlp.weight.shape == (HIDDEN, HIDDEN)
    assert layers[1].mlp.up_proj.weight.shape == (512, HIDDEN)
    assert [layers[i].self_attn.k_proj.weight.shape[0] // 16 for i in (0, 3, 4)] == [2, 1, 4]


@torch.no_grad()
def test_kv_cache_only_for_attention_layers_with_their_own_heads(nas_pair):
    reference, model = nas_pair
    cache = KVCache(model.config, 1, 80, torch.float32, DEVICE)
    assert [None if k is None else k.shape[1] for k in cache.keys] == [2, None, None, 1, 4]
    assert [v is None for v in cache.values] == [False, True, True, False, False]
    assert cache.num_bytes() == 2 * (2 + 1 + 4) * 80 * 16 * 4
    prompt = ids()
    model(prompt.to(DEVICE), cache=cache)
    sequence = prompt
    for step in range(16):
        token = torch.tensor([[step + 7]])
        sequence = torch.cat([sequence, token], dim=1)
        got = model(token.to(DEVICE), cache=cache)[0, -1].cpu()
        expected = reference(sequence, use_cache=False).logits[0, -1]
        assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("mult, width", [(5.25, 28672), (3.28125, 17920), (2.625, 14336), (1.3125, 7168)])
def test_ffn_width_rule(mult, width):
    config = config_from_hf(nas_config([{"attention": {"n_heads_in_group": 8}, "ffn": {"ffn_mult": mult}}],
                                       hidden_size=8192, num_attention_heads=64))
    assert config.layers[0].intermediate_size == width
    assert config.layers[0].num_kv_heads == 8
