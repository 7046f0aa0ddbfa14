"""Distributed checkpoints as megatron-core writes them: written by megatron-core itself (0.16.1, and 0.14.0
with its zarr strategy, from the site dirs .ci/run installs), and the index shapes of 0.12 - 0.15."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemolite.checkpoint.dist_checkpoint import open_dist_checkpoint
from tests.checkpoint.test_dist_checkpoint import tensors, write_dcp  # noqa: F401 (a fixture)


@pytest.mark.parametrize("version", ["0.12-0.14", "0.15"])
def test_torch_dist_index_as_megatron_core_pickles_it(tmp_path, tensors, monkeypatch, version):
    """megatron-core 0.12-0.14 add ``mcore_data`` and ``all_local_plans`` (MCoreSavePlan, a SavePlan subclass)
    to the index; 0.15 pickles the index itself as MCoreMetadata (a Metadata subclass). Built here with
    stand-in classes of the same module and names (megatron/core/dist_checkpointing/strategies/torch.py),
    removed again before reading: nemolite must not need megatron to read them."""
    import dataclasses
    import types

    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.planner import SavePlan

    name = "megatron.core.dist_checkpointing.strategies.torch"
    module = types.ModuleType(name)
    module.MCoreSavePlan = dataclasses.dataclass(frozen=True)(
        type("MCoreSavePlan", (SavePlan,), {"__module__": name, "__annotations__": {"mcore_data": dict},
                                            "mcore_data": None}))
    module.MCoreMetadata = dataclasses.dataclass(
        type("MCoreMetadata", (Metadata,), {"__module__": name, "__annotations__": {"mcore_data": dict},
                                            "mcore_data": None}))
    directory = write_dcp(tmp_path / "ck", tensors)
    with open(directory / ".metadata", "rb") as file:
        index = pickle.load(file)
    mcore_data = {key: {"nd_reformulated_orig_global_shape": tuple(tensor.shape)} for key, tensor in tensors.items()}
    plans = [module.MCoreSavePlan(items=[], mcore_data=mcore_data)]
    if version == "0.15":
        index = module.MCoreMetadata(mcore_data=mcore_data, **vars(index))
    else:
        index.mcore_data = mcore_data
    index.all_local_plans = plans
    with monkeypatch.context() as patch:
        parts = name.split(".")
        for depth in range(1, len(parts)):  # pickle imports the module by name, parents first
            patch.setitem(sys.modules, ".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
        patch.setitem(sys.modules, name, module)
        (directory / ".metadata").write_bytes(pickle.dumps(index))
    assert name not in sys.modules
    reader = open_dist_checkpoint(directory)
    for key, tensor in tensors.items():
        assert torch.equal(reader.read(key), tensor), key


WRITER = Path(__file__).with_name("mcore_writer.py")


# (environment variable naming a site dir, backend): .ci/run installs megatron-core 0.16.1 (no zarr strategy
# left) and 0.14.0 (the release of NeMo 2.5.0) with zarr 2, numcodecs<0.16 and tensorstore (bf16 for numpy).
WRITERS = [("NEMOLITE_TEST_MCORE_PATH", "torch_dist"), ("NEMOLITE_TEST_MCORE014_PATH", "torch_dist"),
           ("NEMOLITE_TEST_MCORE014_PATH", "zarr"), ("NEMOLITE_TEST_MCORE_ZARR_PATH", "zarr")]


@pytest.mark.parametrize("variable,backend", WRITERS)
def test_megatron_core_written_checkpoint(tmp_path, variable, backend):
    """megatron-core's own dist_checkpointing.save (gloo, one rank, CPU), from the site dir ``variable``
    names (prepended to PYTHONPATH); NEMOLITE_TEST_MCORE_ZARR_PATH may name an older one (0.10, zarr 2,
    numcodecs<0.16, tensorstore)."""
    site = os.environ.get(variable)
    if not site:
        pytest.skip(f"{variable} is not set (.ci/run sets it)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-W", "ignore", str(WRITER), str(tmp_path / "ck"), backend],
                            env=env, capture_output=True, text=True, timeout=240)
    if result.returncode == 77:
        pytest.skip(f"megatron-core {backend} writer unavailable: {result.stdout.strip()[-200:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    if variable == "NEMOLITE_TEST_MCORE014_PATH" and backend == "torch_dist":  # the index NeMo 2.5.0 writes
        assert b"MCoreSavePlan" in (tmp_path / "ck" / ".metadata").read_bytes()
    expected = torch.load(tmp_path / "expected.pt")
    reader = open_dist_checkpoint(tmp_path / "ck")
    assert reader.backend == backend and reader.keys() == sorted(expected)
    for key, tensor in expected.items():
        assert reader.dtype(key) == tensor.dtype
        assert torch.equal(reader.read(key), tensor), key
        if tensor.dim() == 3:
            for layer in range(tensor.shape[0]):
                assert torch.equal(reader.read_slice(key, layer), tensor[layer])
