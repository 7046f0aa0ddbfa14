"""LoRA on the decoder's linear layers: a pool of adapter slots per layer, any mix of them per step.

Every adaptable layer is wrapped once, at engine start, by a ``LoRALinear`` holding its slots:
A [slots, P·R, in] and B [slots, out, P·R] with P the layers fused into it (q/k/v: 3, gate/up: 2, else 1)
and R the engine's max rank. Part p's A rows are [p·R, p·R + r) and its B block sits in its own output
rows, so a fused layer runs one low-rank product for all its parts. Slot 0 is never written: tokens
without an adapter use it, so every token has a slot.

Which slot each token uses is the step's ``LoRAMapping``, shared by all the layers of a model:
- eager steps group the tokens by slot and run each group's two small GEMMs on its rows only
  (no per-token copy of any weight; a step without adapters costs nothing);
- the compiled decode step has static shapes: every slot's product for every row, ``[slots, B, out]``,
  then each row takes its own slot's. Slots hold their weights in place, so a graph never captures them.
"""

from __future__ import annotations

import torch
from torch import nn

from nemolite.lora.adapter import LoRAWeights


class LoRAMapping:
    """The current step's slot of each token, set by the runner (None: no adapter in this step)."""

    __slots__ = ("groups", "token_slots", "weights")

    def __init__(self):
        self.groups: list[tuple[int, torch.Tensor | None]] | None = None  # (slot, rows or None for all)
        self.token_slots: torch.Tensor | None = None  # [N] for the static form
        self.weights: list[torch.Tensor] = []  # the static form's A and B of each layer (graph inputs)

    def set_tokens(self, token_slots: list[int], device: torch.device) -> None:
        """Eager step: the slot of each flattened token (0: none)."""
        used = sorted(set(token_slots) - {0})
        if not used:
            self.groups = None
        elif len(used) == 1 and all(s == used[0] for s in token_slots):
            self.groups = [(used[0], None)]
        else:
            slots = torch.tensor(token_slots)
            self.groups = [(s, torch.nonzero(slots == s)[:, 0].to(device)) for s in used]
        self.token_slots = None

    def set_static(self, token_slots: torch.Tensor | None, weights: list[torch.Tensor]) -> None:
        """Compiled step: [B] slots and each layer's A and B, the graph's inputs; every slot computed for
        every row."""
        self.groups, self.token_slots, self.weights = None, token_slots, weights

    def clear(self) -> None:
        self.groups, self.token_slots, self.weights = None, None, []


class LoRALinear(nn.Module):
    """``base(x)`` plus the low-rank update of each token's slot. ``parts``: (layer name, first output row,
    rows) of the checkpoint layers this one computes, in output order."""

    def __init__(self, base: nn.Module, parts: list[tuple[str, int, int]], in_features: int, out_features: int,
                 num_slots: int, max_rank: int, mapping: LoRAMapping, index: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.base = base
        self.index = index  # this layer's A and B are mapping.weights[2 * index : 2 * index + 2]
        self.parts = parts
        self.max_rank = max_rank
        self.mapping = mapping
        width = max_rank * len(parts)
        # Plain attributes, not buffers: a compiled graph with frozen parameters must not capture them.
        self.lora_a = torch.zeros(num_slots + 1, width, in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(num_slots + 1, out_features, width, dtype=dtype, device=device)

    def set_slot(self, slot: int, weights: dict[str, LoRAWeights]) -> None:
        """Write an adapter's weights for this layer's parts into ``slot`` (zeros where it has none)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        for index, (name, first_row, rows) in enumerate(self.parts):
            w = weights.get(name)
            if w is None:
                continue
            column = index * self.max_rank
            self.lora_a[slot, column:column + w.rank] = w.lora_a
            self.lora_b[slot, first_row:first_row + rows, column:column + w.rank] = w.lora_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        mapping = self.mapping
        if mapping.token_slots is not None:
            lora_a, lora_b = mapping.weights[2 * self.index], mapping.weights[2 * self.index + 1]
            return y + static_delta(x, mapping.token_slots, lora_a, lora_b).view_as(y)
        if mapping.groups is None:
            return y
        rows_in, rows_out = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        for slot, rows in mapping.groups:
            selected = rows_in if rows is None else rows_in.index_select(0, rows)
            delta = (selected @ self.lora_a[slot].t()) @ self.lora_b[slot].t()
            if rows is None:
                rows_out += delta
            else:
                rows_out.index_add_(0, rows, delta)
        return y



def static_delta(x: torch.Tensor, token_slots: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """x [N, in] (any leading shape), token_slots [N], lora_a [slots, W, in], lora_b [slots, out, W] -> [N, out]."""
    rows_in = x.reshape(-1, x.shape[-1])
    shrunk = torch.matmul(rows_in, lora_a.transpose(1, 2))  # [slots, N, W]
    expanded = torch.matmul(shrunk, lora_b.transpose(1, 2))  # [slots, N, out]
    return expanded[token_slots, torch.arange(rows_in.shape[0], device=x.device)]
