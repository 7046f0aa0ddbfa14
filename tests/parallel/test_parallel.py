"""Tensor and pipeline parallelism on CPU with gloo: TP 2, PP 2, TP 2 × PP 2 (and TP 4, which replicates
KV heads) give the single process's greedy tokens and logits within 1e-4 (fp32), for a Nemotron-4-style
model (GQA, partial rotary) from HF and NeMo checkpoints, a NAS model with no-op and linear layers, and a
reward model (its head on the last stage)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemolite.errors import NemoliteError
from nemolite.parallel.groups import expand_nodelist, init_parallel, launch_from_environment
from tests.checkpoint.test_nemo import write_nemo
from tests.conftest import make_nemotron, make_reward_model, write_sentencepiece
from tests.model.test_nemotron_nas import BLOCKS, patched_llama, write_nas
from tests.server.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
RANK_MAIN = Path(__file__).with_name("rank_main.py")


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), *args]


def run_ranks(model: Path, tp: int, pp: int, out: Path, quantization: str | None = None) -> dict:
    command = ([sys.executable, str(RANK_MAIN)] if tp * pp == 1 else torchrun(tp * pp, str(RANK_MAIN))) + \
        [str(model), str(tp), str(pp), str(out)] + ([quantization] if quantization else [])
    result = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel")
    nemotron = make_nemotron(root / "nemotron", num_hidden_layers=4)
    nas = write_nas(root / "nas", patched_llama(BLOCKS), BLOCKS)
    write_sentencepiece(nas)
    return {"nemotron": nemotron, "nemotron-nemo": write_nemo(nemotron, root / "nemotron.nemo", tp=2),
            "nas": nas, "reward": make_reward_model(root / "reward", num_hidden_layers=4)}


@pytest.fixture(scope="module")
def references(models, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("references")
    return {name: run_ranks(path, 1, 1, out / f"{name}.pt") for name, path in models.items()}


@pytest.mark.parametrize("name, tp, pp", [
    ("nemotron", 2, 1), ("nemotron", 1, 2), ("nemotron", 2, 2), ("nemotron", 4, 1),
    ("nemotron-nemo", 2, 2), ("nas", 2, 1), ("nas", 1, 2), ("nas", 2, 2), ("reward", 2, 2),
])
def test_parallel_equals_one_process(models, references, tmp_path, name, tp, pp):
    result = run_ranks(models[name], tp, pp, tmp_path / "out.pt")
    reference = references[name]
    assert result["tokens"] == reference["tokens"]
    for got, expected in zip(result["logprobs"], reference["logprobs"]):
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("name, tp, pp, quantization", [("nemotron", 2, 2, "int4"), ("nas", 2, 1, "int8-head")])
def test_quantized_parallel_equals_quantized_one_process(models, tmp_path, name, tp, pp, quantization):
    """Each rank quantizes its own shard; with shard boundaries on block boundaries those are the whole
    layer's groups, so only the all-reduce's summation order differs from one process. The kernels round
    activations to int8, where a last-bit difference can move one value by a step: logprobs agree to
    1e-2 (seen: 3.4e-3), not the float path's 1e-4, and a random model's near-tied greedy choices may
    part after a few tokens (seen: the 8th of 10)."""
    reference = run_ranks(models[name], 1, 1, tmp_path / "one.pt", quantization)
    result = run_ranks(models[name], tp, pp, tmp_path / "ranks.pt", quantization)
    for got, expected in zip(result["tokens"], reference["tokens"]):
        assert got[:5] == expected[:5]
    for got, expected in zip(result["logprobs"], reference["logprobs"]):
        assert torch.allclose(got, expected, atol=1e-2), (got - expected).abs().max()


def test_nemo_and_hf_references_agree(references):
    assert references["nemotron"]["tokens"] == references["nemotron-nemo"]["tokens"]


def test_launchers_environments():
    torchrun = launch_from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                        "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "6000"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr,
            torchrun.master_port) == (3, 4, 1, "10.0.0.2", 6000)
    slurm = launch_from_environment({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                                     "SLURM_JOB_NODELIST": "gpu[007-008]"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr, slurm.master_port) == \
        (9, 16, 1, "gpu007", 29500)
    assert launch_from_environment({}) is None
    assert expand_nodelist("gpu[01-03,07],login2") == ["gpu01", "gpu02", "gpu03", "gpu07", "login2"]


def test_sizes_must_match_the_processes():
    with pytest.raises(NemoliteError, match="must equal the number of processes; launch 2 processes"):
        init_parallel(2, 1, environ={})
    with pytest.raises(NemoliteError, match="this job has 4 processes"):
        init_parallel(2, 1, environ={"RANK": "0", "WORLD_SIZE": "4"})
