"""``zarr`` distributed checkpoints: zarr v2 arrays parsed by hand, one chunk at a time.

Megatron's zarr strategy (megatron/core/dist_checkpointing/strategies/zarr.py) writes one array
directory per key (``.zarray`` + chunk files ``0.0.0`` ...), uncompressed (``compressor=None``), every
chunk written (``fill_value=None``, ``write_empty_chunks=True``), bf16 with the dtype string
``"bfloat16"``, which zarr itself cannot parse. Other zarr writers may compress chunks; only the
compressors zarr and numcodecs write for numeric data are read (``ALLOWED_CODECS``), no filters.

Nothing is allocated before the chunks a read covers are checked against their files: an
uncompressed chunk must hold exactly its bytes; a compressed one must declare exactly its size
(blosc, lz4, zstd headers) and be large enough for its codec to expand to it, and decoding stops at
the chunk's size. A read of absent chunks (the fill value) may not exceed this machine's memory.
"""

from __future__ import annotations

import bz2
import json
import lzma
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from nemolite.checkpoint.dist_checkpoint import DistCheckpointReader
from nemolite.errors import NemoliteError

# The most times its stored size a chunk can decode to with each codec: deflate's 1032; lz4's about
# 255 (one byte per 255 of match length); zstd's 32768 (a 4-byte RLE block per 128 KiB); blosc's that
# of its inner codec (at most zstd's); lzma's about 7000 and bzip2's about 46 million, with margin.
MAX_EXPANSION = {"blosc": 32768, "zstd": 32768, "lz4": 256, "zlib": 1032, "gzip": 1032, "bz2": 1 << 26,
                 "lzma": 1 << 14}
ALLOWED_CODECS = tuple(MAX_EXPANSION)


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
        where = path / ".zarray"
        try:
            meta = json.loads(where.read_text())
            shape, chunks = tuple(meta["shape"]), tuple(meta["chunks"])
            dtype_name = meta["dtype"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
            raise NemoliteError(f"{where} is unreadable: {type(error).__name__}: {error}") from None
        if meta.get("zarr_format", 2) != 2:
            raise NemoliteError(f"{path}: zarr format {meta.get('zarr_format')} arrays are not supported (v2 only)")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in shape + chunks):
            raise NemoliteError(f"{where}: shape {list(shape)} and chunks {list(chunks)} must be integers")
        if len(chunks) != len(shape) or any(c <= 0 for c in chunks) or any(s < 0 for s in shape):
            raise NemoliteError(f"{where}: chunks {chunks} do not fit shape {shape}")
        if meta.get("order", "C") not in ("C", "F"):
            raise NemoliteError(f"{where}: unknown order {meta.get('order')!r}")
        if dtype_name == "bfloat16":
            storage = np.dtype("<u2")
            dtype = torch.bfloat16
        else:
            try:
                storage = np.dtype(dtype_name)
                dtype = torch.from_numpy(np.empty(0, storage.newbyteorder("="))).dtype
            except (TypeError, ValueError):
                raise NemoliteError(f"{where}: unsupported dtype {dtype_name!r}") from None
        if meta.get("filters"):
            raise NemoliteError(f"{where}: zarr filters {meta['filters']!r} are not supported (Megatron writes "
                                "none); only the compressors " + ", ".join(ALLOWED_CODECS) + " are read")
        codec = meta.get("compressor")
        if codec is not None:
            check_codec(codec, where)
        separator = meta.get("dimension_separator") or "."
        if separator not in (".", "/"):
            raise NemoliteError(f"{where}: unknown dimension_separator {separator!r}")
        meta.update(path=path, storage=storage, torch_dtype=dtype, codec=codec, separator=separator)
        self._arrays[key] = meta
        self._shapes[key] = torch.Size(shape)
        self._dtypes[key] = dtype

    def _read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        meta = self._arrays[key]
        shape, chunks = self._shapes[key], tuple(meta["chunks"])
        if not shape:  # a scalar is one chunk named "0"
            return self._chunk(meta, (), (), self._stored(meta, ()), torch.empty(meta["storage"].itemsize,
                                                                                 dtype=torch.uint8)).reshape(1)
        grid = [range(start // chunks[0], -(-stop // chunks[0]))]
        grid += [range(-(-size // chunk)) for size, chunk in zip(shape[1:], chunks[1:])]
        rows = (stop - start, *shape[1:])
        if meta.get("fill_value") is not None:  # absent chunks are the fill value: no file backs them
            _check_memory(math.prod(rows) * meta["storage"].itemsize, f"{meta['path']} (rows {start}:{stop})")
        indices = [tuple(axis[i] for axis, i in zip(grid, index))
                   for index in np.ndindex(*(len(axis) for axis in grid))]
        stored = []
        for index in indices:  # every file checked before anything is allocated
            stored.append(self._stored(meta, index))
        out = torch.empty(rows, dtype=self._dtypes[key])
        buffer = torch.empty(math.prod(chunks) * meta["storage"].itemsize, dtype=torch.uint8)  # reused per chunk
        for index, size in zip(indices, stored):
            lows = [i * c for i, c in zip(index, chunks)]
            src, dst = [], []
            for dim, (low, chunk, extent) in enumerate(zip(lows, chunks, shape)):
                lo, hi = (max(low, start), min(low + chunk, stop)) if dim == 0 else (low, min(low + chunk, extent))
                src.append(slice(lo - low, hi - low))
                dst.append(slice(lo - start, hi - start) if dim == 0 else slice(lo, hi))
            if size is None:
                out[tuple(dst)] = _fill(meta)
            else:
                out[tuple(dst)] = self._chunk(meta, index, chunks, size, buffer)[tuple(src)]
        return out

    def _name(self, meta: dict, index: tuple) -> str:
        return meta["separator"].join(map(str, index)) if index else "0"

    def _stored(self, meta: dict, index: tuple) -> int | None:
        """The size of a chunk's file, checked against what the chunk holds; None for an absent chunk."""
        name, codec = self._name(meta, index), meta["codec"]
        nbytes = math.prod(meta["chunks"]) * meta["storage"].itemsize
        try:
            size = os.stat(meta["path"] / name).st_size
        except FileNotFoundError:
            if meta.get("fill_value") is None:
                raise NemoliteError(f"{meta['path']}: chunk file {name!r} is missing (the array has no fill value); "
                                    "the checkpoint is incomplete") from None
            return None
        if codec is None and size != nbytes:
            raise NemoliteError(f"{meta['path'] / name}: chunk holds {size} bytes, expected {nbytes} for chunk shape "
                                f"{tuple(meta['chunks'])} of {meta['dtype']}; the file is truncated or corrupt")
        if codec is not None and size * MAX_EXPANSION[codec["id"]] < nbytes:
            raise NemoliteError(f"{meta['path'] / name}: {size} bytes of {codec['id']} cannot decode to the {nbytes} "
                                f"bytes of chunk shape {tuple(meta['chunks'])}; the array's shape is corrupt or crafted")
        return size

    def _chunk(self, meta: dict, index: tuple, chunks: tuple, size: int, raw: torch.Tensor) -> torch.Tensor:
        """One stored chunk, read into ``raw`` (its bytes), as a tensor of the full chunk shape (edge chunks
        are stored padded)."""
        path, dtype, storage = meta["path"] / self._name(meta, index), meta["torch_dtype"], meta["storage"]
        nbytes = raw.numel()
        with open(path, "rb") as file:
            if meta["codec"] is not None:
                decode(meta["codec"], file.read(size), raw.numpy(), path)
            elif file.readinto(raw.numpy()) != nbytes:
                raise NemoliteError(f"{path}: chunk shrank while being read; the file is truncated")
        if storage.byteorder == ">":
            tensor = torch.from_numpy(raw.numpy().view(storage).astype(storage.newbyteorder("=")))
        else:
            tensor = raw.view(dtype)
        if meta.get("order", "C") == "F":
            return tensor.view(chunks[::-1]).permute(*reversed(range(len(chunks))))
        return tensor.view(chunks)


def _fill(meta: dict):
    fill = meta["fill_value"]
    if isinstance(fill, str):  # "NaN", "Infinity", "-Infinity"
        return float(fill)
    if not isinstance(fill, (int, float)):
        raise NemoliteError(f"{meta['path'] / '.zarray'}: fill_value {fill!r} is not a number")
    return fill


def _check_memory(nbytes: int, what: str) -> None:
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > memory:
        raise NemoliteError(f"{what} needs {nbytes / 2**30:.1f} GiB, more than this machine's "
                            f"{memory / 2**30:.1f} GiB of memory; the array's shape is corrupt or crafted")


def check_codec(codec, where: Path) -> None:
    if not isinstance(codec, dict) or codec.get("id") not in ALLOWED_CODECS:
        name = codec.get("id") if isinstance(codec, dict) else codec
        raise NemoliteError(f"{where}: zarr compressor {name!r} is not allowed; nemolite reads only "
                            f"{', '.join(ALLOWED_CODECS)} (and uncompressed chunks, which Megatron writes)")
    if codec["id"] == "lzma" and codec.get("format", lzma.FORMAT_XZ) == lzma.FORMAT_RAW:
        raise NemoliteError(f"{where}: raw lzma streams (format 3, custom filter chains) are not supported")


def decode(codec: dict, data: bytes, out: np.ndarray, path: Path) -> None:
    """Decompress ``data`` into ``out`` (the chunk's bytes), never producing more than ``out`` holds."""
    name, nbytes = codec["id"], out.nbytes
    try:
        if name in ("zlib", "gzip", "bz2", "lzma"):
            if name == "bz2":
                stream = bz2.BZ2Decompressor()
            elif name == "lzma":
                stream = lzma.LZMADecompressor(memlimit=1 << 30)
            else:
                stream = zlib.decompressobj(31 if name == "gzip" else 15)
            result = stream.decompress(data, nbytes + 1)  # at most one byte past the chunk: enough to tell
            if len(result) != nbytes or not stream.eof:
                raise ValueError(f"decodes to {'more' if len(result) > nbytes else 'fewer'} bytes than the "
                                 f"{nbytes} of its chunk shape")
            out[:] = np.frombuffer(result, dtype=np.uint8)
            return
        try:
            import numcodecs
        except ImportError:
            raise NemoliteError(f"{path}: chunks are compressed with {name!r}; reading them needs the numcodecs "
                                "package (pip install numcodecs)") from None
        if _declared_size(name, data) != nbytes:  # numcodecs would accept fewer bytes, silently
            raise ValueError(f"declares {_declared_size(name, data)} decoded bytes, its chunk shape {nbytes}")
        numcodecs.get_codec(dict(codec)).decode(data, out=out)
    except NemoliteError:
        raise
    except Exception as error:  # zlib.error, OSError, LZMAError, numcodecs' RuntimeError...
        raise NemoliteError(f"{path}: {name} chunk is corrupt or crafted: {error}") from None


def _declared_size(name: str, data: bytes) -> int | None:
    """The decoded size a blosc, lz4 (numcodecs' framing) or zstd chunk declares in its header."""
    if name == "blosc":
        return struct.unpack_from("<I", data, 4)[0] if len(data) >= 16 else None
    if name == "lz4":
        return struct.unpack_from("<I", data, 0)[0] if len(data) >= 4 else None
    # zstd frame header: magic, descriptor, [window], [dictionary id], [content size]
    if len(data) < 6 or data[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = data[4]
    single_segment, size_flag = descriptor >> 5 & 1, descriptor >> 6
    at = 5 + (not single_segment) + (0, 1, 2, 4)[descriptor & 3]
    width = (single_segment, 2, 4, 8)[size_flag]
    if width == 0 or len(data) < at + width:
        return None  # no content size: numcodecs' own writer always records it
    return int.from_bytes(data[at:at + width], "little") + (256 if width == 2 else 0)
