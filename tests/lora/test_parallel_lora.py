"""LoRA under tensor and pipeline parallelism (gloo on CPU): each rank holds its share of every adapter
(B's rows of column-parallel layers, A's columns of row-parallel ones, the partial x A^T all-reduced), and
the job's tokens and logprobs equal one process's."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_nemotron
from tests.lora.conftest import write_peft_adapter
from tests.parallel.test_parallel import run_ranks


@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel-lora")
    base = make_nemotron(root / "base", num_hidden_layers=4)  # GQA: 2 KV heads, replicated at TP 4
    adapter = write_peft_adapter(base, root / "adapter", r=4, lora_alpha=8,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    return base, adapter


@pytest.fixture(scope="module")
def one_process(model_and_adapter, tmp_path_factory):
    base, adapter = model_and_adapter
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEMOLITE_TEST_LORA", str(adapter))
        with_adapter = run_ranks(base, 1, 1, tmp_path_factory.mktemp("one") / "lora.pt")
    without = run_ranks(base, 1, 1, tmp_path_factory.mktemp("one") / "base.pt")
    assert with_adapter["tokens"][1] == without["tokens"][1]  # the middle prompt runs without the adapter
    assert with_adapter["tokens"][0] != without["tokens"][0] or with_adapter["tokens"][2] != without["tokens"][2]
    return with_adapter


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2), (4, 1)])
def test_parallel_lora_equals_one_process(model_and_adapter, one_process, tmp_path, monkeypatch, tp, pp):
    base, adapter = model_and_adapter
    monkeypatch.setenv("NEMOLITE_TEST_LORA", str(adapter))
    result = run_ranks(base, tp, pp, tmp_path / "out.pt")
    assert result["tokens"] == one_process["tokens"]
    for got, expected in zip(result["logprobs"], one_process["logprobs"]):
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
