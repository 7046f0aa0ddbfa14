"""A contiguous KV cache: one [B, G, S, hd] slab per attention layer, none for the others.

The cache owns both the storage and the attention over it, so the model never knows how
keys are laid out; the engine's paged cache offers the same ``attend``/``advance`` pair.
"""

from __future__ import annotations

import torch

from nemolite.config import ModelConfig
from nemolite.errors import NemoliteError
from nemolite.model.layers import causal_attention


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.max_length = max_length
        self.length = 0
        # keys[i] / values[i]: [B, G_i, max_length, head_dim], or None where layer i has no attention.
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        for spec in config.layers:
            shape = (batch_size, spec.num_kv_heads, max_length, config.head_dim)
            has_cache = spec.has_kv_cache
            self.keys.append(torch.empty(shape, dtype=dtype, device=device) if has_cache else None)
            self.values.append(torch.empty(shape, dtype=dtype, device=device) if has_cache else None)

    def attend(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's k/v [B, G, T, hd] after the cached ones; attend q [B, H, T, hd] over all."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise NemoliteError(f"sequence of {end} tokens exceeds the cache's {self.max_length} positions")
        keys, values = self.keys[layer_index], self.values[layer_index]
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return causal_attention(q, keys[:, :, :end], values[:, :, :end])

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
