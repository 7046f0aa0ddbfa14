"""Runs the model on one scheduled batch: flattens its tokens, maps them to cache slots, returns logits."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from nemolite.engine.compiled import CONTEXT_BUCKET, CompiledDecoder, batch_bucket
from nemolite.engine.kv_cache import AttentionMetadata, PagedKVCache, PrefillSegment
from nemolite.engine.scheduler import ScheduledBatch
from nemolite.engine.sequence import Sequence
from nemolite.model import CausalLM, cpu_kernels


@dataclasses.dataclass(slots=True)
class StepInputs:
    """One forward pass over a flattened batch: what every rank of a parallel job needs to run it."""

    token_ids: torch.Tensor  # [1, N]
    positions: torch.Tensor  # [1, N]
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [K] rows of the flattened batch whose logits are kept
    token_lora_ids: list[int] | None = None  # [N] each token's LoRA adapter (0: none); None: no adapter at all

    def to(self, device: torch.device) -> "StepInputs":
        metadata = self.metadata
        moved = dataclasses.replace(
            metadata, slot_mapping=metadata.slot_mapping.to(device),
            decode_context_slots=None if metadata.decode_context_slots is None else metadata.decode_context_slots.to(device),
            decode_mask=None if metadata.decode_mask is None else metadata.decode_mask.to(device),
            decode_lengths=None if metadata.decode_lengths is None else metadata.decode_lengths.to(device),
            prefill_segments=[dataclasses.replace(s, context_slots=s.context_slots.to(device))
                              for s in metadata.prefill_segments])
        return StepInputs(self.token_ids.to(device), self.positions.to(device), moved, self.logits_indices.to(device),
                          self.token_lora_ids)


@dataclasses.dataclass(slots=True)
class StepLogits:
    sample_logits: torch.Tensor  # [S, V] one row per sequence that samples its next token now
    samplers: list[Sequence]
    prompt_logits: torch.Tensor  # [P, V] rows for prompt positions, in the order of prompt_ranges
    prompt_ranges: list[tuple[Sequence, int, int]]  # (sequence, first prompt position, number of rows)


def lora_step(lora, inputs: StepInputs):
    """The adapters of one forward pass over ``inputs`` (a no-op context without a LoRAManager)."""
    return contextlib.nullcontext() if lora is None else lora.step(inputs.token_lora_ids)


def slot(seq: Sequence, position: int, block_size: int) -> int:
    """The cache slot that holds the K/V of ``position`` of ``seq``."""
    return seq.block_table[position // block_size] * block_size + position % block_size


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, device: torch.device, compile: bool = False,
                 lora=None):
        self.model = model
        self.cache = cache
        self.device = device
        self.lora = lora  # the engine's LoRAManager, or None
        self.decoder = None
        self._context_key, self._context_slots, self._context_mask = None, None, None  # see _decode_context
        if compile and model.lm_head is not None:  # a reward model only prefills: nothing to compile
            self.decoder = CompiledDecoder(model, lora.mapping if lora is not None else None)

    def context_slots(self, seqs: list[Sequence], lengths: list[int],
                      multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S] cache slots of each sequence's first ``lengths[i]`` positions (S = the longest, at least
        1, rounded up to a ``multiple``), padded with slot 0, and the [B, S] mask of the real ones."""
        size = self.cache.block_size
        longest = -(-max(1, max(lengths)) // multiple) * multiple
        blocks = -(-longest // size)
        tables = torch.tensor([seq.block_table[:blocks] + [0] * (blocks - min(blocks, len(seq.block_table)))
                               for seq in seqs], dtype=torch.long)
        slots = (tables[:, :, None] * size + torch.arange(size)).flatten(1)[:, :longest]
        return slots, torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]

    def zero_blocks(self, block_ids: list[int]) -> None:
        """Blocks handed out anew: see PagedKVCache.zero_blocks."""
        self.cache.zero_blocks(block_ids)

    def close(self) -> None:
        """Nothing to release on one process (a parallel runner stops its peers)."""

    def keep_alive(self) -> None:
        """Called while the engine idles (a parallel runner pings its peers)."""

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepLogits:
        """Compute K/V for the batch's tokens; fp32 logits for the sequences that sample now, and for
        the prompt positions of sequences that asked for prompt logprobs."""
        if self.decoder is not None and all(num_tokens == 1 for _, num_tokens in batch):
            return self._execute_compiled([seq for seq, _ in batch])
        inputs, samplers, prompt_ranges = self.prepare(batch)
        logits = self.forward([inputs])[0][0].float()
        return StepLogits(logits[:len(samplers)], samplers, logits[len(samplers):], prompt_ranges)

    def forward(self, micro_batches: list[StepInputs]) -> list[torch.Tensor]:
        """The model over each micro-batch: logits [1, K, V] (a reward model: rewards [1, K, A])."""
        outputs = []
        for inputs in micro_batches:
            self.cache.metadata = inputs.metadata
            try:
                with lora_step(self.lora, inputs):
                    outputs.append(self.model(inputs.token_ids, inputs.positions, cache=self.cache,
                                              logits_indices=inputs.logits_indices))
            finally:
                self.cache.metadata = None
        return outputs

    def prepare(self, batch: ScheduledBatch) -> tuple[StepInputs, list[Sequence], list[tuple[Sequence, int, int]]]:
        """Flatten a batch (decodes first): the model's inputs, the sequences that sample now (their
        logits rows come first), then the (sequence, first position, count) of prompt-logprob rows."""
        batch = sorted(batch, key=lambda item: item[1] > 1)  # decodes (one token) first
        size = self.cache.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        logits_indices: list[int] = []
        samplers: list[Sequence] = []
        segments: list[PrefillSegment] = []
        decode_seqs: list[Sequence] = []
        prompt_ranges: list[tuple[Sequence, int, int]] = []  # (seq, first position, count)
        prompt_indices: list[int] = []
        token_lora_ids: list[int] = []
        for seq, num_tokens in batch:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_tokens
            offset = len(token_ids)
            token_ids += seq.token_ids[start:end]
            token_lora_ids += [seq.lora_id] * num_tokens
            positions += range(start, end)
            slot_mapping += [slot(seq, p, size) for p in range(start, end)]
            if num_tokens == 1:
                decode_seqs.append(seq)
            else:
                context_slots = self.context_slots([seq], [end])[0][0]
                segments.append(PrefillSegment(offset, num_tokens, context_slots.to(self.device)))
            if end == len(seq):  # all its tokens will be in the cache: it samples the next one
                logits_indices.append(offset + num_tokens - 1)
                samplers.append(seq)
            # Positions whose next token is a prompt token, for prompt logprobs.
            scored_end = min(end, seq.num_prompt_tokens - 1)
            if seq.params.prompt_logprobs is not None and scored_end > start:
                prompt_ranges.append((seq, start, scored_end - start))
                prompt_indices += range(offset, offset + scored_end - start)
        decode_slots = decode_mask = decode_lengths = None
        if decode_seqs:
            lengths = [s.num_computed_tokens for s in decode_seqs]
            decode_slots, decode_mask = self.context_slots(decode_seqs, [n + 1 for n in lengths])
            decode_slots, decode_mask = decode_slots.to(self.device), decode_mask[:, None, None, :].to(self.device)
            decode_lengths = torch.tensor(lengths, dtype=torch.long, device=self.device)
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=self.device),
            num_decode_tokens=len(decode_seqs), decode_context_slots=decode_slots, decode_mask=decode_mask,
            prefill_segments=segments, decode_lengths=decode_lengths)
        inputs = StepInputs(torch.tensor([token_ids], device=self.device),
                            torch.tensor([positions], device=self.device), metadata,
                            torch.tensor(logits_indices + prompt_indices, dtype=torch.long, device=self.device),
                            token_lora_ids if any(token_lora_ids) else None)
        return inputs, samplers, prompt_ranges

    def _execute_compiled(self, seqs: list[Sequence]) -> StepLogits:
        size, device = self.cache.block_size, self.device
        lengths = [seq.num_computed_tokens for seq in seqs]  # positions before the new token
        slots, mask = self._decode_context(seqs, lengths)
        new_slots = torch.tensor([slot(seq, n, size) for seq, n in zip(seqs, lengths)], device=device)
        input_ids = torch.tensor([seq.token_ids[-1] for seq in seqs], device=device)
        lora_slots = None
        if self.lora is not None and any(seq.lora_id for seq in seqs):
            lora_slots = self.lora.static_slots([seq.lora_id for seq in seqs], batch_bucket(len(seqs)))
        logits, layers, new_keys, new_values = self.decoder(
            input_ids, torch.tensor(lengths, device=device), slots, mask, self.cache.keys, self.cache.values,
            lora_slots)
        caches = [self.cache.keys[i] for i in layers] + [self.cache.values[i] for i in layers]
        rows = new_keys + new_values
        if device.type == "cpu" and cpu_kernels.has("store_rows") and all(
                row.dtype == cache.dtype for row, cache in zip(rows, caches)):
            torch.ops.nemolite.store_rows(caches, new_slots, rows)  # one call for every layer
        else:
            for cache, row in zip(caches, rows):
                cache.index_copy_(0, new_slots, row)
        return StepLogits(logits, seqs, logits[:0], [])  # no prompt rows

    def _decode_context(self, seqs: list[Sequence], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The compiled step's [B, S] context slots and mask (S: the longest context padded to a multiple of
        CONTEXT_BUCKET). The slots change only when S or a block within it does, so they are kept from one
        step to the next (rebuilt each step they cost ~0.1 ms of a 5 ms batch-1 step on 2 cores). A graph
        that reads the cache through the paged kernel takes the lengths and never reads the mask: it gets
        one of the right shape, all True, kept with the slots."""
        longest = -(-max(1, max(lengths)) // CONTEXT_BUCKET) * CONTEXT_BUCKET
        key = longest, tuple(tuple(seq.block_table[:-(-longest // self.cache.block_size)]) for seq in seqs)
        if key != self._context_key:
            self._context_key = key
            self._context_slots = self.context_slots(seqs, lengths, CONTEXT_BUCKET)[0].to(self.device)
            if not self.decoder.reads_mask:
                self._context_mask = torch.ones(len(seqs), longest, dtype=torch.bool, device=self.device)
        if not self.decoder.reads_mask:
            return self._context_slots, self._context_mask
        mask = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
        return self._context_slots, mask.to(self.device)
