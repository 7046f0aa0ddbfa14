"""nemolite's decoder against transformers' NemotronForCausalLM / LlamaForCausalLM, fp32."""

from __future__ import annotations

import pytest
import torch

from nemolite.checkpoint.hf import load_hf_model
from nemolite.model import KVCache
from tests.conftest import DEVICE, make_llama, make_nemotron

CASES = {
    "nemotron-gqa-headdim-partial0.5": (make_nemotron, dict(head_dim=24, partial_rotary_factor=0.5)),
    "nemotron-partial0.25": (make_nemotron, dict(head_dim=32, partial_rotary_factor=0.25, num_key_value_heads=1)),
    "nemotron-mha": (make_nemotron, dict(num_key_value_heads=3, hidden_size=48, num_attention_heads=3)),
    "nemotron-tied-bias": (make_nemotron, dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "llama3-scaled-gqa": (make_llama, dict()),
    "llama-plain-mha": (make_llama, dict(num_key_value_heads=4, rope_scaling=None, rope_theta=10000.0)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    builder, overrides = CASES[request.param]
    directory = builder(tmp_path_factory.mktemp(request.param), tokenizer=False, num_hidden_layers=3, **overrides)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return reference, load_hf_model(directory, dtype="float32", device=DEVICE)


def prompt(vocab_size: int, length: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_prefill_logits_match(pair):
    reference, model = pair
    ids = prompt(model.config.vocab_size)
    expected = reference(ids).logits
    assert (model(ids.to(DEVICE)).cpu() - expected).abs().max().item() <= 1e-4
    assert expected.abs().max().item() > 0.1  # the comparison is not between two zero tensors


@torch.no_grad()
def test_cached_decode_matches_full_forward(pair):
    reference, model = pair
    ids = prompt(model.config.vocab_size)
    cache = KVCache(model.config, 1, 96, torch.float32, DEVICE)
    model(ids.to(DEVICE), cache=cache)
    sequence = ids
    for step in range(16):
        next_token = torch.randint(0, model.config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(step))
        sequence = torch.cat([sequence, next_token], dim=1)
        cached = model(next_token.to(DEVICE), cache=cache)[0, -1].cpu()
        expected = reference(sequence).logits[0, -1]
        assert (cached - expected).abs().max().item() <= 1e-4, f"decode step {step}"
    assert cache.length == 64 + 16


@torch.no_grad()
def test_greedy_continuation_identical(pair):
    reference, model = pair
    ids = prompt(model.config.vocab_size, 24)
    expected = reference.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, 24:].tolist()
    cache = KVCache(model.config, 1, 48, torch.float32, DEVICE)
    logits, tokens = model(ids.to(DEVICE), cache=cache, last_only=True), []
    for _ in range(16):
        tokens.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[tokens[-1]]], device=DEVICE), cache=cache)
    assert tokens == expected


@torch.no_grad()
def test_bfloat16_close_to_fp32_reference(pair):
    reference, model = pair
    directory = reference.config._name_or_path
    bf16 = load_hf_model(directory, dtype="bfloat16", device=DEVICE)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    ids = prompt(model.config.vocab_size)
    expected = reference(ids).logits
    diff = (bf16(ids.to(DEVICE)).float().cpu() - expected).abs().max().item()
    assert diff < 0.1 * expected.abs().max().item()
