"""Hugging Face checkpoints: safetensors files read straight into the model's parameters.

The model is built on the meta device, materialised once in the target dtype, and each
tensor is read from the file into its parameter (``readinto``), so loading needs the
weights plus at most one tensor of extra memory, whatever the number of shards.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from nemolite.checkpoint.host_memory import move_to_huge_pages
from nemolite.config import ModelConfig, load_config
from nemolite.errors import NemoliteError
from nemolite.model import CausalLM
from nemolite.parallel.tensor import shard_slice

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsEntry:
    __slots__ = ("file", "name", "dtype", "shape", "offset", "num_bytes")

    def __init__(self, file: Path, name: str, dtype: torch.dtype, shape: tuple[int, ...], offset: int, num_bytes: int):
        self.file, self.name, self.dtype, self.shape = file, name, dtype, shape
        self.offset, self.num_bytes = offset, num_bytes


def read_safetensors_header(file: Path) -> dict[str, SafetensorsEntry]:
    """Parse the 8-byte length + JSON header of a .safetensors file (no tensor data is read); every entry's
    shape must match its byte range, inside the file."""
    try:
        with open(file, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            (header_size,) = struct.unpack("<Q", handle.read(8))
            if header_size > min(100_000_000, file_size - 8):
                raise ValueError(f"a header of {header_size} bytes in a {file_size}-byte file")
            header = json.loads(handle.read(header_size))
        if not isinstance(header, dict):
            raise ValueError(f"the header is a {type(header).__name__}, not a JSON object")
    except (OSError, ValueError, struct.error, RecursionError) as error:
        raise NemoliteError(f"{file} is not a readable safetensors file ({error}); re-download it") from None
    data_start = 8 + header_size
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if dtype not in SAFETENSORS_DTYPES:
            raise NemoliteError(f"tensor {name} in {file} has unsupported dtype {dtype}")
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if not (_naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1] and _naturals(shape)):
            raise NemoliteError(f"{file}: tensor {name} has invalid data_offsets {offsets!r} or shape {shape!r}; "
                                "the file is corrupt or crafted")
        begin, end = offsets
        nbytes = math.prod(shape) * torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
        if end - begin != nbytes:  # checked here, before any buffer of that shape is allocated
            raise NemoliteError(f"{file}: tensor {name} of shape {shape} needs {nbytes} bytes but its data_offsets "
                                f"span {end - begin}; the file is corrupt or crafted")
        if data_start + end > file_size:
            raise NemoliteError(f"{file} is truncated: tensor {name} ends past the end of the file; re-download it")
        entries[name] = SafetensorsEntry(file, name, SAFETENSORS_DTYPES[dtype], tuple(shape),
                                         data_start + begin, end - begin)
    return entries


def _naturals(value) -> bool:
    return isinstance(value, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)


def checkpoint_entries(path: Path) -> dict[str, SafetensorsEntry]:
    """Every tensor of a single-file or sharded safetensors checkpoint directory."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
            raise NemoliteError(f"{index} is not a readable index ({type(error).__name__}: {error})") from None
        for shard in shards:  # names inside the checkpoint only (HF caches symlink them: links are fine)
            if not isinstance(shard, str) or Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise NemoliteError(f"{INDEX_FILE} names the shard {shard!r}, which is not a file of {path}")
        files = sorted(path / shard for shard in shards)
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise NemoliteError(f"no *.safetensors weights in {path}; convert PyTorch .bin checkpoints to safetensors")
    entries: dict[str, SafetensorsEntry] = {}
    for file in files:
        if not file.is_file():
            raise NemoliteError(f"{INDEX_FILE} names {file.name}, which is missing from {path}")
        entries.update(read_safetensors_header(file))
    return entries


def read_into(entry: SafetensorsEntry, target: torch.Tensor, handle) -> None:
    """Fill ``target`` (any dtype, any device) with the tensor's bytes, converting dtype if needed."""
    direct = target.device.type == "cpu" and target.dtype == entry.dtype and target.is_contiguous()
    buffer = target if direct else torch.empty(entry.shape, dtype=entry.dtype)
    handle.seek(entry.offset)
    if entry.num_bytes and handle.readinto(memoryview(buffer.view(torch.uint8).numpy()).cast("B")) != entry.num_bytes:
        raise NemoliteError(f"{entry.file} is truncated at tensor {entry.name}; re-download it")
    if not direct:
        target.copy_(buffer)


def read_rows(entry: SafetensorsEntry, start: int, target: torch.Tensor, handle) -> None:
    """Fill ``target`` with rows [start, start + len(target)) of the tensor, reading only their bytes;
    rows past the tensor's end (vocabulary padding) are zero."""
    count = max(0, min(len(target), entry.shape[0] - start))
    row_bytes = entry.num_bytes // entry.shape[0] if entry.shape[0] else 0
    piece = SafetensorsEntry(entry.file, entry.name, entry.dtype, (count, *entry.shape[1:]),
                             entry.offset + start * row_bytes, count * row_bytes)
    read_into(piece, target[:count], handle)
    target[count:].zero_()


def read_columns(entry: SafetensorsEntry, start: int, target: torch.Tensor, handle,
                 chunk_bytes: int = 1 << 20) -> None:
    """Fill ``target`` [rows, n] with columns [start, start + n) of a 2-D tensor, a few rows at a time
    (so that no more than ``chunk_bytes`` of other ranks' columns are ever in memory)."""
    rows, columns = entry.shape
    row_bytes = entry.num_bytes // rows
    step = max(1, chunk_bytes // max(1, row_bytes))
    for first in range(0, rows, step):
        count = min(step, rows - first)
        buffer = torch.empty((count, columns), dtype=entry.dtype)
        read_into(SafetensorsEntry(entry.file, entry.name, entry.dtype, (count, columns),
                                   entry.offset + first * row_bytes, count * row_bytes), buffer, handle)
        target[first:first + count].copy_(buffer[:, start:start + target.shape[1]])


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16}
    if dtype not in names:
        raise NemoliteError(f"dtype {dtype!r} is not supported; use one of {sorted(names)}")
    if dtype == "auto":
        return names.get(config.torch_dtype or "float32", torch.float32) or torch.float32
    return names[dtype]


def load_hf_model(path: str | Path, dtype: str | torch.dtype = "auto",
                  device: str | torch.device = "cpu", parallel=None) -> CausalLM:
    """Load an HF-format checkpoint directory into a ready ``CausalLM`` in eval mode; with ``parallel``
    (a ParallelState) only this rank's shard, one checkpoint tensor in memory at a time besides it."""
    path = Path(path)
    config = load_config(path)
    torch_dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = CausalLM(config, parallel)
        whole = CausalLM(config) if model.parallel.distributed else model  # names and shapes to check against
    expected = dict(whole.checkpoint_parameters())
    model.materialize(torch_dtype, device)
    params = model.checkpoint_parameters()
    move_to_huge_pages(list(params.values()), copy=False)  # faster streaming of the weights on the CPU
    entries = checkpoint_entries(path)
    if config.tie_word_embeddings:
        entries.pop("lm_head.weight", None)
    if config.is_reward_model and "score.bias" not in entries:  # transformers' score head has no bias
        expected.pop("score.bias")
        if "score.bias" in params:
            params.pop("score.bias").data.zero_()
    missing = sorted(expected.keys() - entries.keys())
    unexpected = sorted(entries.keys() - expected.keys())
    if missing or unexpected:
        raise NemoliteError(
            f"checkpoint {path} does not match its config.json: "
            f"missing tensors {_short_list(missing)}; unexpected tensors {_short_list(unexpected)}")
    mismatched = [f"{name} has shape {list(entry.shape)} in the checkpoint but the config implies "
                  f"{list(expected[name].shape)}" for name, entry in _by_file_offset(entries)
                  if tuple(expected[name].shape) != entry.shape]
    if mismatched:
        raise NemoliteError(f"checkpoint {path} does not match its config.json: {_short_list(mismatched, 4)}")
    with torch.no_grad():
        handles: dict[Path, object] = {}
        try:
            for name, entry in _by_file_offset(entries):
                if name not in params:
                    continue  # another pipeline stage's
                if entry.file not in handles:
                    handles[entry.file] = open(entry.file, "rb", buffering=0)
                part = shard_slice(name, entry.shape, config, model.parallel)
                if part is None:
                    read_into(entry, params[name].data, handles[entry.file])
                elif part[0] == 0:  # rows: read just this rank's bytes
                    read_rows(entry, part[1], params[name].data, handles[entry.file])
                else:
                    read_columns(entry, part[1], params[name].data, handles[entry.file])
        finally:
            for handle in handles.values():
                handle.close()
    return model.eval()


def _by_file_offset(entries: dict[str, SafetensorsEntry]) -> Iterator[tuple[str, SafetensorsEntry]]:
    return iter(sorted(entries.items(), key=lambda item: (str(item[1].file), item[1].offset)))


def _short_list(names: list[str], limit: int = 12) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', ... ({len(names) - limit} more)' if len(names) > limit else ''}]"


def save_hf_model(model: CausalLM, path: str | Path, hf_config: dict, dtype: torch.dtype | None = None) -> None:
    """Write ``model.safetensors`` and ``config.json`` (the caller supplies the HF config dict)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {name: (t.to(dtype) if dtype else t).detach().contiguous().cpu()
             for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
