"""NeMo 2 PEFT (LoRA) checkpoints: nemolite's prompt logprobs with the adapter against NeMo 2.4.1's own forward,
on checkpoints NeMo 2's own code writes (``nemo2_lora_writer.py``, in a subprocess), and what is refused.

NeMo 2.4.1 comes from ``NEMOLITE_TEST_NEMO241_PATH``; ``nemo.collections.llm`` also needs fiddle, from
``NEMOLITE_TEST_NEMO2PEFT_PATH`` (``pip install --no-deps --target DIR -r .ci/nemo2-peft.txt``). Without both the
NeMo tests skip.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from nemolite import LLM, LoRARequest, NemoliteError
from nemolite.lora.formats import read_adapter
from nemolite.lora.nemo2 import is_nemo2_adapter, read_nemo2_adapter
from tests.conftest import DEVICE, run_nemo_writer
from tests.lora.test_nemo_lora import nemo_logprobs, nemolite_logprobs

WRITER = Path(__file__).with_name("nemo2_lora_writer.py")
# adapter -> its base model, as nemo2_lora_writer.ADAPTERS writes them
ADAPTERS = {"nemotron_lora": "nemotron", "nemotron_qkv_fc2": "nemotron", "llama_lora": "llama",
            "llama_canonical": "llama"}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    site, extra = os.environ.get("NEMOLITE_TEST_NEMO241_PATH"), os.environ.get("NEMOLITE_TEST_NEMO2PEFT_PATH")
    if not site or not extra:
        pytest.skip("NEMOLITE_TEST_NEMO241_PATH and NEMOLITE_TEST_NEMO2PEFT_PATH are not set (.ci/run sets them)")
    return run_nemo_writer(WRITER, tmp_path_factory.mktemp("nemo2_lora"), [site, extra])


@pytest.fixture(scope="module")
def engines(written) -> dict[str, LLM]:
    # CanonicalLoRA's q, k and v adapters (rank 4) are served as one fused LoRA of rank 12 (nemo2._canonical_qkv)
    return {base: LLM(str(written / f"{base}_base.nemo"), dtype="float32", device=DEVICE, enable_lora=True,
                      max_loras=2, max_lora_rank=12, enable_prefix_caching=False) for base in ("nemotron", "llama")}


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_prompt_logprobs_equal_nemo2_with_lora(written, engines, adapter):
    base = ADAPTERS[adapter]
    input_ids = torch.load(written / "input_ids.pt")
    expected, base_logits = torch.load(written / f"{adapter}_logits.pt"), torch.load(written / f"{base}_base_logits.pt")
    assert is_nemo2_adapter(written / adapter)
    lora = LoRARequest(adapter, sorted(ADAPTERS).index(adapter) + 1, str(written / adapter))
    for row, ids in enumerate(input_ids.tolist()):
        got = nemolite_logprobs(engines[base], ids, lora)
        reference = nemo_logprobs(expected[row], ids)
        assert (got - reference).abs().max().item() <= 1e-4, adapter
        assert (reference - nemo_logprobs(base_logits[row], ids)).abs().max().item() > 0.05  # the adapter shows


def test_layout_is_what_nemo2_writes(written):
    weights = written / "llama_lora" / "weights"
    assert json.loads((weights / "adapter_metadata.json").read_text()) == {
        "model_ckpt_path": str(written / "llama_base")}
    adapter = read_adapter(str(written / "llama_lora"), "a", {})
    assert sorted(adapter.weights) == sorted(f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"))
    # nemotron: kv_channels 24, not hidden / heads = 16
    assert read_nemo2_adapter(written / "nemotron_lora", "n", {}).weights[
        "model.layers.0.self_attn.q_proj"].lora_b.shape == (4 * 24, 4)


def _edit_context(source: Path, target: Path, old: str, new: str) -> Path:
    shutil.copytree(source, target)
    io_json = target / "context" / "io.json"
    text = io_json.read_text()
    assert old in text
    io_json.write_text(text.replace(old, new))
    return target


def test_refused_by_field(written, tmp_path):
    dora = _edit_context(written / "llama_lora", tmp_path / "dora", '"name": "LoRA"', '"name": "DoRA"')
    with pytest.raises(NemoliteError, match="model.model_transform"):
        read_adapter(str(dora), "d", {})
    moe = _edit_context(written / "llama_lora", tmp_path / "moe", '"items": [["Attr(name=\'use_cpu_initialization\')"',
                        '"items": [["Attr(name=\'num_moe_experts\')", {"type": "leaf", "value": 8}], '
                        '["Attr(name=\'use_cpu_initialization\')"')
    with pytest.raises(NemoliteError, match="num_moe_experts"):
        read_adapter(str(moe), "m", {})
    bare = tmp_path / "bare"
    shutil.copytree(written / "llama_lora" / "weights", bare / "weights")
    with pytest.raises(NemoliteError, match="context/io.json"):
        read_adapter(str(bare), "b", {})
