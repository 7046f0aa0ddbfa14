"""NeMo / Megatron weights → one global state dict of Megatron-core names, read lazily.

Every layout ends as ``{mcore name without prefix: lazy tensor}`` (an object with ``shape``,
``dtype`` and ``read()``):

- legacy ``model_weights.ckpt`` and ``mp_rank_XX/`` / ``tp_rank_XX_pp_rank_XXX/`` shards, merged:
  column-parallel weights concatenated on dim 0, row-parallel on dim 1, norms from rank 0;
  pipeline stages' local layer numbers shifted by the layers of the stages before them;
- a distributed checkpoint ``model_weights/`` (any reader with ``keys()``, ``shape(key)``,
  ``dtype(key)``, ``read(key)``, ``read_slice(key, i)``), stacked ``decoder.layers.<sub>`` keys
  unfolded into one entry per layer.

Pre-core (``language_model.encoder...``) and MCore local-spec names are renamed to the TE-spec
names; ``_extra_state`` and ``inv_freq`` are dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from nemolite.checkpoint.nemo_archive import NemoArchive
from nemolite.checkpoint.torch_zip import read_torch_checkpoint
from nemolite.errors import NemoliteError

_PREFIX = re.compile(r"^(?:model\.)?(?:module\.)?")
_LAYER = r"(?:language_model\.(?:encoder|transformer)\.layers|decoder\.layers)\.(\d+)\."
# (pattern on the prefix-stripped key, replacement): pre-core and MCore local-spec names → TE-spec names.
RENAMES = [
    (r"^language_model\.embedding\.word_embeddings\.", "embedding.word_embeddings."),
    (r"^language_model\.(?:encoder|transformer)\.final_layernorm\.", "decoder.final_layernorm."),
    (r"^language_model\.output_layer\.", "output_layer."),
    (_LAYER + r"input_layernorm\.(weight|bias)$", r"decoder.layers.\1.self_attention.linear_qkv.layer_norm_\2"),
    (_LAYER + r"(?:post_attention_layernorm|pre_mlp_layernorm)\.(weight|bias)$",
     r"decoder.layers.\1.mlp.linear_fc1.layer_norm_\2"),
    (_LAYER + r"self_attention\.query_key_value\.", r"decoder.layers.\1.self_attention.linear_qkv."),
    (_LAYER + r"self_attention\.dense\.", r"decoder.layers.\1.self_attention.linear_proj."),
    (_LAYER + r"mlp\.dense_h_to_4h_2\.", r"decoder.layers.\1.mlp.linear_fc1_up."),  # legacy gated MLP's up half
    (_LAYER + r"mlp\.dense_h_to_4h\.", r"decoder.layers.\1.mlp.linear_fc1."),
    (_LAYER + r"mlp\.dense_4h_to_h\.", r"decoder.layers.\1.mlp.linear_fc2."),
    (r"^language_model\.(?:encoder|transformer)\.layers\.(\d+)\.", r"decoder.layers.\1."),
]
_RENAMES = [(re.compile(pattern), replacement) for pattern, replacement in RENAMES]
COLUMN_PARALLEL = re.compile(r"(linear_qkv|linear_fc1|linear_fc1_up)\.(weight|bias)$|"
                             r"^(embedding\.word_embeddings|output_layer)\.weight$")
ROW_PARALLEL = re.compile(r"(linear_proj|linear_fc2)\.weight$|^rm_head\.weight$")
_SHARD_DIR = re.compile(r"^(?:mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+))(_fsdp_shard_\d+)?/model_weights\.ckpt$")


def canonical_name(key: str) -> str | None:
    """The TE-spec MCore name of a NeMo/Megatron key without prefix; None for keys nemolite ignores."""
    if key.endswith("_extra_state") or key.endswith("inv_freq"):
        return None
    name = _PREFIX.sub("", key)
    if "position_embeddings" in name:
        raise NemoliteError(f"the checkpoint holds learned absolute position embeddings ({key}); "
                            "nemolite supports only RoPE models")
    for pattern, replacement in _RENAMES:
        renamed = pattern.sub(replacement, name)
        if renamed != name:
            return renamed
    return name


class MergedTensor:
    """One global tensor concatenated from tensor-parallel shards."""

    __slots__ = ("name", "parts", "dim", "gated", "shape", "dtype")

    def __init__(self, name: str, parts: list, dim: int, gated: bool):
        self.name, self.parts, self.dim, self.gated = name, parts, dim, gated
        shape = list(parts[0].shape)
        shape[dim] = sum(part.shape[dim] for part in parts)
        self.shape, self.dtype = tuple(shape), parts[0].dtype

    def read(self) -> torch.Tensor:
        tensors = [part.read() for part in self.parts]
        for tensor, part in zip(tensors, self.parts):
            if tuple(tensor.shape) != tuple(part.shape):
                raise NemoliteError(f"tensor-parallel shard of {self.name} has shape {list(tensor.shape)}, "
                                    f"expected {list(part.shape)}")
        if self.gated:  # each rank holds cat(gate_r, up_r): regroup as cat(gate_0..gate_n, up_0..up_n)
            halves = [tensor.chunk(2, dim=0) for tensor in tensors]
            return torch.cat([half[0] for half in halves] + [half[1] for half in halves], dim=0)
        return torch.cat(tensors, dim=self.dim)


class LayerSlice:
    """Layer ``index`` of a stacked ``[L, ...]`` distributed-checkpoint tensor."""

    __slots__ = ("reader", "key", "index", "shape", "dtype")

    def __init__(self, reader, key: str, index: int):
        self.reader, self.key, self.index = reader, key, index
        self.shape, self.dtype = tuple(reader.shape(key))[1:], reader.dtype(key)

    def read(self) -> torch.Tensor:
        return self.reader.read_slice(self.key, self.index)


class ReaderTensor:
    __slots__ = ("reader", "key", "shape", "dtype")

    def __init__(self, reader, key: str):
        self.reader, self.key = reader, key
        self.shape, self.dtype = tuple(reader.shape(key)), reader.dtype(key)

    def read(self) -> torch.Tensor:
        return self.reader.read(self.key)


def state_from_shards(shards: dict[tuple[int, int], dict[str, object]], gated_mlp: bool) -> dict[str, object]:
    """Merge ``{(tp, pp): raw state dict}`` into one global ``{mcore name: lazy tensor}``."""
    tp_size = 1 + max(tp for tp, _ in shards)
    pp_size = 1 + max(pp for _, pp in shards)
    missing = [(tp, pp) for tp in range(tp_size) for pp in range(pp_size) if (tp, pp) not in shards]
    if missing:
        raise NemoliteError(f"model-parallel shards {missing} (tp, pp) are missing from the checkpoint")
    merged: dict[str, list] = {}
    layer_offset = 0
    for pp in range(pp_size):
        stage_layers = set()
        for tp in range(tp_size):
            for key, value in shards[(tp, pp)].items():
                name = canonical_name(key)
                if name is None or not hasattr(value, "read"):
                    continue
                match = re.match(r"decoder\.layers\.(\d+)\.(.*)$", name)
                if match:
                    stage_layers.add(int(match.group(1)))
                    name = f"decoder.layers.{layer_offset + int(match.group(1))}.{match.group(2)}"
                parts = merged.setdefault(name, [None] * tp_size)
                if parts[tp] is None:  # a key in two stages (a tied embedding's copy): the first stage wins
                    parts[tp] = value
        layer_offset += len(stage_layers)
    state = {}
    for name, parts in merged.items():
        if COLUMN_PARALLEL.search(name) or ROW_PARALLEL.search(name):
            if any(part is None for part in parts):
                raise NemoliteError(f"tensor {name} is missing from some tensor-parallel shards")
            dim = 0 if COLUMN_PARALLEL.search(name) else 1
            gated = (gated_mlp and tp_size > 1 and re.search(r"linear_fc1\.(weight|bias)$", name) is not None
                     and name.replace("linear_fc1.", "linear_fc1_up.") not in merged)
            state[name] = parts[0] if tp_size == 1 else MergedTensor(name, parts, dim, gated)
        else:
            state[name] = next(part for part in parts if part is not None)
    return state


def state_from_dist_checkpoint(reader) -> dict[str, object]:
    state = {}
    for key in reader.keys():
        name = canonical_name(key)
        if name is None:
            continue
        # Stacked [L, ...] keys are unfolded before renaming: the renames match per-layer names, and
        # megatron writes local-spec names (input_layernorm., pre_mlp_layernorm.) when a layer spec has
        # no sharded_state_dict_keys_map.
        match = re.match(r"((?:language_model\.(?:encoder|transformer)|decoder)\.layers)\.([a-z_].*)$",
                         _PREFIX.sub("", key))
        if match:
            if not reader.shape(key):
                raise NemoliteError(f"{key} is a scalar, not a tensor stacked over layers; the checkpoint is corrupt")
            for index in range(reader.shape(key)[0]):
                layer_name = canonical_name(f"{match.group(1)}.{index}.{match.group(2)}")
                state[layer_name] = LayerSlice(reader, key, index)
        else:
            state[name] = ReaderTensor(reader, key)
    return state


def open_dist_reader(directory: Path):
    """Hook for distributed checkpoints: ``nemolite.checkpoint.dist_checkpoint.open_dist_checkpoint``."""
    from nemolite.checkpoint.dist_checkpoint import open_dist_checkpoint

    return open_dist_checkpoint(directory)


def read_weights(archive: NemoArchive, gated_mlp: bool) -> dict[str, object]:
    """The global lazy state dict of whatever weight layout ``archive`` holds."""
    names = archive.names()
    if any(name.startswith("model_weights/") for name in names) and archive.exists("model_weights/metadata.json"):
        return state_from_dist_checkpoint(open_dist_reader(archive.directory("model_weights")))
    if archive.exists("model_weights.ckpt"):
        return state_from_shards({(0, 0): read_torch_checkpoint(archive.window("model_weights.ckpt"))}, gated_mlp)
    shards = {}
    for name in names:
        match = _SHARD_DIR.match(name)
        if not match:
            continue
        if match.group(4):
            raise NemoliteError(f"{archive.path} is an FSDP-sharded checkpoint ({name}); nemolite cannot merge "
                                "FSDP shards, save it without FSDP")
        tp, pp = (int(match.group(1)), 0) if match.group(1) is not None else (int(match.group(2)), int(match.group(3)))
        shards[(tp, pp)] = read_torch_checkpoint(archive.window(name))
    if not shards:
        raise NemoliteError(f"{archive.path} holds no weights: expected model_weights.ckpt, mp_rank_XX/, "
                            "tp_rank_XX_pp_rank_XXX/ or a model_weights/ distributed checkpoint")
    return state_from_shards(shards, gated_mlp)
