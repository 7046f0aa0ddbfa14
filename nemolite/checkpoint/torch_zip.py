"""Lazy reading of ``torch.save`` files (the zip format of torch >= 1.6), one tensor at a time.

The pickle is unpickled with a whitelist (like ``torch.load(weights_only=True)``), but each
tensor comes back as a ``LazyTensor`` that remembers where its bytes lie; ``read()`` copies
them straight from the file. Storages are stored uncompressed, so this works on a file inside
an uncompressed tar as well (a ``FileWindow``), and loading needs no more than one tensor of
extra memory. Files in the pre-1.6 format fall back to ``torch.load(weights_only=True)``,
which holds the whole state dict in memory.
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
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        return _Storage(str(key), dtype, int(numel))


def read_torch_checkpoint(window: FileWindow) -> dict[str, object]:
    """The state dict of a ``torch.save`` file: tensors as LazyTensor, other leaves as loaded."""
    try:
        archive = zipfile.ZipFile(window)
    except zipfile.BadZipFile:
        return _read_legacy_format(window)
    try:
        names = archive.namelist()
        pickle_name = next((name for name in names if name.endswith("/data.pkl") or name == "data.pkl"), None)
        if pickle_name is None:
            raise NemoliteError(f"{window.path} is a zip file but not a torch checkpoint (no data.pkl)")
        prefix = pickle_name[: -len("data.pkl")]
        state = _LazyUnpickler(io.BytesIO(archive.read(pickle_name))).load()
        infos = {info.filename: info for info in archive.infolist()}
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError, struct.error, OSError) as error:
        raise NemoliteError(f"{window.path} is not a readable torch checkpoint ({error}); it may be truncated "
                            "or corrupt, copy or download it again") from None
    if not isinstance(state, dict):
        raise NemoliteError(f"{window.path} holds a {type(state).__name__}, not a state dict")

    def resolve(name: str, value):
        if not (isinstance(value, tuple) and len(value) == 4 and isinstance(value[0], _Storage)):
            return value
        storage, storage_offset, shape, stride = value
        info = infos.get(f"{prefix}data/{storage.key}")
        if info is None:
            raise NemoliteError(f"{window.path} lacks the data of tensor {name}; the checkpoint is incomplete")
        if info.compress_type != zipfile.ZIP_STORED:
            raise NemoliteError(f"{window.path} stores tensor {name} compressed; re-save it with torch.save")
        return LazyTensor(window, name, _data_offset(window, info), storage.numel, storage.dtype,
                          shape, stride, storage_offset)

    return {key: resolve(key, value) for key, value in state.items()}


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
