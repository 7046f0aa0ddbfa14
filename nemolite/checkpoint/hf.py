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
from nemolite.progress import Progress
from nemolite.quant.model import fused_bias, install, is_linear, quantizable_linears, quantize_model, quantize_module

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,  # FP8 checkpoints (compressed-tensors, ModelOpt)
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
    if entry.num_bytes and handle.readinto(memoryview(buffer.reshape(-1).view(torch.uint8).numpy()).cast("B")) != entry.num_bytes:
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
                  device: str | torch.device = "cpu", parallel=None, quantization=None) -> CausalLM:
    """Load an HF-format checkpoint directory into a ready ``CausalLM`` in eval mode; with ``parallel``
    (a ParallelState) only this rank's shard, one checkpoint tensor in memory at a time besides it.

    With ``quantization`` (a nemolite.quant.QuantSpec) each linear layer it chooses is quantized as
    soon as its weight (this rank's shard) is read, so the peak memory is the quantized model plus
    about one float layer, never the float model. A pre-quantized checkpoint (``quantization_config``
    in config.json, or ModelOpt's hf_quant_config.json: see nemolite.checkpoint.hf_quant) loads its
    quantized layers by their format's own rule; ``quantization`` then applies to the float layers left.
    """
    from nemolite.checkpoint.hf_quant import detect_prequantized

    path = Path(path)
    config = load_config(path)
    torch_dtype = resolve_dtype(dtype, config)
    prequantized = detect_prequantized(path)
    with torch.device("meta"):
        model = CausalLM(config, parallel)
        whole = CausalLM(config) if model.parallel.distributed else model  # names and shapes to check against
    expected = dict(whole.checkpoint_parameters())
    entries = checkpoint_entries(path)
    packed = prequantized.split(entries) if prequantized is not None else {}  # weight name → its layer's tensors
    shapes = {name: entry.shape for name, entry in entries.items()}
    shapes.update({name: layer.shape for name, layer in packed.items()})
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
        if packed.pop("lm_head.weight", None) is not None:
            raise NemoliteError(f"checkpoint {path} ties the LM head to the embedding but stores it quantized")
        entries.pop("lm_head.weight", None)
    if config.is_reward_model and "score.bias" not in shapes:  # transformers' score head has no bias
        expected.pop("score.bias")
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        raise NemoliteError(
            f"checkpoint {path} does not match its config.json: "
            f"missing tensors {_short_list(missing)}; unexpected tensors {_short_list(unexpected)}")
    mismatched = [f"{name} has shape {list(shape)} in the checkpoint but the config implies "
                  f"{list(expected[name].shape)}" for name, shape in sorted(shapes.items())
                  if tuple(expected[name].shape) != tuple(shape)]
    if mismatched:
        raise NemoliteError(f"checkpoint {path} does not match its config.json: {_short_list(mismatched, 4)}")

    model.materialize(torch_dtype, device)
    params = model.checkpoint_parameters()
    if config.is_reward_model and "score.bias" not in shapes and "score.bias" in params:
        params.pop("score.bias").data.zero_()
    layers = _quantized_layers(model, params, packed, quantization)  # weight name → (module name, module)
    for name, (_, module) in layers.items():  # filled layer by layer below: no float storage for them
        module.weight.data = module.weight.data.new_empty((0,) + tuple(module.weight.shape[1:]))
    plain = {name: entry for name, entry in entries.items() if name in params and name not in layers}
    move_to_huge_pages([params[name].data for name in plain], copy=False)  # faster streaming on the CPU
    layer_bytes = {name: sum(e.num_bytes for e in packed[name].entries.values()) if name in packed
                   else entries[name].num_bytes for name in layers}
    whole_model = not model.parallel.distributed  # a rank reads only its shards: counts, no totals, no bar
    progress = Progress(f"loading {path.name}" + (f" ({quantization})" if quantization is not None else ""),
                        total=len(plain) + len(layers) if whole_model else None,
                        total_bytes=sum(e.num_bytes for e in plain.values()) + sum(layer_bytes.values())
                        if whole_model else None, bar=None if whole_model else False)
    with torch.no_grad(), _Files() as files, _FloatBuffersReturned(bool(layers)), progress:
        for name, entry in _by_file_offset(plain):  # everything else first: a quantized layer's bias is needed
            _read_part(name, entry, params[name].data, config, model.parallel, files)
            progress.update(1, entry.num_bytes)
        for name in sorted(layers, key=lambda n: _first_offset(packed.get(n) or entries[n])):
            module_name, module = layers[name]
            shape = tuple(shapes[name])
            if name in packed:
                quantized = prequantized.load(packed[name], files, shard_slice(name, shape, config, model.parallel),
                                              fused_bias(module))
            else:  # quantize at load: this rank's float shard, then its quantized form
                entry, part = entries[name], shard_slice(name, shape, config, model.parallel)
                target_shape = shape if part is None else shape[:part[0]] + (part[2],) + shape[part[0] + 1:]
                buffer = torch.empty(target_shape, dtype=torch_dtype)
                _read_part(name, entry, buffer, config, model.parallel, files)
                quantized = quantize_module(module, quantization, weight=buffer)
                del buffer
            install(model, module_name, module, quantized.to(device))
            progress.update(1, layer_bytes[name])
        if quantization is not None:  # a tied LM head (quantized from the embedding), layers a format left float:
            quantize_model(model, quantization)  # what is installed already has no float weight and is skipped
    return model.eval()


def _quantized_layers(model: CausalLM, params: dict, packed: dict, quantization) -> dict:
    """The layers filled one by one: a pre-quantized checkpoint's, and those ``quantization`` chooses
    among the others (by checkpoint weight name)."""
    by_weight = {}
    if quantization is not None:
        by_weight = {id(module.weight): (name, module) for name, module in quantizable_linears(model, quantization)}
    linears = {id(module.weight): (name, module) for name, module in model.named_modules()
               if isinstance(getattr(module, "weight", None), torch.Tensor) and name.split(".")[-1] != "embed_tokens"}
    layers = {}
    for name, param in params.items():
        if name in packed:
            if id(param) not in linears or not is_linear(linears[id(param)][1]):
                raise NemoliteError(f"{name} is stored quantized but nemolite's {name} is not a linear layer")
            layers[name] = linears[id(param)]
        elif id(param) in by_weight and name == by_weight[id(param)][0] + ".weight":  # a tied head: afterwards
            layers[name] = by_weight[id(param)]
    return layers


def _first_offset(item) -> tuple[str, int]:
    if isinstance(item, SafetensorsEntry):
        return str(item.file), item.offset
    return min((str(e.file), e.offset) for e in item.entries.values())


def _read_part(name: str, entry: SafetensorsEntry, target: torch.Tensor, config: ModelConfig, parallel,
               files: "_Files") -> None:
    part = shard_slice(name, entry.shape, config, parallel)
    handle = files.handle(entry.file)
    if part is None:
        read_into(entry, target, handle)
    elif part[0] == 0:  # rows: read just this rank's bytes
        read_rows(entry, part[1], target, handle)
    else:
        read_columns(entry, part[1], target, handle)


class _Files:
    """Open checkpoint files (unbuffered), closed together."""

    def __init__(self):
        self.handles: dict[Path, object] = {}

    def handle(self, file: Path):
        if file not in self.handles:
            self.handles[file] = open(file, "rb", buffering=0)
        return self.handles[file]

    def __enter__(self) -> "_Files":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles.values():
            handle.close()


class _FloatBuffersReturned:
    """While a quantizing load runs, glibc serves every allocation over 1 MiB with its own mmap, so
    each float buffer freed after its layer is quantized goes back to the system. By default glibc
    raises that threshold as large blocks are freed (up to 32 MiB) and then carves them from its heap,
    where the quantized layers allocated in between pin them: measured on the 204 M benchmark
    checkpoint, an int8 load peaked at 1050 MiB RSS that way against 624 MiB with this (bf16: 687).
    Afterwards the threshold is left at 32 MiB, glibc's own ceiling (so inference allocates as it
    would once warm), and the heap's free pages are trimmed. Elsewhere than glibc: a no-op."""

    M_MMAP_THRESHOLD = -3  # <malloc.h>

    def __init__(self, active: bool):
        self.libc = None
        if active:
            try:
                import ctypes

                self.libc = ctypes.CDLL("libc.so.6")
                self.libc.mallopt
            except (OSError, AttributeError):
                self.libc = None

    def __enter__(self):
        if self.libc is not None:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, 1 << 20)
        return self

    def __exit__(self, *exc) -> None:
        if self.libc is not None:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, 32 << 20)
            self.libc.malloc_trim(0)


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
