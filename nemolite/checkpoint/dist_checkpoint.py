"""Megatron-core distributed checkpoints, read with torch alone, one tensor at a time.

A NeMo 1 ``model_weights/`` or NeMo 2 ``weights/`` directory holds ``metadata.json``
(``{"sharded_backend": "torch_dist" | "zarr", ...}``), ``common.pt`` (non-sharded state, not weights)
and the tensors in one of two backends:

- ``torch_dist``: PyTorch DCP, ``__<rank>_<n>.distcp`` data files and a pickled ``.metadata`` index.
  Read here through DCP's own ``FileSystemReader`` with a one-tensor load planner, no process group.
  The index is unpickled with an allow-list of DCP's metadata classes, never arbitrary globals.
- ``zarr``: one zarr v2 array directory per key (``.zarray`` + chunk files ``0.0.0`` ...), parsed by
  hand: Megatron writes bf16 arrays with the dtype string ``"bfloat16"``, which zarr cannot parse.

Arrays hold the global (TP-merged) tensor. Homogeneous layers are stacked, so a key like
``model.decoder.layers.self_attention.linear_qkv.weight`` has shape ``[num_layers, ...]``;
``read_slice(key, i)`` reads layer ``i`` only: the chunks (zarr) or DCP shards that overlap it.
Megatron saves one chunk/shard per (layer, TP rank), so that is exactly layer ``i``'s bytes; a
checkpoint stored as one chunk for all layers is read whole and sliced (DCP loads a shard whole).

Peak extra memory of a read is the result plus one stored chunk/shard.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from nemolite.errors import NemoliteError

__all__ = ["DistCheckpointReader", "open_dist_checkpoint", "is_dist_checkpoint"]

BACKENDS = ("torch_dist", "zarr")


def is_dist_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` is a distributed-checkpoint weights directory (holds metadata.json)."""
    return (Path(directory) / "metadata.json").is_file()


def open_dist_checkpoint(directory: str | Path) -> DistCheckpointReader:
    """A reader for a ``model_weights/``/``weights/`` directory, or a checkpoint directory holding one."""
    directory = Path(directory)
    if not is_dist_checkpoint(directory):
        for sub in ("model_weights", "weights"):
            if is_dist_checkpoint(directory / sub):
                directory = directory / sub
                break
        else:
            raise NemoliteError(f"{directory} is not a distributed checkpoint: it has no metadata.json "
                                "(expected a NeMo model_weights/ or weights/ directory)")
    try:
        metadata = json.loads((directory / "metadata.json").read_text())
        backend = metadata["sharded_backend"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise NemoliteError(f"{directory / 'metadata.json'} is unreadable or lacks 'sharded_backend': "
                            f"{error}") from error
    if backend == "torch_dist":
        return TorchDistReader(directory)
    if backend == "zarr":
        return ZarrReader(directory)
    raise NemoliteError(f"{directory}: unsupported sharded_backend {backend!r}; nemolite reads "
                        f"{' and '.join(BACKENDS)}")


class DistCheckpointReader:
    """Keys, shapes and dtypes of the stored tensors; reads one tensor (or one leading-dim slice) at a time.

    Non-tensor entries (``_extra_state`` objects, BytesIO) are not listed.
    """

    backend: str

    def __init__(self, directory: Path):
        self.directory = directory
        self._shapes: dict[str, torch.Size] = {}
        self._dtypes: dict[str, torch.dtype] = {}

    def keys(self) -> list[str]:
        return sorted(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, key: str) -> torch.Size:
        return self._shapes[self._check(key)]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[self._check(key)]

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor."""
        shape = self.shape(key)
        if not shape:
            return self._read_rows(key, 0, 1).reshape(())
        return self._read_rows(key, 0, shape[0])

    def read_slice(self, key: str, index: int) -> torch.Tensor:
        """``read(key)[index]`` (e.g. layer ``index`` of a stacked tensor), reading only what covers it."""
        shape = self.shape(key)
        if not shape:
            raise NemoliteError(f"{key} is a scalar; it has no leading dimension to slice")
        if not -shape[0] <= index < shape[0]:
            raise NemoliteError(f"index {index} is out of range for {key} with leading dimension {shape[0]}")
        index %= shape[0]
        return self._read_rows(key, index, index + 1)[0]

    def _check(self, key: str) -> str:
        if key not in self._shapes:
            raise NemoliteError(f"{self.directory}: no tensor {key!r} in this checkpoint")
        return key

    def _read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the leading dimension (a 0-d tensor is one row)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r}, {len(self)} tensors)"


# ---------------------------------------------------------------------------------------------------
# torch_dist (PyTorch DCP)

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    # Megatron-core caches its save plans in the index
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                             "BytesIOWriteData", "LoadPlan", "ReadItem", "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` index: DCP's metadata dataclasses, torch dtypes and plain data only."""

    def find_class(self, module: str, name: str):
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a DCP metadata index")


class TorchDistReader(DistCheckpointReader):
    backend = "torch_dist"

    def __init__(self, directory: Path):
        super().__init__(directory)
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        try:
            with open(directory / ".metadata", "rb") as file:
                self._metadata = _MetadataUnpickler(file).load()
        except FileNotFoundError as error:
            raise NemoliteError(f"{directory}: torch_dist checkpoint without its .metadata file") from error
        except Exception as error:  # truncated/corrupt pickle, or a global outside the allow-list
            raise NemoliteError(f"{directory / '.metadata'} is not a readable DCP index: {error}") from error
        self._storage = FileSystemReader(directory)
        self._storage.set_up_storage_reader(self._metadata, True)
        self._entries = {key: md for key, md in self._metadata.state_dict_metadata.items()
                         if isinstance(md, TensorStorageMetadata)}
        for key, md in self._entries.items():
            self._shapes[key] = torch.Size(md.size)
            self._dtypes[key] = md.properties.dtype

    def _read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        shape = self._shapes[key]
        rows = list(shape)
        if shape:
            rows[0] = stop - start
        out = torch.empty(rows, dtype=self._dtypes[key])
        wanted = ChunkStorageMetadata(offsets=torch.Size([start] + [0] * (len(shape) - 1))
                                      if shape else torch.Size([]), sizes=out.shape)
        items = create_read_items_for_chunk_list(key, self._entries[key], [wanted])
        covered = sum(math.prod(item.lengths) for item in items)
        if covered != out.numel():
            raise NemoliteError(f"{self.directory}: the shards of {key} cover {covered} of the "
                                f"{out.numel()} elements wanted (shape {tuple(shape)}); the checkpoint is "
                                "incomplete or its index is corrupt")
        try:
            self._storage.read_data(LoadPlan(items), _IntoTensor(out)).wait()
        except NemoliteError:
            raise
        except Exception as error:  # missing/truncated .distcp file, a shard of the wrong size
            files = sorted({self._metadata.storage_data[item.storage_index].relative_path for item in items})
            raise NemoliteError(f"{self.directory}: cannot read {key} from {', '.join(files)} "
                                f"(missing, truncated or corrupt): {error}") from error
        return out


class _IntoTensor:
    """The part of a DCP LoadPlanner that ``FileSystemReader.read_data`` uses: where each stored piece goes."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def resolve_tensor(self, item) -> torch.Tensor:
        region = self.out
        for dim, (offset, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            region = region.narrow(dim, offset, length)
        return region

    def commit_tensor(self, item, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, item, value: io.BytesIO) -> None:
        raise NemoliteError(f"unexpected non-tensor data for {item.dest_index.fqn}")


# ---------------------------------------------------------------------------------------------------
# zarr (v2 arrays, bf16 as "bfloat16")


class ZarrReader(DistCheckpointReader):
    backend = "zarr"

    def __init__(self, directory: Path):
        super().__init__(directory)
        self._arrays: dict[str, dict] = {}
        for root, dirs, files in os.walk(directory):
            if ".zarray" in files:
                dirs.clear()  # chunk folders (dimension_separator "/") hold no arrays
                key = Path(root).relative_to(directory).as_posix()
                self._add(key, Path(root))

    def _add(self, key: str, path: Path) -> None:
        try:
            meta = json.loads((path / ".zarray").read_text())
            shape, chunks = tuple(meta["shape"]), tuple(meta["chunks"])
            dtype_name = meta["dtype"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise NemoliteError(f"{path / '.zarray'} is unreadable: {error}") from error
        if meta.get("zarr_format", 2) != 2:
            raise NemoliteError(f"{path}: zarr format {meta.get('zarr_format')} arrays are not supported (v2 only)")
        if len(chunks) != len(shape) or any(c <= 0 for c in chunks) or any(s < 0 for s in shape):
            raise NemoliteError(f"{path / '.zarray'}: chunks {chunks} do not fit shape {shape}")
        if meta.get("order", "C") not in ("C", "F"):
            raise NemoliteError(f"{path / '.zarray'}: unknown order {meta.get('order')!r}")
        if dtype_name == "bfloat16":
            storage = np.dtype("<u2")
            dtype = torch.bfloat16
        else:
            try:
                storage = np.dtype(dtype_name)
                dtype = torch.from_numpy(np.empty(0, storage.newbyteorder("="))).dtype
            except (TypeError, ValueError) as error:
                raise NemoliteError(f"{path / '.zarray'}: unsupported dtype {dtype_name!r}") from error
        codecs = [meta.get("compressor")] + list(reversed(meta.get("filters") or []))
        meta.update(path=path, storage=storage, torch_dtype=dtype, codecs=[codec for codec in codecs if codec],
                    separator=meta.get("dimension_separator") or ".")
        self._arrays[key] = meta
        self._shapes[key] = torch.Size(shape)
        self._dtypes[key] = dtype

    def _read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        meta = self._arrays[key]
        shape, chunks = self._shapes[key], tuple(meta["chunks"])
        if not shape:  # a scalar is one chunk named "0"
            return self._chunk(meta, (), ()).reshape(1)
        out = torch.empty((stop - start, *shape[1:]), dtype=self._dtypes[key])
        grid = [range(start // chunks[0], -(-stop // chunks[0]))]
        grid += [range(-(-size // chunk)) for size, chunk in zip(shape[1:], chunks[1:])]
        for index in np.ndindex(*(len(axis) for axis in grid)):
            index = tuple(axis[i] for axis, i in zip(grid, index))
            lows = [i * c for i, c in zip(index, chunks)]
            piece = self._chunk(meta, index, chunks)
            src, dst = [], []
            for dim, (low, chunk, size) in enumerate(zip(lows, chunks, shape)):
                lo, hi = (max(low, start), min(low + chunk, stop)) if dim == 0 else (low, min(low + chunk, size))
                src.append(slice(lo - low, hi - low))
                dst.append(slice(lo - start, hi - start) if dim == 0 else slice(lo, hi))
            out[tuple(dst)] = piece[tuple(src)]
        return out

    def _chunk(self, meta: dict, index: tuple, chunks: tuple) -> torch.Tensor:
        """One stored chunk as a tensor of the full chunk shape (edge chunks are stored padded)."""
        name = meta["separator"].join(map(str, index)) if index else "0"
        path, dtype, storage = meta["path"] / name, meta["torch_dtype"], meta["storage"]
        nbytes = math.prod(chunks) * storage.itemsize
        try:
            with open(path, "rb") as file:
                if meta["codecs"]:
                    data = file.read()
                    for codec in meta["codecs"]:
                        data = _codec(codec, meta["path"]).decode(data)
                    raw = torch.frombuffer(bytearray(memoryview(data).cast("B")), dtype=torch.uint8)
                    size = raw.numel()
                else:  # straight into the tensor, no intermediate copy
                    size = os.fstat(file.fileno()).st_size
                    raw = torch.empty(nbytes, dtype=torch.uint8)
                    if size == nbytes and file.readinto(raw.numpy()) != nbytes:
                        size = -1  # shrank while reading
        except FileNotFoundError:
            fill = meta.get("fill_value")
            if fill is None:
                raise NemoliteError(f"{meta['path']}: chunk file {name!r} is missing (the array has no "
                                    "fill value); the checkpoint is incomplete") from None
            return torch.full(chunks, float(fill) if isinstance(fill, str) else fill, dtype=dtype)
        if size != nbytes:
            raise NemoliteError(f"{path}: chunk holds {size} bytes, expected {nbytes} for chunk shape "
                                f"{chunks} of {meta['dtype']}; the file is truncated or corrupt")
        if storage.byteorder == ">":
            tensor = torch.from_numpy(raw.numpy().view(storage).astype(storage.newbyteorder("=")))
        else:
            tensor = raw.view(dtype)
        if meta.get("order", "C") == "F":
            return tensor.view(chunks[::-1]).permute(*reversed(range(len(chunks))))
        return tensor.view(chunks)


def _codec(config: dict, path: Path):
    try:
        import numcodecs
    except ImportError:
        raise NemoliteError(f"{path}: chunks are compressed with {config.get('id')!r}; reading them needs the "
                            "numcodecs package (pip install numcodecs)") from None
    try:
        return numcodecs.get_codec(dict(config))
    except (ValueError, KeyError, TypeError) as error:
        raise NemoliteError(f"{path}: unsupported zarr codec {config!r}: {error}") from error
