"""Distributed-checkpoint readers: torch_dist (PyTorch DCP) and zarr, fixtures written in-process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from nemolite.checkpoint import torch_dist, zarr_array
from nemolite.checkpoint.dist_checkpoint import open_dist_checkpoint
from nemolite.errors import NemoliteError

TORCH_DIST_META = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch"}
ZARR_META = {"sharded_backend": "zarr", "sharded_backend_version": 1, "common_backend": "torch",
             "common_backend_version": 1}


def write_dcp(directory: Path, state_dict: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state_dict, checkpoint_id=directory, no_dist=True)
    (directory / "metadata.json").write_text(json.dumps(TORCH_DIST_META))
    return directory


def write_zarr_array(directory: Path, key: str, tensor: torch.Tensor, chunks=None, separator=None,
                     order="C", compressor=None, fill_value=None, skip_chunks=()) -> Path:
    """A zarr v2 array written by hand the way Megatron's zarr strategy lays it out (bf16 as "bfloat16")."""
    path = directory / key
    path.mkdir(parents=True)
    chunks = tuple(chunks or tensor.shape)
    if tensor.dtype == torch.bfloat16:
        array, dtype = tensor.view(torch.int16).numpy().view("<u2"), "bfloat16"
    else:
        array = tensor.numpy()
        dtype = array.dtype.str
    meta = {"zarr_format": 2, "shape": list(tensor.shape), "chunks": list(chunks), "dtype": dtype,
            "compressor": compressor, "fill_value": fill_value, "filters": None, "order": order}
    if separator:
        meta["dimension_separator"] = separator
    (path / ".zarray").write_text(json.dumps(meta, indent=4))
    grid = [-(-size // chunk) for size, chunk in zip(tensor.shape, chunks)]
    for index in np.ndindex(*grid):
        if index in skip_chunks:
            continue
        block = np.zeros(chunks, dtype=array.dtype)  # edge chunks are stored full-size, padded
        region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, tensor.shape))
        block[tuple(slice(0, r.stop - r.start) for r in region)] = array[region]
        name = (separator or ".").join(map(str, index)) if index else "0"
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(block.tobytes(order=order))
    return path


def zarr_checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metadata.json").write_text(json.dumps(ZARR_META))
    return directory


@pytest.fixture
def tensors():
    torch.manual_seed(0)
    return {
        "model.embedding.word_embeddings.weight": torch.randn(10, 8),
        "model.decoder.layers.self_attention.linear_qkv.weight": torch.randn(3, 12, 8).bfloat16(),
        "model.decoder.final_layernorm.weight": torch.randn(8).bfloat16(),
        "model.decoder.layers.mlp.linear_fc1.layer_norm_bias": torch.randn(3, 8),
    }


STACKED = "model.decoder.layers.self_attention.linear_qkv.weight"


# ----------------------------------------------------------------------------------------- torch_dist

def test_torch_dist_reads_every_tensor_and_layer(tmp_path, tensors):
    extra = {"model.decoder.layers.self_attention.core_attention._extra_state": io.BytesIO(b"te state"),
             "scalar": torch.tensor(2.5)}
    reader = open_dist_checkpoint(write_dcp(tmp_path / "model_weights", {**tensors, **extra}))
    assert reader.backend == "torch_dist"
    assert reader.keys() == sorted([*tensors, "scalar"])  # the BytesIO entry is not a tensor
    for key, tensor in tensors.items():
        assert reader.shape(key) == tensor.shape and reader.dtype(key) == tensor.dtype
        assert torch.equal(reader.read(key), tensor)
    for layer in range(3):
        assert torch.equal(reader.read_slice(STACKED, layer), tensors[STACKED][layer])
    assert torch.equal(reader.read_slice(STACKED, -1), tensors[STACKED][-1])
    assert torch.equal(reader.read("scalar"), torch.tensor(2.5))
    # a checkpoint directory holding model_weights/ opens too
    assert open_dist_checkpoint(tmp_path).keys() == reader.keys()


@contextlib.contextmanager
def one_rank_group():
    """Saving a ShardedTensor needs a process group; reading needs none."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_torch_dist_reassembles_sharded_tensors(tmp_path):
    """A ShardedTensor saved as (layer, TP-rank) pieces, as Megatron saves stacked TP-split weights."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    full = torch.randn(3, 12, 8)
    shards = [Shard(full[i:i + 1, t * 6:(t + 1) * 6].clone(), ShardMetadata([i, t * 6, 0], [1, 6, 8], "rank:0/cpu"))
              for i in range(3) for t in range(2)]
    directory = tmp_path / "weights"
    directory.mkdir()
    with one_rank_group():
        dcp.save({STACKED: init_from_local_shards(shards, [3, 12, 8])}, checkpoint_id=directory)
    (directory / "metadata.json").write_text(json.dumps(TORCH_DIST_META))
    reader = open_dist_checkpoint(directory)
    assert len(reader._chunks[STACKED]) == 6
    assert torch.equal(reader.read(STACKED), full)
    assert torch.equal(reader.read_slice(STACKED, 1), full[1])


def test_torch_dist_read_slice_reads_only_that_layers_shards(tmp_path, monkeypatch):
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    full = torch.randn(4, 5, 3)
    shards = [Shard(full[i:i + 1].clone(), ShardMetadata([i, 0, 0], [1, 5, 3], "rank:0/cpu")) for i in range(4)]
    directory = tmp_path / "ck"
    directory.mkdir()
    with one_rank_group():
        dcp.save({"w": init_from_local_shards(shards, [4, 5, 3]), "other": torch.randn(100)}, checkpoint_id=directory)
    (directory / "metadata.json").write_text(json.dumps(TORCH_DIST_META))
    reader = open_dist_checkpoint(directory)
    opened = []
    original = torch_dist.FileWindow
    monkeypatch.setattr(torch_dist, "FileWindow", lambda path, start, size: opened.append(start) or
                        original(path, start, size))
    assert torch.equal(reader.read_slice("w", 2), full[2])
    assert opened == [reader._chunks["w"][2].piece.offset]
    opened.clear()
    reader.read("other")
    assert opened == [reader._chunks["other"][0].piece.offset]


def test_torch_dist_errors(tmp_path, tensors):
    directory = write_dcp(tmp_path / "ck", tensors)
    reader = open_dist_checkpoint(directory)
    with pytest.raises(NemoliteError, match="no tensor 'missing'"):
        reader.read("missing")
    with pytest.raises(NemoliteError, match="out of range"):
        reader.read_slice(STACKED, 3)
    data_file = next(directory.glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    with pytest.raises(NemoliteError, match="missing, truncated or corrupt"):
        for key in tensors:
            reader.read(key)
    data_file.unlink()
    with pytest.raises(NemoliteError, match="distcp"):
        reader.read(STACKED)
    (directory / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(NemoliteError, match="not a readable DCP index"):
        open_dist_checkpoint(directory)
    (directory / ".metadata").write_bytes(pickle.dumps(os.system))  # never unpickle arbitrary globals
    with pytest.raises(NemoliteError, match="refusing to load"):
        open_dist_checkpoint(directory)
    (directory / ".metadata").unlink()
    with pytest.raises(NemoliteError, match="without its .metadata"):
        open_dist_checkpoint(directory)


def test_torch_dist_incomplete_shards_are_an_error(tmp_path, tensors):
    directory = write_dcp(tmp_path / "ck", tensors)
    with open(directory / ".metadata", "rb") as file:
        metadata = pickle.load(file)
    chunk = metadata.state_dict_metadata[STACKED].chunks[0]
    chunk.sizes = torch.Size([2, *chunk.sizes[1:]])  # the index claims less than the global shape
    with open(directory / ".metadata", "wb") as file:
        pickle.dump(metadata, file)
    reader = open_dist_checkpoint(directory)
    with pytest.raises(NemoliteError, match="cover 192 of the 288 elements"):
        reader.read(STACKED)
    with pytest.raises(NemoliteError, match="cover 0 of the 96"):
        reader.read_slice(STACKED, 2)


# ----------------------------------------------------------------------------------------------- zarr

def test_zarr_reads_fp32_bf16_multichunk_and_per_layer_chunks(tmp_path, tensors):
    directory = zarr_checkpoint(tmp_path / "model_weights")
    emb = "model.embedding.word_embeddings.weight"
    write_zarr_array(directory, emb, tensors[emb], chunks=(3, 5))  # 4x2 grid, padded edge chunks
    # per (layer, TP rank) chunks, as Megatron writes a stacked TP=2 weight
    write_zarr_array(directory, STACKED, tensors[STACKED], chunks=(1, 6, 8))
    write_zarr_array(directory, "model.decoder.final_layernorm.weight", tensors["model.decoder.final_layernorm.weight"])
    bias = "model.decoder.layers.mlp.linear_fc1.layer_norm_bias"
    write_zarr_array(directory, bias, tensors[bias], chunks=(2, 3), separator="/", order="F")
    (directory / "model.decoder.layers.self_attention.core_attention._extra_state").mkdir()
    (directory / "model.decoder.layers.self_attention.core_attention._extra_state" / "shard_0_1.pt").write_bytes(b"x")
    torch.save({}, directory / "common.pt")

    reader = open_dist_checkpoint(tmp_path)
    assert reader.backend == "zarr" and reader.keys() == sorted(tensors)
    assert json.loads((directory / STACKED / ".zarray").read_text())["dtype"] == "bfloat16"
    for key, tensor in tensors.items():
        assert reader.shape(key) == tensor.shape and reader.dtype(key) == tensor.dtype
        assert torch.equal(reader.read(key), tensor), key
    for layer in range(3):
        assert torch.equal(reader.read_slice(STACKED, layer), tensors[STACKED][layer])
        assert torch.equal(reader.read_slice(bias, layer), tensors[bias][layer])


def test_zarr_read_slice_opens_only_that_layers_chunks(tmp_path, tensors, monkeypatch):
    directory = zarr_checkpoint(tmp_path / "ck")
    for key, tensor in tensors.items():
        write_zarr_array(directory, key, tensor, chunks=(1, 6, 8) if key == STACKED else None)
    reader = open_dist_checkpoint(directory)
    opened = []
    monkeypatch.setattr(zarr_array, "open", lambda path, mode: opened.append(Path(path)) or open(path, mode), raising=False)
    reader.read_slice(STACKED, 1)
    assert opened == [directory / STACKED / "1.0.0", directory / STACKED / "1.1.0"]
    opened.clear()
    reader.read("model.embedding.word_embeddings.weight")
    assert opened == [directory / "model.embedding.word_embeddings.weight" / "0.0"]


def test_zarr_fill_value_and_big_endian(tmp_path):
    directory = zarr_checkpoint(tmp_path / "ck")
    tensor = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    write_zarr_array(directory, "filled", tensor, chunks=(2, 3), fill_value=0.0, skip_chunks={(1, 0)})
    path = directory / "big"
    path.mkdir()
    (path / ".zarray").write_text(json.dumps({"zarr_format": 2, "shape": [3], "chunks": [3], "dtype": ">i4",
                                              "compressor": None, "fill_value": 0, "filters": None, "order": "C"}))
    (path / "0").write_bytes(np.array([1, -2, 70000], dtype=">i4").tobytes())
    reader = open_dist_checkpoint(directory)
    assert torch.equal(reader.read("filled"), torch.cat([tensor[:2], torch.zeros(2, 3)]))
    assert torch.equal(reader.read("big"), torch.tensor([1, -2, 70000], dtype=torch.int32))


def test_zarr_errors(tmp_path, tensors, monkeypatch):
    directory = zarr_checkpoint(tmp_path / "ck")
    write_zarr_array(directory, STACKED, tensors[STACKED], chunks=(1, 12, 8))
    reader = open_dist_checkpoint(directory)
    (directory / STACKED / "1.0.0").write_bytes((directory / STACKED / "1.0.0").read_bytes()[:-2])
    with pytest.raises(NemoliteError, match=r"1\.0\.0: chunk holds 190 bytes, expected 192.*truncated"):
        reader.read(STACKED)
    assert torch.equal(reader.read_slice(STACKED, 0), tensors[STACKED][0])  # other layers still read
    (directory / STACKED / "2.0.0").unlink()
    with pytest.raises(NemoliteError, match="chunk file '2.0.0' is missing"):
        reader.read_slice(STACKED, 2)

    write_zarr_array(directory, "compressed", torch.ones(4), compressor={"id": "zstd", "level": 1})
    monkeypatch.setitem(sys.modules, "numcodecs", None)
    with pytest.raises(NemoliteError, match="compressed with 'zstd'.*pip install numcodecs"):
        open_dist_checkpoint(directory).read("compressed")

    write_zarr_array(directory, "odd", torch.ones(2))
    (directory / "odd" / ".zarray").write_text(json.dumps({"zarr_format": 2, "shape": [2], "chunks": [2],
                                                           "dtype": "<q9", "compressor": None}))
    with pytest.raises(NemoliteError, match="unsupported dtype '<q9'"):
        open_dist_checkpoint(directory)
    (directory / "odd" / ".zarray").write_text("{not json")
    with pytest.raises(NemoliteError, match="unreadable"):
        open_dist_checkpoint(directory)


def test_zarr_compressed_chunks_with_numcodecs(tmp_path):
    numcodecs = pytest.importorskip("numcodecs")
    directory = zarr_checkpoint(tmp_path / "ck")
    tensor = torch.randn(4, 6)
    path = write_zarr_array(directory, "w", tensor, chunks=(2, 6), compressor={"id": "zlib", "level": 1})
    codec = numcodecs.get_codec({"id": "zlib", "level": 1})
    for name in ("0.0", "1.0"):
        (path / name).write_bytes(codec.encode((path / name).read_bytes()))
    assert torch.equal(open_dist_checkpoint(directory).read("w"), tensor)


def test_metadata_json_errors(tmp_path):
    with pytest.raises(NemoliteError, match="no metadata.json"):
        open_dist_checkpoint(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps({"sharded_backend": "tensorstore"}))
    with pytest.raises(NemoliteError, match="unsupported sharded_backend 'tensorstore'"):
        open_dist_checkpoint(tmp_path)
    (tmp_path / "metadata.json").write_text("{")
    with pytest.raises(NemoliteError, match="unreadable"):
        open_dist_checkpoint(tmp_path)


# ----------------------------------------------------------------------------------- bounded memory

MEMORY_SCRIPT = """
import sys, torch
from nemolite.checkpoint.dist_checkpoint import open_dist_checkpoint

def status(field):
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) // 1024 for line in file if line.startswith(field))

def reset_peak():  # VmHWM := VmRSS
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")

reader = open_dist_checkpoint(sys.argv[1])
reset_peak()
base = status("VmRSS")
tensor = reader.read("t2")
assert tensor[0, 0].item() == 2.0 and tensor[-1, -1].item() == 2.0
one = status("VmHWM") - base
del tensor
reset_peak()
base = status("VmRSS")
for key in reader.keys():
    reader.read(key)
print(one, status("VmHWM") - base)
"""


@pytest.mark.parametrize("backend", ["torch_dist", "zarr"])
def test_reading_one_tensor_does_not_load_the_others(tmp_path, backend):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to reset the peak RSS")
    """Four 32 MB tensors: reading one grows peak RSS by the tensor plus one stored chunk (zarr: 8 MB;
    DCP: the shard, here the whole tensor, which torch.load materialises before the copy), never 128 MB."""
    tensors = {f"t{i}": torch.full((2048, 4096), float(i)) for i in range(4)}
    if backend == "torch_dist":
        directory = write_dcp(tmp_path / "ck", tensors)
    else:
        directory = zarr_checkpoint(tmp_path / "ck")
        for key, tensor in tensors.items():
            write_zarr_array(directory, key, tensor, chunks=(512, 4096))
    del tensors
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(directory)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    one, all_ = map(int, result.stdout.split())
    print(backend, "peak RSS growth reading one / each in turn:", one, all_, "MB")
    chunk = 32 if backend == "torch_dist" else 8
    assert 30 <= one <= 32 + chunk + 16, f"reading one 32 MB tensor grew peak RSS by {one} MB"
    # in turn, malloc may keep a freed 32 MB result around for the next one: still far below 4 x 32 MB
    assert all_ <= 2 * 32 + 16, f"reading each tensor in turn grew peak RSS by {all_} MB"
