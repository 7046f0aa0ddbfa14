"""Runs the model on one scheduled batch: flattens its tokens, maps them to cache slots, returns logits."""

from __future__ import annotations

import torch

from nemolite.engine.kv_cache import AttentionMetadata, PagedKVCache, PrefillSegment
from nemolite.engine.scheduler import ScheduledBatch
from nemolite.engine.sequence import Sequence
from nemolite.model import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, device: torch.device):
        self.model = model
        self.cache = cache
        self.device = device

    def block_slots(self, block_table: list[int], length: int) -> torch.Tensor:
        """[length] cache slots of positions 0..length-1 of a sequence."""
        size = self.cache.block_size
        table = torch.tensor(block_table[:-(-length // size)], dtype=torch.long)
        return (table[:, None] * size + torch.arange(size)).flatten()[:length]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        """Compute K/V for the batch's tokens; logits [S, V] fp32 for the S sequences that sample now."""
        batch = sorted(batch, key=lambda item: item[1] > 1)  # decodes (one token) first
        size = self.cache.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        logits_indices: list[int] = []
        samplers: list[Sequence] = []
        segments: list[PrefillSegment] = []
        decode_seqs: list[Sequence] = []
        for seq, num_tokens in batch:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_tokens
            offset = len(token_ids)
            token_ids += seq.token_ids[start:end]
            positions += range(start, end)
            table = seq.block_table
            slot_mapping += [table[p // size] * size + p % size for p in range(start, end)]
            if num_tokens == 1:
                decode_seqs.append(seq)
            else:
                segments.append(PrefillSegment(offset, num_tokens, self.block_slots(table, end).to(self.device)))
            if end == len(seq):  # all its tokens will be in the cache: it samples the next one
                logits_indices.append(offset + num_tokens - 1)
                samplers.append(seq)
        decode_slots = decode_mask = None
        if decode_seqs:
            lengths = torch.tensor([seq.num_computed_tokens + 1 for seq in decode_seqs])
            longest = int(lengths.max())
            blocks = -(-longest // size)
            tables = torch.tensor([seq.block_table[:blocks] + [0] * (blocks - min(blocks, len(seq.block_table)))
                                   for seq in decode_seqs], dtype=torch.long)
            decode_slots = (tables[:, :, None] * size + torch.arange(size)).flatten(1)[:, :longest].to(self.device)
            decode_mask = (torch.arange(longest)[None, :] < lengths[:, None])[:, None, None, :].to(self.device)
        self.cache.metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=self.device),
            num_decode_tokens=len(decode_seqs), decode_context_slots=decode_slots, decode_mask=decode_mask,
            prefill_segments=segments)
        try:
            logits = self.model(torch.tensor([token_ids], device=self.device),
                                torch.tensor([positions], device=self.device), cache=self.cache,
                                logits_indices=torch.tensor(logits_indices, dtype=torch.long, device=self.device))
        finally:
            self.cache.metadata = None
        return logits[0].float(), samplers
