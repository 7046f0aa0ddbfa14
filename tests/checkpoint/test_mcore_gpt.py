"""End to end against NVIDIA's own code: a tiny Nemotron-style megatron-core ``GPTModel`` (squared ReLU,
LayerNorm with zero-centred gamma, GQA, partial RoPE, padded vocabulary, untied output layer) built,
run and saved by megatron-core on CPU (``mcore_gpt_writer.py``, in a subprocess). nemolite must
reproduce megatron-core's logits from every layout it was saved in, from the directory and from the
``.nemo`` tar, and ``nemolite convert`` must give a directory that transformers runs to the same logits.

Each test runs once per megatron-core: 0.16.1 from ``NEMOLITE_TEST_MCORE_PATH`` and 0.14.0 (the release of NeMo 2.5.0,
whose torch_dist index pickles ``MCoreSavePlan``) from ``NEMOLITE_TEST_MCORE014_PATH`` (defaults
``/tmp/mcore``, ``/tmp/mcore014`` when present; ``pip install --no-deps --target DIR megatron-core==X``).
The zarr layout is written by a megatron-core that still has the zarr strategy and whose site dir holds
zarr 2, numcodecs<0.16 and tensorstore: 0.14.0's as .ci/run installs it, or for 0.16.1 an older one
(0.10) from ``NEMOLITE_TEST_MCORE_ZARR_PATH``. Without them the tests skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from nemolite.checkpoint.nemo import load_nemo_model
from nemolite.cli import main
from tests.conftest import write_sentencepiece

WRITER = Path(__file__).with_name("mcore_gpt_writer.py")
VOCAB = 320
TOLERANCE = 1e-4


def _site(variable: str, default: str) -> str | None:
    path = os.environ.get(variable) or (default if os.path.isdir(default) else None)
    return path if path and os.path.isdir(path) else None


def _write(site: str, out: Path, tokenizer: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-W", "ignore", str(WRITER), str(out), str(tokenizer), *extra],
                          env=env, capture_output=True, text=True, timeout=240, cwd=out)


SITES = {"0.16": ("NEMOLITE_TEST_MCORE_PATH", "/tmp/mcore"), "0.14": ("NEMOLITE_TEST_MCORE014_PATH", "/tmp/mcore014")}


@pytest.fixture(scope="module", params=sorted(SITES))
def megatron(request, tmp_path_factory):
    """The writer's output directory: logits.pt, input_ids.pt and one NeMo tree per layout."""
    variable, default = SITES[request.param]
    site = _site(variable, default)
    if site is None:
        pytest.skip(f"megatron-core {request.param} not found: set {variable} to a directory holding it "
                    "(pip install --no-deps --target DIR megatron-core)")
    out = tmp_path_factory.mktemp("mcore_gpt")
    write_sentencepiece(out)
    torch.save(torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(7)), out / "input_ids.pt")
    result = _write(site, out, out / "tokenizer.model")
    if result.returncode == 77:
        pytest.skip(f"megatron-core is not importable from {site}")
    assert result.returncode == 0, result.stderr[-4000:]
    zarr_site = site if os.path.isdir(os.path.join(site, "zarr")) else _site("NEMOLITE_TEST_MCORE_ZARR_PATH",
                                                                             "/tmp/mcore_old")
    if zarr_site is not None:
        zarr = _write(zarr_site, out, out / "tokenizer.model", "zarr")
        assert zarr.returncode in (0, 77), zarr.stderr[-4000:]
    return out


def _pack(tree: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:") as tar:  # NeMo's own layout: uncompressed, arcname="."
        tar.add(tree, arcname=".")
    return archive


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = model(input_ids)
    return getattr(output, "logits", output).float()


@pytest.mark.parametrize("layout", ["local", "unmapped", "legacy", "zarr"])
def test_megatron_core_gpt_logits(megatron, tmp_path, layout):
    """local: torch_dist as megatron-core saves the local spec (norms under the TE spec's fused names);
    unmapped: torch_dist with the layers' key maps emptied (stacked local names, input_layernorm...);
    legacy: NeMo 1 model_weights.ckpt (per-layer local names, None _extra_state entries);
    zarr: megatron-core's zarr strategy (0.14, or 0.10 from NEMOLITE_TEST_MCORE_ZARR_PATH)."""
    from transformers import NemotronForCausalLM

    tree = megatron / layout
    if not tree.is_dir():
        pytest.skip(f"{layout}: no megatron-core with the zarr strategy and zarr 2 (NEMOLITE_TEST_MCORE014_PATH)")
    input_ids = torch.load(megatron / "input_ids.pt")
    expected = torch.load(megatron / "logits.pt")
    assert expected.shape == (*input_ids.shape, VOCAB)
    if layout == "zarr":  # the older megatron-core's own forward of the same weights
        assert (torch.load(megatron / "logits_zarr.pt") - expected).abs().max().item() < TOLERANCE
    archive = _pack(tree, tmp_path / "model.nemo")
    for source in (tree, archive):
        loaded = load_nemo_model(source, dtype=torch.float32, device="cpu")
        assert loaded.tokenizer is not None and loaded.model.score is None
        got = _logits(loaded.model, input_ids)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() < TOLERANCE, source

    destination = tmp_path / "hf"
    assert main(["convert", str(archive), str(destination)]) == 0
    converted = NemotronForCausalLM.from_pretrained(destination, torch_dtype=torch.float32).eval()
    assert converted.config.vocab_size == VOCAB
    got = _logits(converted, input_ids)
    assert (got - expected).abs().max().item() < TOLERANCE
