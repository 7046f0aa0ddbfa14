"""``nemolite convert SRC DST``: any checkpoint nemolite reads → a Hugging Face safetensors directory.

Tensors stream from the source one at a time into shards of at most ``max_shard_bytes``, so memory
stays at one shard plus one tensor. The output is written into a sibling ``DST.partial`` directory
and renamed into place only when complete (with ``model.safetensors.index.json`` written last), so
a crash or Ctrl-C never leaves a DST that looks finished; the next run starts the partial over.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from nemolite.checkpoint.hf import INDEX_FILE, checkpoint_entries, read_into, resolve_dtype
from nemolite.errors import NemoliteError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
DEFAULT_SHARD_BYTES = 2_000_000_000


@dataclasses.dataclass
class TensorSource:
    """What a converter needs of a checkpoint: the HF config, tensors by HF name (read lazily, in order),
    and the files to copy beside them."""

    hf_config: dict
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    num_tensors: int
    extra_files: list[Path]
    close: Callable[[], None] = lambda: None


def nemo_source(path: Path) -> TensorSource:
    """A NeMo checkpoint in any layout nemolite reads (.nemo, directory, sharded, distributed)."""
    from nemolite.checkpoint.nemo import NemoCheckpoint

    checkpoint = NemoCheckpoint(path)
    tokenizer = [checkpoint.tokenizer_dir / "tokenizer.model"] if checkpoint.tokenizer_dir is not None else []
    return TensorSource(checkpoint.hf_config, checkpoint.hf_tensors, checkpoint.num_tensors, tokenizer,
                        checkpoint.close)


def hf_source(path: Path) -> TensorSource:
    """An HF safetensors directory (re-sharding or changing its dtype)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise NemoliteError(f"{path} has no config.json")
    entries = checkpoint_entries(path)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        handles: dict[Path, object] = {}
        try:
            for name, entry in sorted(entries.items(), key=lambda item: (str(item[1].file), item[1].offset)):
                if entry.file not in handles:
                    handles[entry.file] = open(entry.file, "rb", buffering=0)
                tensor = torch.empty(entry.shape, dtype=entry.dtype)
                read_into(entry, tensor, handles[entry.file])
                yield name, tensor
        finally:
            for handle in handles.values():
                handle.close()

    extra = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    return TensorSource(json.loads(config_file.read_text()), tensors, len(entries), extra)


def open_source(path: str | Path) -> TensorSource:
    path = Path(path).expanduser()
    if not path.exists():
        raise NemoliteError(f"{path} does not exist")
    from nemolite.checkpoint.nemo import is_nemo_checkpoint

    if is_nemo_checkpoint(path):
        return nemo_source(path)
    if path.is_dir() and (path / "config.json").is_file():
        return hf_source(path)
    raise NemoliteError(f"{path} is neither a NeMo checkpoint (.nemo file, or a directory with model_config.yaml) "
                        "nor a Hugging Face directory with config.json")


def convert(source: str | Path, destination: str | Path, dtype: str | None = None,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False, progress: bool = True) -> Path:
    """Write ``source`` as an HF checkpoint at ``destination``; returns the destination path."""
    destination = Path(destination).expanduser()
    if destination.exists() and any(destination.iterdir()) and not overwrite:
        raise NemoliteError(f"{destination} exists and is not empty; pass --overwrite or choose another path")
    target_dtype = None if dtype in (None, "auto") else resolve_dtype(dtype, config=None)  # None: keep
    if max_shard_bytes < 1:
        raise NemoliteError("the shard size must be positive")
    src = open_source(source)
    partial = destination.with_name(destination.name + ".partial")
    try:
        if partial.exists():
            shutil.rmtree(partial)  # what an interrupted run left: started over
        partial.mkdir(parents=True)
        weight_map, total_size = _write_shards(src, partial, target_dtype, max_shard_bytes, progress)
        config = dict(src.hf_config)
        if target_dtype is not None:
            config["torch_dtype"] = str(target_dtype).removeprefix("torch.")
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file in src.extra_files:
            shutil.copyfile(file, partial / file.name)
        _finish(partial, weight_map, total_size)
    finally:
        src.close()
    if destination.exists():
        shutil.rmtree(destination)
    os.replace(partial, destination)
    return destination


def _write_shards(src: TensorSource, directory: Path, dtype: torch.dtype | None, max_shard_bytes: int,
                  progress: bool) -> tuple[dict[str, str], int]:
    from safetensors.torch import save_file
    from tqdm import tqdm

    shards: list[list[str]] = []
    weight_map: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(pending, str(directory / name), metadata={"format": "pt"})
            shards.append(list(pending))
            for key in pending:
                weight_map[key] = name
            pending, pending_bytes = {}, 0

    with tqdm(total=src.num_tensors, desc="converting", unit="tensor", disable=not progress) as bar:
        for name, tensor in src.tensors():
            tensor = (tensor.to(dtype) if dtype is not None else tensor).contiguous()
            size = tensor.numel() * tensor.element_size()
            if pending and pending_bytes + size > max_shard_bytes:
                flush()
            pending[name] = tensor
            pending_bytes += size
            total_bytes += size
            bar.update(1)
        flush()
    # Shards are numbered as they are written; HF's names also carry the total.
    total = len(shards)
    renamed = {}
    for index in range(1, total + 1):
        old, new = f"model-{index:05d}.safetensors", f"model-{index:05d}-of-{total:05d}.safetensors"
        os.replace(directory / old, directory / new)
        renamed[old] = new
    return {key: renamed[file] for key, file in weight_map.items()}, total_bytes


def _finish(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    """The index last: a directory without it is not a loadable checkpoint."""
    if len(set(weight_map.values())) == 1:
        only = next(iter(weight_map.values()))
        os.replace(directory / only, directory / "model.safetensors")
        return
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
