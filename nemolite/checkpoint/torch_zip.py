"""Lazy reading of ``torch.save`` files (the zip format of torch >= 1.6), one tensor at a time.

The pickle is unpickled with a whitelist (like ``torch.load(weights_only=True)``), but each
tensor comes back as a ``LazyTensor`` that remembers where its bytes lie; ``read()`` copies
them straight from the file. Storages are stored uncompressed, so this works on a file inside
an uncompressed tar as well (a ``FileWindow``), and loading needs no more than one tensor of
extra memory. A storage's element count must match the bytes of its record, and each view must
lie inside its storage, before anything is allocated. Files in the pre-1.6 format fall back to
``torch.load(weights_only=True)`` (safe from torch 2.10, the floor), which holds the whole state
dict in memory.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from nemolite.errors import NemoliteError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class FileWindow(io.RawIOBase):
    """A read-only file object over bytes [start, start + size) of a file (a member of an uncompressed tar)."""

    def __init__(self, path: Path, start: int = 0, size: int | None = None):
        self.path, self.start = Path(path), start
        self.handle = open(path, "rb", buffering=0)
        self.size = self.handle.seek(0, io.SEEK_END) - start if size is None else size
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self.size - self.position))
        self.handle.seek(self.start + self.position)
        done = self.handle.readinto(view[:count]) or 0
        self.position += done
        return done

    def close(self) -> None:
        self.handle.close()
        super().close()


class LazyTensor:
    """A tensor in a checkpoint file: shape and dtype known, bytes read on ``read()``."""

    __slots__ = ("window", "name", "data_offset", "storage_numel", "dtype", "shape", "stride", "storage_offset")

    def __init__(self, window, name, data_offset, storage_numel, dtype, shape, stride, storage_offset):
        self.window, self.name, self.data_offset, self.storage_numel = window, name, data_offset, storage_numel
        self.dtype, self.shape, self.stride, self.storage_offset = dtype, tuple(shape), tuple(stride), storage_offset

    def read(self) -> torch.Tensor:
        size = self.storage_numel * torch.empty((), dtype=self.dtype).element_size()
        storage = torch.empty(self.storage_numel, dtype=self.dtype)
        self.window.seek(self.data_offset)
        if size and self.window.readinto(memoryview(storage.view(torch.uint8).numpy()).cast("B")) != size:
            raise NemoliteError(f"{self.window.path} is truncated at tensor {self.name}; the checkpoint is "
                                "incomplete, copy or download it again")
        tensor = storage.as_strided(self.shape, self.stride, self.storage_offset)
        return tensor if tensor.numel() == self.storage_numel else tensor.clone()


class _Storage:
    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Ignored:
    """Stand-in for objects nemolite never reads (Transformer Engine ``_extra_state`` BytesIO)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        pass


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return (storage, storage_offset, tuple(size), tuple(stride))


class _LazyUnpickler(pickle.Unpickler):
    _GLOBALS = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): lambda data, *unused: data,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_io", "BytesIO"): _Ignored,
        ("io", "BytesIO"): _Ignored,
        ("_codecs", "encode"): lambda *unused: b"",  # bytes inside protocol-2 pickles (BytesIO state)
        ("builtins", "set"): set,
        ("torch", "Size"): tuple,
    }

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and name == "UntypedStorage":
            return torch.uint8
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only tensors are read)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:200]}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"invalid storage record {str(pid)[:200]}")
        return _Storage(str(key), dtype, numel)


def read_torch_checkpoint(window: FileWindow) -> dict[str, object]:
    """The state dict of a ``torch.save`` file: tensors as LazyTensor, other leaves as loaded."""
    state, resolve = _open_zip(window)
    if state is None:
        return _read_legacy_format(window)
    if not isinstance(state, dict):
        raise NemoliteError(f"{window.path} holds a {type(state).__name__}, not a state dict")
    return {key: resolve(str(key), value) for key, value in state.items()}


def read_torch_tensor(window: FileWindow, name: str) -> LazyTensor:
    """The one tensor of a ``torch.save(tensor)`` file (a DCP shard)."""
    state, resolve = _open_zip(window)
    tensor = resolve(name, state) if state is not None else None
    if not isinstance(tensor, LazyTensor):
        raise NemoliteError(f"{window.path}: the bytes of {name} are not a torch.save'd tensor")
    return tensor


def _open_zip(window: FileWindow):
    """(unpickled object, resolve(name, value)), or (None, None) when the file is not a zip."""
    try:
        archive = zipfile.ZipFile(window)
    except zipfile.BadZipFile:
        return None, None
    except (OSError, ValueError, EOFError, struct.error) as error:
        raise NemoliteError(f"{window.path} is not a readable torch checkpoint ({error}); it may be truncated "
                            "or corrupt, copy or download it again") from None
    try:
        names = archive.namelist()
        pickle_name = next((name for name in names if name.endswith("/data.pkl") or name == "data.pkl"), None)
        if pickle_name is None:
            raise NemoliteError(f"{window.path} is a zip file but not a torch checkpoint (no data.pkl)")
        prefix = pickle_name[: -len("data.pkl")]
        infos = {info.filename: info for info in archive.infolist()}
        _check_entry(window, infos[pickle_name])
        state = _LazyUnpickler(io.BytesIO(archive.read(pickle_name))).load()
    except NemoliteError:
        raise
    except Exception as error:  # BadZipFile, EOFError, UnpicklingError, struct.error, TypeError from a crafted pickle...
        raise NemoliteError(f"{window.path} is not a readable torch checkpoint ({type(error).__name__}: {error}); "
                            "it may be truncated, corrupt or not a plain state dict") from None

    def resolve(name: str, value):
        if not (isinstance(value, tuple) and len(value) == 4 and isinstance(value[0], _Storage)):
            return value
        storage, storage_offset, shape, stride = value
        info = infos.get(f"{prefix}data/{storage.key}")
        if info is None:
            raise NemoliteError(f"{window.path} lacks the data of tensor {name}; the checkpoint is incomplete")
        if info.compress_type != zipfile.ZIP_STORED:
            raise NemoliteError(f"{window.path} stores tensor {name} compressed; re-save it with torch.save")
        itemsize = torch.empty((), dtype=storage.dtype).element_size()
        if storage.numel * itemsize != info.file_size:  # checked before anything of that size is allocated
            raise NemoliteError(f"{window.path}: tensor {name} claims a storage of {storage.numel} elements "
                                f"({storage.numel * itemsize} bytes) but its record holds {info.file_size} bytes; "
                                "the checkpoint is corrupt or crafted")
        _check_view(window, name, storage, storage_offset, shape, stride)
        offset = _data_offset(window, info)
        if offset + info.file_size > window.size:
            raise NemoliteError(f"{window.path} is truncated at tensor {name}; copy or download it again")
        return LazyTensor(window, name, offset, storage.numel, storage.dtype, shape, stride, storage_offset)

    return state, resolve


def _check_entry(window: FileWindow, info: zipfile.ZipInfo) -> None:
    """A zip entry must fit in the file, and a deflated one may not claim more than deflate can expand to."""
    expansion = 1 if info.compress_type == zipfile.ZIP_STORED else 1032
    if info.file_size > info.compress_size * expansion or info.compress_size > window.size:
        raise NemoliteError(f"{window.path}: zip entry {info.filename} claims {info.file_size} bytes from "
                            f"{info.compress_size} stored in a {window.size}-byte file; it is corrupt or crafted")


def _check_view(window: FileWindow, name: str, storage: _Storage, offset, shape, stride) -> None:
    """The view (offset, shape, stride) must lie inside its storage, or ``as_strided`` would read past it."""
    numbers = [offset, *shape, *stride]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers) or len(shape) != len(stride):
        raise NemoliteError(f"{window.path}: tensor {name} has an invalid view (offset {offset!r}, shape "
                            f"{shape!r}, stride {stride!r}); the checkpoint is corrupt or crafted")
    last = offset + sum((size - 1) * step for size, step in zip(shape, stride))
    if all(shape) and last >= storage.numel:
        raise NemoliteError(f"{window.path}: tensor {name} of shape {list(shape)} reaches element {last} of a "
                            f"{storage.numel}-element storage; the checkpoint is corrupt or crafted")


def _data_offset(window: FileWindow, info: zipfile.ZipInfo) -> int:
    window.seek(info.header_offset)
    header = window.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise NemoliteError(f"{window.path} is corrupt (bad zip entry {info.filename}); copy or download it again")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


class _LoadedTensor:
    __slots__ = ("tensor", "shape", "dtype")

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.shape, self.dtype = tensor, tuple(tensor.shape), tensor.dtype

    def read(self) -> torch.Tensor:
        return self.tensor


def _read_legacy_format(window: FileWindow) -> dict[str, object]:
    window.seek(0)
    try:
        state = torch.load(window, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        raise NemoliteError(f"{window.path} is not a readable torch checkpoint ({error}); it may be truncated "
                            "or corrupt, copy or download it again") from None
    return {key: _LoadedTensor(value) if isinstance(value, torch.Tensor) else value for key, value in state.items()}
