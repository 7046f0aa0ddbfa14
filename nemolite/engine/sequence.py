"""One sequence being generated: its tokens, its blocks in the paged KV cache, its output so far."""

from __future__ import annotations

import enum

import torch

from nemolite.engine.outputs import CompletionOutput
from nemolite.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A prompt and one of its completions (a request with ``n`` > 1 owns ``n`` sequences)."""

    __slots__ = ("seq_id", "request_id", "index", "prompt_token_ids", "token_ids", "params", "status",
                 "block_table", "block_hashes", "num_computed_tokens", "num_cached_tokens", "generator",
                 "output", "detokenizer", "prompt_logprobs", "prompt_full_logprobs", "waits_for", "reward",
                 "lora_id", "cache_salt", "grammar")

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, generator: torch.Generator, lora_id: int = 0, cache_salt: bytes = b""):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.prompt_token_ids = prompt_token_ids
        self.token_ids = list(prompt_token_ids)  # prompt + generated
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # prefix-cache digest of each full block whose KV is computed, in order
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # of those, how many came from the prefix cache
        self.generator = generator
        self.output = CompletionOutput(index=index, text="", token_ids=[], cumulative_logprob=0.0,
                                       logprobs=[] if params.logprobs is not None else None,
                                       full_logprobs=[] if params.full_logprobs else None)
        self.detokenizer = None
        self.prompt_logprobs: list | None = None
        self.prompt_full_logprobs: list | None = None
        self.waits_for: "Sequence | None" = None  # a sibling whose prompt blocks this one will reuse
        self.reward: list[float] | None = None  # a reward model's attributes for the prompt (SamplingParams.reward)
        self.lora_id = lora_id  # the LoRA adapter it runs with (0: the base model)
        self.cache_salt = cache_salt  # what else than its tokens decides its K/V (the adapter): prefix-cache keys
        self.grammar = None  # its structured output (nemolite.engine.structured.SequenceGrammar)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """Still computing the prompt (or recomputing after preemption)."""
        return self.num_uncomputed_tokens > 1

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
