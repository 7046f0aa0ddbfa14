"""`nemolite convert` into Hugging Face directories that transformers loads (HF sources here; NeMo
sources in test_nemo.py)."""

from __future__ import annotations

import json

import pytest
import torch

from nemolite.checkpoint import convert as convert_module
from nemolite.checkpoint.convert import convert
from nemolite.checkpoint.hf import load_hf_model
from nemolite.cli import main
from nemolite.errors import NemoliteError


def test_reshard_and_cast_loads_in_transformers(nemotron_dir, tmp_path):
    from transformers import NemotronForCausalLM

    destination = tmp_path / "out"
    assert main(["convert", str(nemotron_dir), str(destination), "--dtype", "bfloat16",
                 "--max-shard-size", "40KB"]) == 0
    index = json.loads((destination / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    assert json.loads((destination / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (destination / "tokenizer.model").is_file()
    assert not destination.with_name("out.partial").exists()
    ids = torch.tensor([[2, 17, 33, 90, 5]])
    reference = NemotronForCausalLM.from_pretrained(nemotron_dir, torch_dtype=torch.float32).eval()
    converted = NemotronForCausalLM.from_pretrained(destination, torch_dtype=torch.float32).eval()
    ours = load_hf_model(destination, dtype="float32")
    with torch.no_grad():
        expected = reference(ids).logits
        got = converted(ids).logits
    assert got.shape == expected.shape
    # bf16 weights: close to the fp32 original, and transformers and nemolite read them identically.
    assert (got - expected).abs().max().item() < 0.1
    with torch.no_grad():
        assert torch.allclose(ours(ids, torch.arange(5)[None]), got, atol=1e-4)


def test_an_interrupted_conversion_leaves_no_destination(nemotron_dir, tmp_path, monkeypatch):
    destination = tmp_path / "out"
    real = convert_module.hf_source

    def failing_source(path):
        source = real(path)
        tensors = source.tensors

        def broken():
            for count, item in enumerate(tensors()):
                if count == 3:
                    raise KeyboardInterrupt
                yield item
        source.tensors = broken
        return source

    monkeypatch.setattr(convert_module, "hf_source", failing_source)
    with pytest.raises(KeyboardInterrupt):
        convert(nemotron_dir, destination, progress=False)
    assert not destination.exists()  # only DST.partial, which never looks like a checkpoint
    monkeypatch.setattr(convert_module, "hf_source", real)
    convert(nemotron_dir, destination, progress=False)  # the next run starts the partial over
    assert (destination / "model.safetensors").is_file() and not destination.with_name("out.partial").exists()


def test_refuses_to_overwrite_and_unknown_sources(nemotron_dir, tmp_path):
    destination = tmp_path / "taken"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    with pytest.raises(NemoliteError, match="not empty"):
        convert(nemotron_dir, destination, progress=False)
    with pytest.raises(NemoliteError, match="neither a NeMo checkpoint"):
        convert(tmp_path, tmp_path / "x", progress=False)
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "y")]) == 2
