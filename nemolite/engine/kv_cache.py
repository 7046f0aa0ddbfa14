"""The paged KV cache: per attention layer, ``num_blocks * block_size`` slots of [G_i, head_dim].

Layers without attention (NAS ``no_op`` / ``linear``) hold nothing; each attention layer
holds its own number of KV heads. A step's tokens arrive flattened into one row: decode
tokens (one per sequence) first, then prefill chunks. ``AttentionMetadata`` says where each
token's K/V goes (``slot_mapping``) and which slots each sequence attends over, so
attention reads only the filled positions of each sequence.
"""

from __future__ import annotations

import dataclasses

import torch

from nemolite.config import ModelConfig
from nemolite.errors import NemoliteError
from nemolite.model import cpu_kernels
from nemolite.model.layers import causal_attention


@dataclasses.dataclass(slots=True)
class PrefillSegment:
    start: int  # first token of the chunk in the flattened batch
    length: int  # tokens in the chunk
    context_slots: torch.Tensor  # [context] cache slots of every position up to the chunk's end


@dataclasses.dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [N] cache slot of each new token
    num_decode_tokens: int
    decode_context_slots: torch.Tensor | None  # [B_decode, max_context], padded with slot 0
    decode_mask: torch.Tensor | None  # [B_decode, 1, 1, max_context] True where a position is filled
    prefill_segments: list[PrefillSegment]
    decode_lengths: torch.Tensor | None = None  # [B_decode] positions before each decode token


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value: what a scaled K/V is clamped to (vLLM's fp8 KV cache does the same)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def kv_storage_dtype(name: str, compute: torch.dtype) -> torch.dtype:
    """``--kv-cache-dtype``: "auto" stores the model's dtype; "fp8"/"fp8_e4m3" stores e4m3 (half of bf16's
    bytes, so twice the blocks), each value divided by its layer's scale (the checkpoint's k_scale /
    v_scale, else 1.0) on the way in and multiplied back on the way out."""
    if name not in KV_CACHE_DTYPES:
        raise NemoliteError(f"--kv-cache-dtype {name!r} is not supported; use one of {', '.join(KV_CACHE_DTYPES)}")
    return compute if name == "auto" else FP8


def gather_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``cache[slots]`` ([*slots.shape, G, hd]) by ``index_select``, which copies whole rows: five times
    faster on the CPU than advanced indexing, which copies element by element."""
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str, storage_dtype: torch.dtype | None = None,
                 scales: dict[int, tuple[float, float]] | None = None):
        """``dtype``: what attention computes in; ``storage_dtype``: what the cache holds (default the
        same; FP8 with per-layer (k_scale, v_scale) from ``scales``, 1.0 where absent)."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.compute_dtype = dtype
        self.fp8 = storage_dtype == FP8
        self.scales = {i: (1.0, 1.0) for i in range(len(config.layers))} | dict(scales or {})
        # FP8 is held as its bytes: the CPU has no index_copy for float8 types, bytes copy alike.
        dtype = torch.uint8 if self.fp8 else dtype
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        # Left uninitialised: pages are touched (and count towards RSS) only when a block is first
        # handed out and zeroed, so a large budget costs memory only as it is used.
        for spec in config.layers:
            shape = (num_blocks * block_size, spec.num_kv_heads, config.head_dim)
            self.keys.append(torch.empty(shape, dtype=dtype, device=device) if spec.has_kv_cache else None)
            self.values.append(torch.empty(shape, dtype=dtype, device=device) if spec.has_kv_cache else None)
        self.metadata: AttentionMetadata | None = None
        self.device = torch.device(device)
        # Decode attention read in place from the cache (cpu_kernels), else gathered and matmul'd.
        self.paged_kernel = (self.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
                             and not self.fp8 and cpu_kernels.has("decode_attention"))

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * block_size * config.head_dim * element * sum(s.num_kv_heads for s in config.layers if s.has_kv_cache)

    def zero_blocks(self, block_ids: list[int]) -> None:
        """Blocks handed out anew hold stale or uninitialised memory; padded reads of their unused
        slots must see finite values (a masked NaN still poisons ``0 * value``). The paged kernel
        reads only filled slots, and prefill gathers exact positions: then there is nothing to do."""
        if self.paged_kernel:
            return
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for cache in self.keys + self.values:
            if cache is not None:
                cache.view(self.num_blocks, self.block_size, *cache.shape[1:]).index_fill_(0, index, 0)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def attend(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, H, N, hd], k/v [1, G, N, hd] for the step's N flattened tokens -> [1, H, N, hd]."""
        metadata = self.metadata
        keys, values = self.keys[layer_index], self.values[layer_index]
        k_scale, v_scale = self.scales[layer_index]
        self.store(keys, metadata.slot_mapping, k[0].transpose(0, 1), k_scale)
        self.store(values, metadata.slot_mapping, v[0].transpose(0, 1), v_scale)
        decode = metadata.num_decode_tokens
        parts = []
        if decode and self.paged_kernel:
            queries = q[0, :, :decode].transpose(0, 1)  # [B, H, hd]
            out = torch.ops.nemolite.decode_attention(
                queries, keys, values, metadata.decode_context_slots, metadata.decode_lengths,
                k[0, :, :decode].transpose(0, 1), v[0, :, :decode].transpose(0, 1), q.shape[-1] ** -0.5)
            parts.append(out.transpose(0, 1))  # [H, B, hd]
        elif decode:
            # [B, max_context, G, hd] -> [B, G, max_context, hd]; one query per sequence.
            context_keys = self.read(keys, metadata.decode_context_slots, k_scale).transpose(1, 2)
            context_values = self.read(values, metadata.decode_context_slots, v_scale).transpose(1, 2)
            queries = q[0, :, :decode].transpose(0, 1).unsqueeze(2)  # [B, H, 1, hd]
            out = causal_attention(queries, context_keys, context_values, mask=metadata.decode_mask)
            parts.append(out.squeeze(2).transpose(0, 1))  # [H, B, hd]
        for segment in metadata.prefill_segments:
            slots = segment.context_slots
            context_keys = self.read(keys, slots, k_scale).transpose(0, 1).unsqueeze(0)  # [1, G, context, hd]
            context_values = self.read(values, slots, v_scale).transpose(0, 1).unsqueeze(0)
            queries = q[:, :, segment.start:segment.start + segment.length]
            parts.append(causal_attention(queries, context_keys, context_values)[0])
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).unsqueeze(0)

    def store(self, cache: torch.Tensor, slots: torch.Tensor, new: torch.Tensor, scale: float) -> None:
        """new [N, G, hd] into the cache at ``slots``; an FP8 cache takes new / scale, clamped to e4m3's
        range, as bytes (the step's own K/V are then read back as stored, like every other position)."""
        if not self.fp8:
            cache.index_copy_(0, slots, new)
            return
        stored = (new.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        cache.index_copy_(0, slots, stored.view(torch.uint8))

    def read(self, cache: torch.Tensor, slots: torch.Tensor, scale: float) -> torch.Tensor:
        """cache[slots] in the compute dtype (an FP8 cache widened: e4m3 × scale)."""
        gathered = gather_slots(cache, slots)
        if not self.fp8:
            return gathered
        return (gathered.view(FP8).to(torch.float32) * scale).to(self.compute_dtype)

    def advance(self, num_tokens: int) -> None:
        """Positions are managed by the engine, not the cache."""
