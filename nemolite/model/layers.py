"""The building blocks of every Nemotron-family layer: norms, RoPE, attention, MLPs.

Weight names follow Hugging Face (``q_proj``, ``up_proj``, ``input_layernorm``...), so a
state dict of the decoder maps one-to-one onto an HF checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nemolite.config import LayerSpec, ModelConfig
from nemolite.model import cpu_kernels


class Linear(nn.Linear):
    """nn.Linear (same weights, same names). On the CPU its weight may be prepacked for oneDNN
    (``prepack``); otherwise a batch-1 bf16 case may take the GEMV kernel."""

    packed: torch.Tensor | None = None

    def prepack(self, keep_weight: bool = False) -> bool:
        """Use a oneDNN-packed copy of the weight from now on (cpu_kernels.pack_weight); True when it
        does. The plain weight's storage is freed unless ``keep_weight`` (another module shares it)."""
        packed = cpu_kernels.pack_weight(self.weight)
        if packed is None:
            return False
        self.packed = packed
        if not keep_weight:
            self.weight.data = self.weight.data.new_empty((0, self.in_features))
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return cpu_kernels.packed_linear(x, self.packed, self.bias)
        return cpu_kernels.linear(x, self.weight, self.bias)

    @classmethod
    def concatenate(cls, layers: list["Linear"]) -> "Linear | None":
        """One layer whose outputs are the layers' outputs side by side (weights stacked by rows); None
        when they cannot be one (other inputs, dtypes or bias, a prepacked weight)."""
        first = layers[0]
        if any(type(layer) is not cls or layer.packed is not None or layer.in_features != first.in_features
               or layer.weight.dtype != first.weight.dtype or layer.weight.device != first.weight.device
               or (layer.bias is None) != (first.bias is None) for layer in layers):
            return None
        fused = cls(first.in_features, sum(layer.out_features for layer in layers), bias=first.bias is not None,
                    device="meta")
        fused.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]), requires_grad=False)
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([layer.bias for layer in layers]), requires_grad=False)
        return fused


def concatenate_linears(layers: list[nn.Module]) -> nn.Module | None:
    """``layers`` (all of one class with a ``concatenate``: Linear, QuantizedLinear) as one layer, or None."""
    kind = type(layers[0])  # each concatenate refuses layers of another class
    return kind.concatenate(layers) if hasattr(kind, "concatenate") else None


class LayerNorm1P(nn.Module):
    """LayerNorm with a zero-centred weight: ``layer_norm(x, weight + 1, bias)`` (NeMo layernorm1p)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(size))
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight + 1, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype (as Llama does).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    cls = LayerNorm1P if config.norm == "layernorm1p" else RMSNorm
    return cls(config.hidden_size, config.norm_eps)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """[rotary_dim / 2] fp32 inverse frequencies, with linear or llama3 scaling applied."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        original = scaling.get("original_max_position_embeddings", 8192)
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelength - low) / (high - low)
        middle = (wavelength >= original / high) & (wavelength <= original / low)
        inv_freq = torch.where(middle, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE over the first ``rotary_dim`` channels of each head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, rotary_dim] in ``dtype``."""
        device = positions.device
        if device not in self._inv_freq:  # computed lazily: the module may be built on the meta device
            self._inv_freq[device] = rope_inverse_frequencies(self.config).to(device)
        freqs = positions[..., None].float() * self._inv_freq[device]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, head_dim]; rotates x[..., :rotary_dim] and passes the rest through."""
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((rotated, passed), dim=-1) if passed.shape[-1] else rotated


class Attention(nn.Module):
    """Causal GQA attention; K/V storage and the attention over it belong to the cache."""

    def __init__(self, config: ModelConfig, spec: LayerSpec, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.qkv_proj = None  # q, k and v as one layer once fuse_projections() has run

    def fuse_projections(self) -> bool:
        """Compute q, k and v with one layer from now on (one weight pass, one kernel call instead of three:
        ~0.3 ms of a 5 ms batch-1 int4 step on 2 cores); q_proj, k_proj and v_proj are dropped. True if fused."""
        fused = None if self.qkv_proj is not None else concatenate_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is None:
            return False
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj
        return True

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], cache) -> torch.Tensor:
        batch, length, _ = x.shape
        if self.qkv_proj is not None:
            kv_width = self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, kv_width, kv_width], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is None:
            out = causal_attention(q, k, v)
        else:
            out = cache.attend(self.layer_index, q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


def expand_kv(kv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, G, S, hd] -> [B, H, S, hd], each KV head shared by H/G query heads."""
    groups = num_heads // kv.shape[1]
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, T, hd], k/v [B, G, S, hd]; without a mask the last T of S keys are the queries' own."""
    if q.shape[2] == 1:
        return single_query_attention(q, k, v, mask)
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    if mask is None and q.shape[2] > 1:
        if q.shape[2] == k.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = offset_causal_mask(q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None) -> torch.Tensor:
    """Decode: q [B, H, 1, hd] over k/v [B, G, S, hd], mask [B, 1, 1, S] or None -> [B, H, 1, hd].

    Two small batched matmuls with the query heads of a group side by side: no KV copy per
    query head, and far cheaper than a flash-attention kernel for one query.
    """
    batch, heads, _, head_dim = q.shape
    groups = k.shape[1]
    grouped = q.reshape(batch, groups, heads // groups, head_dim)
    if q.device.type == "cpu" and groups <= PER_GROUP_MAX_GROUPS:
        return _per_group_attention(grouped, k, v, mask).reshape(batch, heads, 1, head_dim)
    scores = torch.matmul(grouped, k.transpose(2, 3)) * head_dim ** -0.5  # [B, G, H/G, S]
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(batch, 1, 1, -1), float("-inf"))
    weights = scores.float().softmax(-1).to(v.dtype)
    return torch.matmul(weights, v).reshape(batch, heads, 1, head_dim)


# On the CPU, K/V gathered from a paged cache arrive as transposed views that torch.matmul would copy
# whole; one strided bmm per KV group reads them in place: 2-3x faster from batch 16 on (230 vs 470 us
# a layer with G=2, 722 vs 1983 with G=8), but 2G small calls a layer cost more than the copy at batch 1
# when G is large (234 vs 58 us, G=8). The rule depends on G only, never on the batch, so a sequence
# gets bitwise the same attention alone or in any batch.
PER_GROUP_MAX_GROUPS = 4


def _per_group_attention(grouped: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
    """grouped q [B, G, H/G, hd], k/v [B, G, S, hd] (any strides) -> [B, G, H/G, hd]."""
    batch, groups, _, head_dim = grouped.shape
    keep = None if mask is None else mask.reshape(batch, 1, -1)
    outputs = []
    for group in range(groups):
        scores = torch.bmm(grouped[:, group], k[:, group].transpose(1, 2)) * head_dim ** -0.5  # [B, H/G, S]
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        weights = scores.float().softmax(-1).to(v.dtype)
        outputs.append(torch.bmm(weights, v[:, group]))
    return torch.stack(outputs, dim=1)


def offset_causal_mask(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """[T, S] bool: query i sits at key position S - T + i and sees keys up to it."""
    query_positions = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    return torch.arange(num_keys, device=device)[None, :] <= query_positions


class SquaredReLUMLP(nn.Module):
    def __init__(self, config: ModelConfig, width: int):
        super().__init__()
        self.up_proj = Linear(config.hidden_size, width, bias=config.mlp_bias)
        self.down_proj = Linear(width, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)).square())


class SwiGLUMLP(nn.Module):
    def __init__(self, config: ModelConfig, width: int):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, width, bias=config.mlp_bias)
        self.up_proj = Linear(config.hidden_size, width, bias=config.mlp_bias)
        self.down_proj = Linear(width, config.hidden_size, bias=config.mlp_bias)
        self.gate_up_proj = None  # gate and up as one layer once fuse_projections() has run

    def fuse_projections(self) -> bool:
        """Compute gate and up with one layer from now on; gate_proj and up_proj are dropped. True if fused."""
        fused = None if self.gate_up_proj is not None else concatenate_linears([self.gate_proj, self.up_proj])
        if fused is None:
            return False
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinearReplacement(nn.Module):
    """A NAS sublayer replaced by one square matrix (``linear_attn`` or ``linear_mlp``)."""

    def __init__(self, hidden_size: int, name: str):
        super().__init__()
        self.name = name
        setattr(self, name, Linear(hidden_size, hidden_size, bias=False))

    def forward(self, x: torch.Tensor, *unused) -> torch.Tensor:
        return getattr(self, self.name)(x)


def make_mlp(config: ModelConfig, spec: LayerSpec) -> nn.Module:
    if spec.mlp == "relu2":
        return SquaredReLUMLP(config, spec.intermediate_size)
    if spec.mlp == "swiglu":
        return SwiGLUMLP(config, spec.intermediate_size)
    return LinearReplacement(config.hidden_size, "linear_mlp")
