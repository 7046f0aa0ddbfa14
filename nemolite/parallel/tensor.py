"""Megatron-style tensor parallelism and pipeline stages as a rank's view of the one model.

A rank's model is ``CausalLM`` built from a *local* config: its share of the query heads, of the
KV heads (replicated when TP exceeds them), of each MLP's width and of the (padded) vocabulary;
layers of other pipeline stages become ``no_op`` layers, which hold nothing. Those shapes are
exactly the column-parallel slices (q/k/v, gate/up, embedding and LM-head rows) and row-parallel
slices (o_proj, down_proj, NAS linear sublayers: columns) of the checkpoint's tensors, so the
loaders fill them with ``shard_tensor``. ``parallelize`` then swaps in the modules that talk:
one all-reduce after each row-parallel sublayer, one for the vocab-parallel embedding, one
all-gather of the logits.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nemolite.config import LayerSpec, ModelConfig
from nemolite.errors import NemoliteError
from nemolite.parallel.groups import ParallelState
from nemolite.plan import balanced_stages, layer_parameters

OFF_STAGE = LayerSpec(attention="no_op", num_kv_heads=0, mlp="no_op", intermediate_size=0)


def stage_layers(config: ModelConfig, state: ParallelState) -> range:
    """This rank's layers: consecutive ranges balanced by parameters (NAS layers differ a lot)."""
    if state.pp_size > config.num_layers:
        raise NemoliteError(f"--pipeline-parallel-size {state.pp_size} exceeds the model's {config.num_layers} "
                            "layers; use fewer stages")
    costs = [layer_parameters(config, spec, state.tp_size) for spec in config.layers]
    if state.pp_size > 1:  # the last stage also runs the LM head
        costs[-1] += config.vocab_size * config.hidden_size / state.tp_size
    return balanced_stages(costs, state.pp_size)[state.pp_rank]


def local_kv_heads(num_kv_heads: int, tp: int) -> int:
    return max(1, num_kv_heads // tp)


def shard_config(config: ModelConfig, state: ParallelState) -> ModelConfig:
    """The shapes this rank holds (see the module docstring); the checkpoint's config stays the model's."""
    tp = state.tp_size
    if config.num_attention_heads % tp:
        raise NemoliteError(f"{config.num_attention_heads} attention heads do not split over "
                            f"--tensor-parallel-size {tp}; use a divisor")
    mine = stage_layers(config, state)
    layers = []
    for index, spec in enumerate(config.layers):
        if index not in mine:
            layers.append(OFF_STAGE)
            continue
        if spec.attention == "attention" and spec.num_kv_heads % tp and tp % spec.num_kv_heads:
            raise NemoliteError(f"layer {index}: {spec.num_kv_heads} KV heads neither split over nor replicate "
                                f"evenly across --tensor-parallel-size {tp}")
        if spec.mlp in ("relu2", "swiglu") and spec.intermediate_size % tp:
            raise NemoliteError(f"layer {index}: MLP width {spec.intermediate_size} does not split over "
                                f"--tensor-parallel-size {tp}")
        if "linear" in (spec.attention, spec.mlp) and config.hidden_size % tp:
            raise NemoliteError(f"layer {index}: a linear sublayer of width {config.hidden_size} does not split "
                                f"over --tensor-parallel-size {tp}")
        layers.append(dataclasses.replace(
            spec, num_kv_heads=local_kv_heads(spec.num_kv_heads, tp) if spec.attention == "attention" else 0,
            intermediate_size=spec.intermediate_size // tp))
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // tp, layers=layers,
                               vocab_size=math.ceil(config.vocab_size / tp))


def shard_slice(name: str, shape: tuple[int, ...], config: ModelConfig,
                state: ParallelState) -> tuple[int, int, int] | None:
    """Which part of checkpoint tensor ``name`` (HF naming, full ``config``) this rank holds:
    (dimension, start, length), or None for all of it. Vocabulary rows past the end are padding."""
    tp, rank = state.tp_size, state.tp_rank
    if tp == 1 or len(shape) == 0:
        return None
    parts = name.split(".")
    kind = parts[-2] if len(parts) >= 2 else ""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = math.ceil(config.vocab_size / tp)
        return 0, rank * rows, rows
    if kind in ("q_proj", "gate_proj", "up_proj"):
        return 0, rank * shape[0] // tp, shape[0] // tp
    if kind in ("k_proj", "v_proj"):
        layer = config.layers[int(parts[2])]
        local = local_kv_heads(layer.num_kv_heads, tp)
        # Split when there are enough KV heads; else each serves the TP/G ranks whose query heads use it.
        first = rank * local if layer.num_kv_heads >= tp else rank // (tp // layer.num_kv_heads)
        return 0, first * config.head_dim, local * config.head_dim
    if kind in ("o_proj", "down_proj", "linear_attn", "linear_mlp") and parts[-1] == "weight":
        return 1, rank * shape[1] // tp, shape[1] // tp
    return None  # norms, row-parallel biases (added once, after the all-reduce), a reward head


def shard_tensor(name: str, tensor: torch.Tensor, config: ModelConfig, state: ParallelState) -> torch.Tensor:
    """This rank's slice of checkpoint tensor ``name`` (see shard_slice), padded with zero rows."""
    part = shard_slice(name, tuple(tensor.shape), config, state)
    if part is None:
        return tensor
    dim, start, length = part
    piece = tensor.narrow(dim, start, max(0, min(length, tensor.shape[dim] - start)))
    return F.pad(piece, (0, 0, 0, length - piece.shape[0])) if dim == 0 and piece.shape[0] < length else piece


def _local_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """This rank's x W_shardᵀ: through the quantized shard when the layer was quantized (nemolite.quant)."""
    quantized = getattr(module, "quantized", None)
    return F.linear(x, module.weight) if quantized is None else quantized(x)


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_shard @ W_shard^T) + b``: the checkpoint's [out, in] split along ``in``."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group, split_input: bool, tp_rank: int):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.group, self.split_input, self.tp_rank = group, split_input, tp_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_input:  # a NAS linear sublayer sees the whole hidden state
            quantized = getattr(self, "quantized", None)  # nemolite.quant.model.install; the weight is then empty
            width = self.weight.shape[1] if quantized is None else quantized.in_features
            x = x[..., self.tp_rank * width:(self.tp_rank + 1) * width]
        y = _local_linear(self, x)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Each rank holds rows [start, start + V/TP) of the (padded) vocabulary; the others contribute 0."""

    def __init__(self, weight: nn.Parameter, group, tp_rank: int):
        super().__init__()
        self.weight, self.group = weight, group
        self.start = tp_rank * weight.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0)
        dist.all_reduce(out, group=self.group)
        return out


class VocabParallelHead(nn.Module):
    """Logits of this rank's vocabulary rows, all-gathered and cut back to the real vocabulary."""

    def __init__(self, weight: nn.Parameter, group, tp_size: int, vocab_size: int):
        super().__init__()
        self.weight, self.group, self.tp_size, self.vocab_size = weight, group, tp_size, vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = _local_linear(self, hidden).contiguous()
        pieces = [torch.empty_like(local) for _ in range(self.tp_size)]
        dist.all_gather(pieces, local, group=self.group)
        return torch.cat(pieces, dim=-1)[..., :self.vocab_size]


def parallelize(model: nn.Module, state: ParallelState) -> None:
    """Swap the TP-communicating modules into a model built from ``shard_config`` (weights kept)."""
    if state.tp_size == 1:
        return
    group, rank = state.tp_group, state.tp_rank
    for layer in model.model.layers:
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attention is not None and hasattr(attention, "o_proj"):
            attention.o_proj = RowParallelLinear(attention.o_proj.weight, attention.o_proj.bias, group, False, rank)
        elif attention is not None:
            attention.linear_attn = RowParallelLinear(_input_shard(attention.linear_attn, state), None, group, True, rank)
        if mlp is not None and hasattr(mlp, "down_proj"):
            mlp.down_proj = RowParallelLinear(mlp.down_proj.weight, mlp.down_proj.bias, group, False, rank)
        elif mlp is not None:
            mlp.linear_mlp = RowParallelLinear(_input_shard(mlp.linear_mlp, state), None, group, True, rank)
    if model.model.embed_tokens is not None:
        model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens.weight, group, rank)
    if model.lm_head is not None:
        model.lm_head = VocabParallelHead(model.lm_head.weight, group, state.tp_size, model.config.vocab_size)


def _input_shard(linear: nn.Module, state: ParallelState) -> nn.Parameter:
    """A NAS linear sublayer is built whole ([D, D]); its row-parallel rank holds [D, D / TP]."""
    out_features, in_features = linear.weight.shape
    return nn.Parameter(torch.empty(out_features, in_features // state.tp_size, dtype=linear.weight.dtype,
                                    device=linear.weight.device), requires_grad=False)
