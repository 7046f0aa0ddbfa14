"""``torch_dist`` distributed checkpoints (PyTorch DCP, as megatron-core saves them), read without torch.distributed.

``.metadata`` is a pickle of DCP's ``Metadata`` (torch/distributed/checkpoint/metadata.py). What
megatron-core adds to it (megatron/core/dist_checkpointing/strategies/torch.py and state_dict_saver.py):

- 0.12 - 0.14: ``Metadata`` with two extra attributes, ``mcore_data`` (per-tensor dicts of plain data)
  and ``all_local_plans``, a list of ``MCoreSavePlan`` (a DCP ``SavePlan`` subclass with ``mcore_data``);
- 0.15: the index itself is an ``MCoreMetadata`` (a ``Metadata`` subclass with ``mcore_data``), its
  ``all_local_plans`` again ``MCoreSavePlan``s;
- 0.16: plain ``Metadata`` whose ``all_local_plans`` are DCP ``SavePlan``s.

Every class in the pickle is rebuilt as an inert ``Record`` (its name, arguments and state) by the
unpickler itself, from an allow-list; no class of torch or megatron is imported or called.

Each tensor is stored as chunks, each a ``torch.save`` of the chunk at (file, offset, length) in a
``__<rank>_<n>.distcp`` file, read with nemolite's own zip reader (never ``torch.load``). Before any
read the index is checked against the files: every piece lies inside its file (a plain name in the
directory), is at least as long as its chunk's bytes, and no two pieces share bytes; so a read never
allocates more than the files hold.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
from pathlib import Path

import torch

from nemolite.checkpoint.dist_checkpoint import DistCheckpointReader
from nemolite.checkpoint.torch_zip import FileWindow, read_torch_tensor
from nemolite.errors import NemoliteError


class Record:
    """An object of an allow-listed class from a pickle, kept as data: the arguments it was built with and
    the state it was given. Nothing of the real class runs."""

    __slots__ = ("args", "state")

    def __new__(cls, *args, **kwargs):
        record = object.__new__(cls)
        record.args, record.state = args, {}
        return record

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        if (isinstance(state, tuple) and len(state) == 2 and all(isinstance(part, (dict, type(None)))
                                                                  for part in state)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (__dict__, slots) of a class with __slots__
        self.state = state  # a dict, or what a custom __getstate__ returned (TensorProperties: a tuple)

    def get(self, name: str, default=None):
        return self.state.get(name, default) if isinstance(self.state, dict) else default

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.args or ''}{self.state or ''}"


_DCP = "torch.distributed.checkpoint."
_RECORDS = {
    _DCP + "metadata": ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"),
    _DCP + "filesystem": ("_StorageInfo",),
    _DCP + "planner": ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData"),
    "megatron.core.dist_checkpointing.strategies.torch": ("MCoreSavePlan", "MCoreMetadata"),
    "torch.serialization": ("_get_layout",),
    "pathlib": ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"),
}
RECORD_CLASSES = {(module, name): type(name, (Record,), {"__slots__": ()})
                  for module, names in _RECORDS.items() for name in names}
_PLAIN = {("torch", "Size"): tuple, ("collections", "OrderedDict"): collections.OrderedDict,
          ("builtins", "set"): set, ("builtins", "frozenset"): frozenset}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in RECORD_CLASSES:
            return RECORD_CLASSES[(module, name)]
        if (module, name) in _PLAIN:
            return _PLAIN[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a DCP metadata index")


def load_index(path: Path) -> Record:
    """The unpickled ``.metadata`` of a DCP checkpoint (a Metadata or MCoreMetadata record)."""
    try:
        data = path.read_bytes()  # the pickle reads from memory: no read it asks for can exceed the file
    except FileNotFoundError:
        raise NemoliteError(f"{path.parent}: torch_dist checkpoint without its .metadata file") from None
    except OSError as error:
        raise NemoliteError(f"{path} is unreadable: {error}") from None
    try:
        index = _IndexUnpickler(io.BytesIO(data)).load()
    except Exception as error:  # truncated/corrupt pickle, a global outside the allow-list, a huge length
        raise NemoliteError(f"{path} is not a readable DCP index: {type(error).__name__}: {error}") from None
    if type(index).__name__ not in ("Metadata", "MCoreMetadata") or not isinstance(index, Record):
        raise NemoliteError(f"{path} is not a DCP index: it holds a {type(index).__name__}")
    return index


class _Piece:
    __slots__ = ("file", "offset", "length")

    def __init__(self, file: str, offset: int, length: int):
        self.file, self.offset, self.length = file, offset, length


class _Chunk:
    __slots__ = ("offsets", "sizes", "piece")

    def __init__(self, offsets: tuple, sizes: tuple, piece: _Piece):
        self.offsets, self.sizes, self.piece = offsets, sizes, piece


def _field(record, name: str):
    return record.get(name) if isinstance(record, Record) else None


def _dtype(properties):
    """TensorProperties pickles as the tuple (dtype, layout, requires_grad, memory format, pin_memory)."""
    state = properties.state if isinstance(properties, Record) else None
    return state[0] if isinstance(state, tuple) and state else _field(properties, "dtype")


def _is_shape(value, ndim: int | None = None) -> bool:
    return (isinstance(value, tuple) and (ndim is None or len(value) == ndim)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value))


class TorchDistReader(DistCheckpointReader):
    backend = "torch_dist"

    def __init__(self, directory: Path):
        super().__init__(directory)
        index = load_index(directory / ".metadata")
        self._where = directory / ".metadata"
        tensors, storage = index.get("state_dict_metadata"), index.get("storage_data")
        if not isinstance(tensors, dict) or not isinstance(storage, dict):
            raise self._corrupt("it lacks state_dict_metadata or storage_data")
        pieces = {}
        for where, info in storage.items():
            fqn, offset = _field(where, "fqn"), _field(where, "offset")
            if not isinstance(fqn, str) or offset is not None and not _is_shape(offset):  # None: a bytes item
                raise self._corrupt(f"storage entry {where!r} names no tensor and offset")
            pieces[(fqn, offset)] = self._piece(fqn, info)
        self._chunks: dict[str, list[_Chunk]] = {}
        for key, entry in tensors.items():
            if type(entry).__name__ == "BytesStorageMetadata":
                continue  # _extra_state objects and the like, never weights
            self._add(key, entry, pieces)
        self._check_disjoint(pieces.values())

    def _corrupt(self, what: str) -> NemoliteError:
        return NemoliteError(f"{self._where} is corrupt or crafted: {what}")

    def _piece(self, fqn, info) -> _Piece:
        if type(info).__name__ != "_StorageInfo":
            raise self._corrupt(f"storage entry {fqn!r} is a {type(info).__name__}")
        name, offset, length = (_field(info, field) for field in ("relative_path", "offset", "length"))
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise self._corrupt(f"{fqn} is stored in {name!r}, not a file of this directory")
        if not _is_shape((offset, length)):
            raise self._corrupt(f"{fqn} has storage offset {offset!r} and length {length!r}")
        if info.get("transform_descriptors"):
            raise NemoliteError(f"{self.directory}: {fqn} is stored with transforms "
                                f"{info.get('transform_descriptors')!r}; nemolite reads untransformed DCP files")
        return _Piece(name, offset, length)

    def _add(self, key, entry, pieces: dict) -> None:
        tensor = entry if type(entry).__name__ == "TensorStorageMetadata" else None
        dtype, size = _dtype(_field(tensor, "properties")), _field(tensor, "size")
        if not isinstance(key, str) or not isinstance(dtype, torch.dtype) or not _is_shape(size):
            raise self._corrupt(f"entry {key!r} is not a tensor with a dtype and a shape")
        itemsize = torch.empty((), dtype=dtype).element_size()
        chunks = []
        if not isinstance(_field(tensor, "chunks"), list):
            raise self._corrupt(f"entry {key!r} has no list of chunks")
        for chunk in _field(tensor, "chunks"):
            offsets, sizes = _field(chunk, "offsets"), _field(chunk, "sizes")
            if not (_is_shape(offsets, len(size)) and _is_shape(sizes, len(size))
                    and all(o + s <= n for o, s, n in zip(offsets, sizes, size))):
                raise self._corrupt(f"a chunk of {key} (offsets {offsets!r}, sizes {sizes!r}) does not lie "
                                    f"inside its shape {list(size)}")
            piece = pieces.get((key, offsets))
            if piece is None:
                raise self._corrupt(f"the chunk of {key} at {list(offsets)} has no storage entry")
            if piece.length < math.prod(sizes) * itemsize:  # a torch.save of a chunk holds at least its bytes
                raise self._corrupt(f"the chunk of {key} at {list(offsets)} claims {math.prod(sizes)} elements, "
                                    f"more than its {piece.length} stored bytes can hold")
            chunks.append(_Chunk(offsets, sizes, piece))
        self._chunks[key] = chunks
        self._shapes[key] = torch.Size(size)
        self._dtypes[key] = dtype

    def _check_disjoint(self, pieces) -> None:
        """Each piece inside its file, no two sharing bytes: together they never claim more than is on disk."""
        by_file = collections.defaultdict(list)
        for piece in pieces:
            by_file[piece.file].append(piece)
        root = self.directory.resolve()
        for name, group in by_file.items():
            path = self.directory / name
            try:
                if path.resolve().parent != root:
                    raise self._corrupt(f"{name} resolves outside {self.directory}")
                file_size = path.stat().st_size
            except OSError as error:
                raise NemoliteError(f"{self.directory}: data file {name} named by .metadata is missing or "
                                    f"unreadable ({error}); the checkpoint is incomplete") from None
            end = 0
            for piece in sorted(group, key=lambda piece: piece.offset):
                if piece.offset < end or piece.offset + piece.length > file_size:
                    raise self._corrupt(f"a piece of {name} at bytes {piece.offset}-{piece.offset + piece.length} "
                                        f"overlaps another or ends past the file's {file_size} bytes")
                end = piece.offset + piece.length

    def _read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        shape, dtype = self._shapes[key], self._dtypes[key]
        rows = [stop - start, *shape[1:]] if shape else []
        wanted, covered = [], 0
        for chunk in self._chunks[key]:
            low = chunk.offsets[0] if shape else 0
            high = low + chunk.sizes[0] if shape else 1
            overlap = min(stop, high) - max(start, low)
            if overlap > 0:
                wanted.append(chunk)
                covered += overlap * math.prod(chunk.sizes[1:])
        if covered != math.prod(rows):
            raise NemoliteError(f"{self.directory}: the shards of {key} cover {covered} of the {math.prod(rows)} "
                                f"elements wanted (shape {tuple(shape)}); the checkpoint is incomplete or its index "
                                "is corrupt")
        out = torch.empty(rows, dtype=dtype)
        for chunk in wanted:
            data = self._read_chunk(key, chunk)
            if not shape:
                out.copy_(data.reshape(()))
                continue
            first, last = max(start, chunk.offsets[0]), min(stop, chunk.offsets[0] + chunk.sizes[0])
            region = out.narrow(0, first - start, last - first)
            for dim in range(1, len(shape)):
                region = region.narrow(dim, chunk.offsets[dim], chunk.sizes[dim])
            region.copy_(data.narrow(0, first - chunk.offsets[0], last - first))
        return out

    def _read_chunk(self, key: str, chunk: _Chunk) -> torch.Tensor:
        piece = chunk.piece
        try:
            with FileWindow(self.directory / piece.file, piece.offset, piece.length) as window:
                lazy = read_torch_tensor(window, key)
                if lazy.shape != chunk.sizes or lazy.dtype != self._dtypes[key]:
                    raise NemoliteError(f"the piece holds a {lazy.dtype} tensor of shape {list(lazy.shape)}, the "
                                        f"index says {self._dtypes[key]} {list(chunk.sizes)}")
                return lazy.read()
        except (NemoliteError, OSError) as error:
            raise NemoliteError(f"{self.directory}: cannot read {key} from {piece.file} (missing, truncated or "
                                f"corrupt): {error}") from None
