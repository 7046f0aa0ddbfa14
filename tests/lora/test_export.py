"""Adapters out: ``nemolite convert`` of a NeMo LoRA adapter into PEFT (checked by transformers + peft), and
``nemolite merge-lora`` (checked against serving the adapter)."""

from __future__ import annotations

import pytest
import torch

from nemolite import LLM, LoRARequest
from nemolite.cli import main
from nemolite.lora.nemo import read_nemo_adapter
from nemolite.lora.peft import read_peft_adapter
from tests.conftest import DEVICE, make_nemotron
from tests.lora.test_nemo_lora import NEMOTRON, model_config, synthetic_state, write_nemo
from tests.lora.test_peft import PROMPTS, nemolite_logprobs, reference_logprobs


@pytest.fixture(scope="module")
def nemo_pair(tmp_path_factory):
    """An HF Nemotron of the synthetic NeMo adapter's shapes (kv_channels 12 != 32 / 4) and the adapter."""
    root = tmp_path_factory.mktemp("export")
    base = make_nemotron(root / "base", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=12, num_hidden_layers=4, partial_rotary_factor=0.5)
    state = {key: value * 0.2 for key, value in synthetic_state(NEMOTRON, "nemo").items()}
    adapter = write_nemo(root / "adapter.nemo", model_config(NEMOTRON), {(0, 0): state})
    return base, adapter, root


def test_nemo_adapter_converted_to_peft_runs_in_transformers_as_nemolite_serves_it(nemo_pair):
    base, adapter, root = nemo_pair
    assert main(["convert", str(adapter), str(root / "peft")]) == 0
    nemo = read_nemo_adapter(adapter, "a", {})
    peft = read_peft_adapter(root / "peft", "a", list(nemo.weights))
    assert nemo.weights.keys() == peft.weights.keys()
    for name, w in nemo.weights.items():  # the scale alpha / adapter_dim (1.5) is in B; PEFT's own scale is 1
        assert torch.allclose(peft.weights[name].lora_b, w.lora_b) and torch.equal(peft.weights[name].lora_a, w.lora_a)
    llm = LLM(base, dtype="float32", device=DEVICE, enable_lora=True, max_lora_rank=4)
    for ids in PROMPTS:
        expected = reference_logprobs(base, root / "peft", ids)  # transformers + peft on the converted adapter
        got = nemolite_logprobs(llm, ids, LoRARequest("nemo", 1, str(adapter)))  # nemolite on NeMo's file
        assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-4
        assert max(abs(a - b) for a, b in zip(expected, reference_logprobs(base, None, ids))) > 0.05


def test_merged_model_equals_the_served_adapter(nemo_pair, lora_base, peft_adapters, tmp_path):
    base, adapter, root = nemo_pair
    assert main(["merge-lora", str(base), str(adapter), str(tmp_path / "merged")]) == 0
    merged = LLM(tmp_path / "merged", dtype="float32", device=DEVICE)
    served = LLM(base, dtype="float32", device=DEVICE, enable_lora=True, max_lora_rank=4)
    for ids in PROMPTS:
        got = nemolite_logprobs(merged, ids, None)
        want = nemolite_logprobs(served, ids, LoRARequest("nemo", 1, str(adapter)))
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4
    # a PEFT adapter (rsLoRA) merged: transformers reads the result as it reads base + peft
    assert main(["merge-lora", str(lora_base), str(peft_adapters["all-rslora"]), str(tmp_path / "merged2")]) == 0
    ids = PROMPTS[0]
    expected = reference_logprobs(lora_base, peft_adapters["all-rslora"], ids)
    got = reference_logprobs(tmp_path / "merged2", None, ids)
    assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-4


def test_refusals(nemo_pair, lora_base, peft_adapters, tmp_path, capsys):
    base, adapter, _ = nemo_pair
    assert main(["convert", str(peft_adapters["qv"]), str(tmp_path / "x")]) == 2
    assert "PEFT adapter already" in capsys.readouterr().err
    assert main(["convert", str(adapter), str(tmp_path / "y"), "--quantization", "int8"]) == 2
    assert "written in fp32" in capsys.readouterr().err
    assert main(["merge-lora", str(lora_base), str(adapter), str(tmp_path / "z")]) == 2  # another model's shapes
    assert "LoRA adapter" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
