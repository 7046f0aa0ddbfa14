"""Adapters written by the real ``peft`` library on transformers' models, with random (non-zero) A and B."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import make_llama, make_nemotron

# Nemotron with GQA and head_dim (24) != hidden / heads (16): a reader that assumes either shows.
NEMOTRON = dict(head_dim=24, num_key_value_heads=2, num_hidden_layers=3)

ADAPTERS = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-rslora": dict(r=8, lora_alpha=16, use_rslora=True,
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
    "patterns": dict(r=4, lora_alpha=4, target_modules=r".*\.(o_proj|down_proj|k_proj)",
                     rank_pattern={"down_proj": 8}, alpha_pattern={"o_proj": 32}),
    "layers": dict(r=2, lora_alpha=3, target_modules=["up_proj", "q_proj"], layers_to_transform=[0, 2]),
}


def write_peft_adapter(base: Path, directory: Path, seed: int = 0, safe: bool = True, **settings) -> Path:
    """``peft.get_peft_model`` on the transformers model of ``base``, A and B random, ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **settings))
    with torch.no_grad():  # weights of a trained adapter's size: the update must show in the logits
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    peft_model.save_pretrained(directory, safe_serialization=safe)
    return directory


@pytest.fixture(scope="session")
def lora_base(tmp_path_factory) -> Path:
    return make_nemotron(tmp_path_factory.mktemp("lora-base"), **NEMOTRON)


@pytest.fixture(scope="session")
def peft_adapters(lora_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft-adapters")
    return {name: write_peft_adapter(lora_base, root / name, seed=index, **settings)
            for index, (name, settings) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="session")
def llama_lora_base(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama-lora-base"))

