"""Continuous batching with chunked prefill: which sequences run this step, and how many tokens each.

Every step, running sequences go first, oldest first: a decoding sequence takes one token, a
sequence still prefilling takes a chunk of what the token budget leaves. Then waiting
sequences join while the budget, ``max_num_seqs`` and free blocks allow. When the KV cache
is full the newest running sequence is preempted: its blocks are freed and it waits at the
front of the queue to be recomputed (prefix caching makes that cheap).
"""

from __future__ import annotations

from collections import deque

from nemolite.engine.block_manager import BlockManager
from nemolite.engine.sequence import Sequence, SequenceStatus

ScheduledBatch = list[tuple[Sequence, int]]


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_loras: int | None = None):
        self.block_manager = block_manager
        self.max_loras = max_loras  # distinct LoRA adapters among the running sequences (None: no adapters)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch: ScheduledBatch = []
        preempted = False
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.can_append(seq, num_tokens):
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.block_manager.append_slots(seq, num_tokens)
            batch.append((seq, num_tokens))
            budget -= num_tokens
        adapters = {seq.lora_id for seq in self.running} - {0} if self.max_loras else set()
        skipped: list[Sequence] = []  # waiting for a LoRA slot; they keep their place in the queue
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.max_loras and seq.lora_id and seq.lora_id not in adapters and len(adapters) >= self.max_loras:
                skipped.append(self.waiting.popleft())
                continue
            if seq.waits_for is not None and seq.waits_for.num_computed_tokens < seq.num_prompt_tokens - 1 \
                    and not seq.waits_for.finished:
                break  # let the sibling compute the shared prompt first, then reuse its blocks
            if not self.block_manager.allocate(seq):
                if not self.running:
                    raise RuntimeError("the KV cache cannot hold even one sequence")  # guarded at admission
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.lora_id:
                adapters.add(seq.lora_id)
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            batch.append((seq, num_tokens))
            budget -= num_tokens
        self.waiting.extendleft(reversed(skipped))
        return batch

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Finished or aborted: free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
