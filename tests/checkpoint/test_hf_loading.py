from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from nemolite.checkpoint.hf import load_hf_model
from nemolite.errors import NemoliteError
from tests.conftest import make_nemotron


def reference_state(directory) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def test_sharded_checkpoint_loads_every_tensor(tmp_path):
    directory = make_nemotron(tmp_path, tokenizer=False, max_shard_size="100KB")
    assert len(list(directory.glob("*.safetensors"))) > 2 and (directory / "model.safetensors.index.json").exists()
    model = load_hf_model(directory, dtype="float32")
    state = model.state_dict()
    for name, tensor in reference_state(directory).items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_loading_logs_its_progress_off_a_terminal(tmp_path, caplog, quantization):
    from nemolite.quant import parse_quantization

    directory = make_nemotron(tmp_path, tokenizer=False, max_shard_size="100KB")
    state = reference_state(directory)
    with caplog.at_level("INFO", logger="nemolite.progress"):
        load_hf_model(directory, dtype="float32", quantization=parse_quantization(quantization))
    lines = [r.getMessage() for r in caplog.records if r.name == "nemolite.progress"]
    stage = directory.name + (f" ({quantization})" if quantization else "")
    size = sum(t.numel() * t.element_size() for t in state.values())
    assert len(lines) == 1 and lines[0].startswith(f"loading {stage}: {len(state)}/{len(state)} tensors, "), lines
    assert f"{size / 1e3:.1f} kB" in lines[0] or f"{size / 1e6:.1f} MB" in lines[0]


def test_dtype_converted_on_load(tmp_path):
    directory = make_nemotron(tmp_path, tokenizer=False, dtype=torch.bfloat16)
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"
    auto = load_hf_model(directory)  # auto = the checkpoint's dtype
    assert next(auto.parameters()).dtype == torch.bfloat16
    fp32 = load_hf_model(directory, dtype="float32")
    original = reference_state(directory)["model.layers.0.mlp.up_proj.weight"]
    assert fp32.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert torch.equal(fp32.model.layers[0].mlp.up_proj.weight, original.float())


def test_tied_embeddings_share_one_tensor(tmp_path):
    directory = make_nemotron(tmp_path, tokenizer=False, tie_word_embeddings=True)
    assert "lm_head.weight" not in reference_state(directory)
    model = load_hf_model(directory, dtype="float32")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    directory = make_nemotron(tmp_path, tokenizer=False)
    state = reference_state(directory)
    state.pop("model.layers.1.self_attn.k_proj.weight")
    state["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(NemoliteError, match=r"missing tensors \[model\.layers\.1\.self_attn\.k_proj\.weight\]; "
                                            r"unexpected tensors \[model\.layers\.9\.extra\.weight\]"):
        load_hf_model(directory)


def test_shape_mismatch_is_reported(tmp_path):
    directory = make_nemotron(tmp_path, tokenizer=False)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 64
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(NemoliteError, match=r"mlp\.up_proj\.weight has shape \[128, 64\] in the checkpoint but the config implies \[64, 64\]"):
        load_hf_model(directory)


def test_truncated_file_is_a_clear_error(tmp_path):
    directory = make_nemotron(tmp_path, tokenizer=False)
    file = directory / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(NemoliteError, match="truncated"):
        load_hf_model(directory)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(NemoliteError, match="config.json"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nemotron"}))
    with pytest.raises(NemoliteError, match="vocab_size|hidden_size"):
        load_hf_model(tmp_path)


def test_peak_memory_while_loading_is_bounded(tmp_path):
    """Weights go straight into place: peak RSS growth <= 1.3 x the weights, not 2 x."""
    directory = make_nemotron(tmp_path, tokenizer=False, vocab_size=32000, hidden_size=512, intermediate_size=2048,
                              num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)
    weight_bytes = sum(t.numel() * t.element_size() for t in reference_state(directory).values())
    script = textwrap.dedent(f"""
        import torch, nemolite.checkpoint.hf as hf
        from nemolite.config import load_config
        with torch.device("meta"):  # warm up torch's lazy initialisation before the baseline
            hf.CausalLM(load_config({str(directory)!r}))
        def rss():
            return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
        before = rss()
        model = hf.load_hf_model({str(directory)!r}, dtype='float32')
        peak = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
        print(peak - before)
    """)
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert weight_bytes > 100e6
    assert grown <= 1.3 * weight_bytes, f"peak grew {grown / 1e6:.0f} MB for {weight_bytes / 1e6:.0f} MB of weights"
