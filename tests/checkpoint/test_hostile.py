"""A corpus of hostile and corrupt checkpoints: each must end in a NemoliteError that says what is wrong,
run nothing it names (a marker file stays absent), read nothing outside the checkpoint, and allocate
nothing the bytes on disk do not back (torch.empty/full of a billion elements or more raises
``HugeAllocation``, which no ``except Exception`` can swallow)."""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import struct
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nemolite.checkpoint.dist_checkpoint import open_dist_checkpoint
from nemolite.checkpoint.hf import read_safetensors_header
from nemolite.checkpoint.nemo import NemoCheckpoint
from nemolite.checkpoint.nemo_archive import NemoArchive
from nemolite.checkpoint.torch_zip import FileWindow, read_torch_checkpoint
from nemolite.errors import NemoliteError
from tests.checkpoint.test_dist_checkpoint import write_dcp, write_zarr_array, zarr_checkpoint
from tests.conftest import write_sentencepiece


class HugeAllocation(BaseException):
    pass


@pytest.fixture(autouse=True)
def no_huge_allocation(monkeypatch):
    for name in ("empty", "full", "zeros"):
        def guarded(*args, _original=getattr(torch, name), **kwargs):
            size = args[0] if args and not isinstance(args[0], int) else [n for n in args if isinstance(n, int)]
            if math.prod(int(n) for n in size) >= 10**9:
                raise HugeAllocation(f"torch.{_original.__name__}({tuple(size)})")
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, guarded)


class Call:
    """Pickles as a call of ``function(*args)``: what a hostile file hides in a checkpoint."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


PICKLED_AS = {"os.system": r"posix\.system", "builtins.eval": r"(builtins|__builtin__)\.eval",  # protocol 2 or 4
              "builtins.exec": r"(builtins|__builtin__)\.exec"}


def payloads(marker: Path) -> dict[str, Call]:
    return {"os.system": Call(os.system, f"touch {marker}"),
            "builtins.eval": Call(eval, f"open({str(marker)!r}, 'w')"),
            "builtins.exec": Call(exec, f"open({str(marker)!r}, 'w')")}


def assert_refused(load, match: str, marker: Path | None = None) -> None:
    started = time.monotonic()
    with pytest.raises(NemoliteError, match=match):
        load()
    assert time.monotonic() - started < 10, "refusing a hostile checkpoint must be fast"
    assert marker is None or not marker.exists(), "the checkpoint ran code"


# ------------------------------------------------------------------------------------------ torch zip

def write_torch_zip(path: Path, state, records: dict[str, bytes], numel: int | None = None,
                    kind: str = "storage") -> Path:
    """A torch.save-format zip; storages pickle as ("storage", FloatStorage, key, "cpu", numel)."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, bytes) and obj in records.values():
                key = next(k for k, v in records.items() if v is obj)
                return kind, torch.FloatStorage, key, "cpu", len(obj) // 4 if numel is None else numel
            return None

    data = io.BytesIO()
    Pickler(data, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data.getvalue())
        for key, value in records.items():
            archive.writestr(f"archive/data/{key}", value)
    return path


def tensor(storage: bytes, size, stride, offset=0) -> Call:
    return Call(torch._utils._rebuild_tensor_v2, storage, offset, size, stride, False, collections.OrderedDict())


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "builtins.exec"])
def test_torch_zip_pickle_that_runs_code(tmp_path, payload):
    marker = tmp_path / "ran"
    path = tmp_path / "model_weights.ckpt"
    torch.save({"w": torch.ones(2), "evil": payloads(marker)[payload]}, path)
    assert_refused(lambda: read_torch_checkpoint(FileWindow(path)), f"refusing to unpickle {PICKLED_AS[payload]}", marker)


@pytest.mark.parametrize("case,match", [
    ("numel 10^12", "claims a storage of 1000000000000 elements"),
    ("short record", "claims a storage of 4 elements .16 bytes. but its record holds 8"),
    ("view past storage", "reaches element 11 of a 2-element storage"),
    ("negative stride", "invalid view"),
    ("persistent id", "unknown persistent id"),
    ("truncated file", "not a readable torch checkpoint"),
])
def test_torch_zip_sizes_and_corruption(tmp_path, case, match):
    path = tmp_path / "model_weights.ckpt"
    data = bytes(8)
    if case == "numel 10^12":
        write_torch_zip(path, {"w": tensor(data, (10**6, 10**6), (10**6, 1))}, {"0": data}, numel=10**12)
    elif case == "short record":
        write_torch_zip(path, {"w": tensor(data, (4,), (1,))}, {"0": data}, numel=4)
    elif case == "view past storage":
        write_torch_zip(path, {"w": tensor(data, (4, 3), (3, 1))}, {"0": data})
    elif case == "negative stride":
        write_torch_zip(path, {"w": tensor(data, (2,), (-1,))}, {"0": data})
    elif case == "persistent id":
        write_torch_zip(path, {"w": tensor(data, (2,), (1,))}, {"0": data}, kind="storaxe")
    else:
        torch.save({"w": torch.ones(1000)}, path)
        path.write_bytes(path.read_bytes()[:3000])

    def load():
        for value in read_torch_checkpoint(FileWindow(path)).values():
            value.read()

    assert_refused(load, match)


# ------------------------------------------------------------------------------------- DCP .metadata

def dcp(tmp_path: Path) -> Path:
    return write_dcp(tmp_path / "ck", {"w": torch.arange(24.0).reshape(4, 6), "b": torch.ones(3)})


def rewrite_index(directory: Path, change) -> None:
    with open(directory / ".metadata", "rb") as file:
        index = pickle.load(file)  # the test's own file: trusted
    change(index)
    with open(directory / ".metadata", "wb") as file:
        pickle.dump(index, file)


def storage_of(index, fqn):
    return next(info for where, info in index.storage_data.items() if where.fqn == fqn)


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "builtins.exec"])
def test_dcp_index_that_runs_code(tmp_path, payload):
    marker, directory = tmp_path / "ran", dcp(tmp_path)
    rewrite_index(directory, lambda index: setattr(index, "planner_data", payloads(marker)[payload]))
    assert_refused(lambda: open_dist_checkpoint(directory), f"refusing to load {PICKLED_AS[payload]}", marker)


def huge(index):
    entry = index.state_dict_metadata["w"]
    entry.size = torch.Size([10**6, 10**6])
    entry.chunks[0].sizes = torch.Size([10**6, 10**6])


@pytest.mark.parametrize("change,match", [
    (huge, "claims 1000000000000 elements, more than its .* stored bytes"),
    (lambda index: setattr(storage_of(index, "w"), "relative_path", "../../etc/passwd"), "not a file of this"),
    (lambda index: setattr(storage_of(index, "w"), "relative_path", "/etc/passwd"), "not a file of this"),
    (lambda index: setattr(storage_of(index, "w"), "offset", 10**12), "ends past the file"),
    (lambda index: setattr(storage_of(index, "b"), "offset", storage_of(index, "w").offset), "overlaps another"),
    (lambda index: setattr(index.state_dict_metadata["w"].chunks[0], "offsets", torch.Size([3, 0])),
     "does not lie inside its shape"),
    (lambda index: setattr(storage_of(index, "w"), "transform_descriptors", ["zstd"]), "stored with transforms"),
])
def test_dcp_index_claims_are_checked_against_the_files(tmp_path, change, match):
    directory = dcp(tmp_path)
    rewrite_index(directory, change)
    assert_refused(lambda: open_dist_checkpoint(directory).read("w"), match)


@pytest.mark.parametrize("data,match", [
    (pickle.dumps(Call(collections.Counter, "x")), "refusing to load collections.Counter"),
    (b"ctorch.distributed.checkpoint.metadata\nEvil\n.", "refusing to load torch.distributed.checkpoint.metadata.Evil"),
    (b"\x80\x04\x8e" + (10**12).to_bytes(8, "little") + b"abc", "not a readable DCP index"),
    (pickle.dumps([1, 2]), "is not a DCP index: it holds a list"),
    (b"", "not a readable DCP index"),
])
def test_dcp_index_that_is_not_an_index(tmp_path, data, match):
    directory = dcp(tmp_path)
    (directory / ".metadata").write_bytes(data)
    assert_refused(lambda: open_dist_checkpoint(directory), match)


# ---------------------------------------------------------------------------------------------- zarr

@pytest.mark.parametrize("compressor,match", [
    ({"id": "pickle"}, "compressor 'pickle' is not allowed; nemolite reads only blosc, zstd, lz4, zlib, gzip"),
    ({"id": "evil_codec"}, "compressor 'evil_codec' is not allowed"),
    ("zlib", "compressor 'zlib' is not allowed"),
    ({"id": "lzma", "format": 3, "filters": [{"id": 33}]}, "raw lzma"),
])
def test_zarr_codec_outside_the_allow_list(tmp_path, compressor, match):
    directory = zarr_checkpoint(tmp_path / "ck")
    write_zarr_array(directory, "w", torch.ones(4), compressor=compressor)
    assert_refused(lambda: open_dist_checkpoint(directory).read("w"), match)


def test_zarr_filters_are_refused(tmp_path):
    directory = zarr_checkpoint(tmp_path / "ck")
    path = write_zarr_array(directory, "w", torch.ones(4))
    meta = json.loads((path / ".zarray").read_text())
    meta["filters"] = [{"id": "pickle"}]
    (path / ".zarray").write_text(json.dumps(meta))
    assert_refused(lambda: open_dist_checkpoint(directory), "filters .* are not supported")


def zarr_case(directory: Path, case: str) -> None:
    compressed = case in ("shape 10^12", "larger than declared", "fewer than declared", "corrupt stream")
    path = write_zarr_array(directory, "w", torch.arange(8.0), chunks=(4,), fill_value=0.0 if case == "all fill" else None,
                            compressor={"id": "zlib", "level": 1} if compressed else None)
    meta = json.loads((path / ".zarray").read_text())
    chunk = {name: (path / name).read_bytes() for name in ("0", "1")}  # 16 bytes each
    for name, raw in chunk.items():
        if compressed:
            (path / name).write_bytes(zlib.compress(raw))
    if case == "shape 10^12":
        meta.update(shape=[10**12], chunks=[10**12])
    elif case == "all fill":
        meta.update(shape=[10**12], chunks=[10**6])
        for name in chunk:
            (path / name).unlink()
    elif case == "larger than declared":
        (path / "1").write_bytes(zlib.compress(chunk["1"] * 2))
    elif case == "fewer than declared":
        (path / "1").write_bytes(zlib.compress(chunk["1"][:8]))
    elif case == "corrupt stream":
        (path / "1").write_bytes(b"\x78\x9c" + bytes(20))
    elif case == "truncated":
        (path / "1").write_bytes(chunk["1"][:-2])
    elif case == "shape types":
        meta.update(shape=["8"])
    (path / ".zarray").write_text(json.dumps(meta))


@pytest.mark.parametrize("case,match", [
    ("shape 10^12", "cannot decode to the 4000000000000 bytes"),
    ("all fill", "needs 3725.3 GiB, more than this machine's"),
    ("larger than declared", "decodes to more bytes than the 16"),
    ("fewer than declared", "decodes to fewer bytes than the 16"),
    ("corrupt stream", "zlib chunk is corrupt or crafted"),
    ("truncated", "chunk holds 14 bytes, expected 16"),
    ("shape types", "must be integers"),
])
def test_zarr_sizes_are_checked_before_allocating(tmp_path, case, match):
    directory = zarr_checkpoint(tmp_path / "ck")
    zarr_case(directory, case)
    assert_refused(lambda: open_dist_checkpoint(directory).read("w"), match)


def test_zarr_header_codecs_must_declare_the_chunk_size(tmp_path):
    numcodecs = pytest.importorskip("numcodecs")
    directory = zarr_checkpoint(tmp_path / "ck")
    for codec in ({"id": "zstd", "level": 1}, {"id": "lz4"}, {"id": "blosc", "cname": "lz4"}):
        path = write_zarr_array(directory, codec["id"], torch.arange(8.0), compressor=codec)
        (path / "0").write_bytes(numcodecs.get_codec(codec).encode(np.arange(4, dtype=np.float32).tobytes()))
    reader = open_dist_checkpoint(directory)
    for name in ("zstd", "lz4", "blosc"):
        assert_refused(lambda: reader.read(name), f"{name} chunk is corrupt or crafted: declares 16 decoded bytes")


# ------------------------------------------------------------------------------------------ safetensors

def write_safetensors(path: Path, header: dict, data: bytes, header_size: int | None = None) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if header_size is None else header_size) + text + data)
    return path


@pytest.mark.parametrize("header,header_size,match", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 10**12, "a header of 1000000000000 bytes"),
    ({"w": {"dtype": "F32", "shape": [2000], "data_offsets": [0, 8000]}}, None, "truncated"),
    ({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 8]}}, None, "needs 4000000000000 bytes"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, None, "invalid data_offsets"),
    ({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, None, "invalid data_offsets"),
    ({"w": "F32"}, None, "unsupported dtype"),
    ([1, 2], None, "not a JSON object"),
])
def test_safetensors_header_checked_against_the_file(tmp_path, header, header_size, match):
    path = write_safetensors(tmp_path / "model.safetensors", header, bytes(8), header_size)
    assert_refused(lambda: read_safetensors_header(path), match)


# ------------------------------------------------------------------------------------------ .nemo tar

def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, data: bytes = b"", kind=tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize("members,mode,match", [
    ([member("../escaped.txt", b"owned")], "w:", "unsafe path '../escaped.txt'"),
    ([member("/tmp/escaped.txt", b"owned")], "w:", "unsafe path"),
    ([member("tokenizer.model", kind=tarfile.SYMTYPE, link="/etc/passwd")], "w:", "link 'tokenizer.model' -> '/etc/"),
    ([member("a", b"x"), member("b", kind=tarfile.LNKTYPE, link="a")], "w:", "holds a link 'b'"),
    ([member("dev", kind=tarfile.CHRTYPE)], "w:", "holds a device or fifo 'dev'"),
    ([member("fifo", kind=tarfile.FIFOTYPE)], "w:gz", "holds a device or fifo 'fifo'"),
    ([member("../escaped.txt", b"owned")], "w:gz", "unsafe path"),
])
def test_tar_members_that_leave_or_are_not_files(tmp_path, members, mode, match):
    path = write_tar(tmp_path / "evil.nemo", members, mode)
    assert_refused(lambda: NemoArchive(path), match)
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/escaped.txt").exists()


@pytest.mark.parametrize("gzipped", [False, True])
def test_tar_member_claiming_more_than_the_file(tmp_path, gzipped):
    raw = bytearray(write_tar(tmp_path / "plain.tar", [member("model_config.yaml", b"x" * 600)]).read_bytes())
    raw[124:136] = b"%011o\x00" % (8**11 - 1)  # the size field: 8 GiB
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\x00 " % (sum(raw[:512]))  # header checksum over the patched header
    path = tmp_path / "huge.nemo"
    if gzipped:
        import gzip
        path.write_bytes(gzip.compress(bytes(raw)))
    else:
        path.write_bytes(bytes(raw))
    assert_refused(lambda: NemoArchive(path), "unexpected end of data.*truncated")


# ---------------------------------------------------------------------------- model_config.yaml paths

NEMO_CONFIG = {"hidden_size": 64, "num_attention_heads": 4, "num_layers": 1, "ffn_hidden_size": 128,
               "activation": "squared-relu", "normalization": "layernorm1p", "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def outside_tokenizer(tmp_path_factory) -> Path:
    """A valid tokenizer outside every checkpoint: loading it would mean the confinement failed."""
    directory = tmp_path_factory.mktemp("outside")
    write_sentencepiece(directory)
    return directory / "tokenizer.model"


@pytest.mark.parametrize("reference", ["relative", "absolute", "nemo-relative", "symlink", "/etc/passwd",
                                       "../../etc/passwd"])
def test_tokenizer_path_outside_the_checkpoint(tmp_path, outside_tokenizer, reference):
    tree = tmp_path / "checkpoint"
    tree.mkdir()
    name = {"relative": os.path.relpath(outside_tokenizer, tree), "absolute": str(outside_tokenizer),
            "nemo-relative": "nemo:" + os.path.relpath(outside_tokenizer, tree), "symlink": "tokenizer.model"}
    if reference == "symlink":
        (tree / "tokenizer.model").symlink_to(outside_tokenizer)
    config = {**NEMO_CONFIG, "tokenizer": {"library": "sentencepiece", "model": name.get(reference, reference)}}
    (tree / "model_config.yaml").write_text(yaml.safe_dump(config))
    assert_refused(lambda: NemoCheckpoint(tree), "'tokenizer.model' names .*which is not a file inside")
