""".nemo files written by NeMo 2.5.0's own ``MegatronGPTModel.save_to`` (megatron-core 0.14), on CPU, in every
layout it writes: ``torch_dist`` and ``zarr`` in fp32 and bf16, and the legacy ``model_weights.ckpt``.
nemolite must reproduce megatron-core's logits from each (``nemo_save_writer.py``, in a subprocess).

NeMo and what its import needs come from ``NEMOLITE_TEST_NEMO_PATH`` (``pip install --no-deps --target DIR
-r .ci/nemo-2.5.0.txt``), megatron-core 0.14 with zarr 2 from ``NEMOLITE_TEST_MCORE014_PATH``, as .ci/run
installs them. Without them the tests skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nemolite.checkpoint.nemo import NemoCheckpoint, load_nemo_model
from tests.conftest import run_nemo_writer

WRITER = Path(__file__).with_name("nemo_save_writer.py")
LAYOUTS = ["torch_dist_fp32", "zarr_fp32", "legacy_fp32", "torch_dist_bf16", "zarr_bf16"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    sites = [os.environ.get("NEMOLITE_TEST_NEMO_PATH"), os.environ.get("NEMOLITE_TEST_MCORE014_PATH")]
    if not all(sites):
        pytest.skip("NEMOLITE_TEST_NEMO_PATH and NEMOLITE_TEST_MCORE014_PATH are not set (.ci/run sets them)")
    return run_nemo_writer(WRITER, tmp_path_factory.mktemp("nemo_save_to"), sites, timeout=600)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nemo_save_to_logits(saved, layout):
    path = saved / f"{layout}.nemo"
    with NemoCheckpoint(path) as checkpoint:
        embedding = checkpoint.state["embedding.word_embeddings.weight"]
        assert embedding.dtype == (torch.bfloat16 if layout.endswith("bf16") else torch.float32)
        assert checkpoint.config.model_type == "llama" and checkpoint.padded_vocab_size == 384
    input_ids = torch.load(saved / "input_ids.pt")
    expected = torch.load(saved / "logits.pt")
    loaded = load_nemo_model(path, dtype=torch.float32, device="cpu")
    assert loaded.tokenizer is not None
    with torch.no_grad():
        output = loaded.model(input_ids)
    got = getattr(output, "logits", output).float()
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOLERANCE, layout
