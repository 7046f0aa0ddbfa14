"""``nemolite convert SRC DST``: any checkpoint nemolite reads → a Hugging Face safetensors directory.

Tensors stream from the source one at a time into shards of at most ``max_shard_bytes``, so memory
stays at one shard plus one tensor. The output is written into a sibling ``DST.partial`` directory
and renamed into place only when complete (with ``model.safetensors.index.json`` written last), so
a crash or Ctrl-C never leaves a DST that looks finished; the next run starts the partial over.

With ``quantization`` ("int8", "int4", "int4-g128", "int4-g128-asym", ...-head; nemolite.quant.spec)
the linear layers ``LLM(SRC, quantization=...)`` would quantize are written quantized, one at a time as
they stream, in the compressed-tensors ``pack-quantized`` format that vLLM and transformers load
(nemolite.checkpoint.convert_quant says the layout and its sources); everything else is kept as is.
Progress (nemolite.progress): a bar on a terminal, else one INFO line when the conversion ends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from nemolite.checkpoint.hf import INDEX_FILE, checkpoint_entries, read_into, resolve_dtype
from nemolite.errors import NemoliteError
from nemolite.progress import Progress
from nemolite.quant.spec import QuantSpec, parse_quantization

log = logging.getLogger(__name__)

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
    total_bytes: int | None = None  # of all tensors, for the progress's rate and ETA (None: unknown)


def nemo_source(path: Path) -> TensorSource:
    """A NeMo checkpoint in any layout nemolite reads (.nemo, directory, sharded, distributed)."""
    from nemolite.checkpoint.nemo import NemoCheckpoint

    checkpoint = NemoCheckpoint(path)
    tokenizer = [checkpoint.tokenizer_dir / "tokenizer.model"] if checkpoint.tokenizer_dir is not None else []
    return TensorSource(checkpoint.hf_config, checkpoint.hf_tensors, checkpoint.num_tensors, tokenizer,
                        checkpoint.close, checkpoint.num_bytes)


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
    total = sum(entry.num_bytes for entry in entries.values())
    return TensorSource(json.loads(config_file.read_text()), tensors, len(entries), extra, total_bytes=total)


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
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False, progress: bool | None = None,
            quantization: str | QuantSpec | None = None, lora: str | Path | None = None) -> Path:
    """Write ``source`` as an HF checkpoint at ``destination`` (a LoRA adapter at ``lora`` merged into its
    weights, then its linear layers quantized with ``quantization``); returns the destination path.
    ``progress``: None draws a bar when stderr is a terminal, True always, False never (an INFO log line at
    the end in every case)."""
    destination = Path(destination).expanduser()
    spec = parse_quantization(quantization)
    if destination.exists() and any(destination.iterdir()) and not overwrite:
        raise NemoliteError(f"{destination} exists and is not empty; pass --overwrite or choose another path")
    target_dtype = None if dtype in (None, "auto") else resolve_dtype(dtype, config=None)  # None: keep
    if max_shard_bytes < 1:
        raise NemoliteError("the shard size must be positive")
    src = open_source(source)
    partial = destination.with_name(destination.name + ".partial")
    try:
        if "quantization_config" in src.hf_config and (spec is not None or target_dtype is not None):
            raise NemoliteError(f"{source} is quantized already ({src.hf_config['quantization_config'].get('quant_method', '?')}); "
                                "it can be resharded, but not cast or quantized again")
        if lora is not None:
            src = _with_adapter(src, lora)
        quantize = _Quantizer(src.hf_config, spec) if spec is not None else None
        if partial.exists():
            shutil.rmtree(partial)  # what an interrupted run left: started over
        partial.mkdir(parents=True)
        weight_map, total_size = _write_shards(src, partial, target_dtype, max_shard_bytes, progress, quantize)
        config = dict(src.hf_config)
        if target_dtype is not None:
            config["torch_dtype"] = str(target_dtype).removeprefix("torch.")
        if quantize is not None:
            config.update(quantize.config_changes())
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


def _with_adapter(src: TensorSource, path: str | Path) -> TensorSource:
    """``src`` with a LoRA adapter's ``B A`` added to the weights it adapts, as they stream."""
    from nemolite.config import config_from_hf
    from nemolite.lora.adapter import adaptable_shapes
    from nemolite.lora.export import merged_tensors
    from nemolite.lora.formats import read_adapter

    if "quantization_config" in src.hf_config:
        raise NemoliteError("the base model is quantized; merge the adapter into a float checkpoint")
    shapes = adaptable_shapes(config_from_hf(src.hf_config))
    adapter = read_adapter(str(path), Path(path).name, shapes)
    adapter.check(shapes, max_rank=max(w.rank for w in adapter.weights.values()))
    return dataclasses.replace(src, tensors=lambda: merged_tensors(src.tensors(), adapter))


class _Quantizer:
    """Which streamed tensors become quantized layers, and their compressed-tensors tensors."""

    def __init__(self, hf_config: dict, spec: QuantSpec):
        from nemolite.checkpoint.convert_quant import quantized_layers

        self.spec = spec
        self.names, self.ignore = quantized_layers(hf_config, spec)
        # A tied LM head quantized too: the file gets its own quantized lm_head beside the float embedding.
        self.untie = bool(hf_config.get("tie_word_embeddings")) and "lm_head.weight" in self.names
        self.count = 0

    def __call__(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        from nemolite.checkpoint.convert_quant import layer_spec, quantize_for_file

        out = []
        if name in self.names or (self.untie and name == "model.embed_tokens.weight"):
            if name == "model.embed_tokens.weight":
                out.append((name, tensor))  # the embedding stays float
                name = "lm_head.weight"
            _, tensors = quantize_for_file(tensor, layer_spec(name, self.spec))
            prefix = name.removesuffix(".weight")
            out.extend((f"{prefix}.{suffix}", t.contiguous()) for suffix, t in tensors.items())
            self.count += 1
            return out
        return [(name, tensor)]

    def config_changes(self) -> dict:
        from nemolite.checkpoint.convert_quant import quantization_config

        if self.count != len(self.names):
            raise NemoliteError(f"the checkpoint held {self.count} of the {len(self.names)} linear layers its "
                                "config implies; nothing was written")
        log.info("quantized %d linear layers to %s (compressed-tensors pack-quantized)", self.count, self.spec)
        changes = {"quantization_config": quantization_config(self.spec, self.ignore)}
        if self.untie:
            changes["tie_word_embeddings"] = False
        return changes


def _write_shards(src: TensorSource, directory: Path, dtype: torch.dtype | None, max_shard_bytes: int,
                  progress: bool | None, quantize: _Quantizer | None = None) -> tuple[dict[str, str], int]:
    from safetensors.torch import save_file

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

    stage = "converting" if quantize is None else f"converting ({quantize.spec})"
    with Progress(stage, total=src.num_tensors, total_bytes=src.total_bytes, bar=progress) as bar:
        for name, tensor in src.tensors():
            read = tensor.numel() * tensor.element_size()
            if dtype is not None and tensor.dtype.is_floating_point:
                tensor = tensor.to(dtype)
            for key, value in (quantize(name, tensor) if quantize is not None else [(name, tensor)]):
                value = value.contiguous()
                size = value.numel() * value.element_size()
                if pending and pending_bytes + size > max_shard_bytes:
                    flush()
                pending[key] = value
                pending_bytes += size
                total_bytes += size
            bar.update(1, read)
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
