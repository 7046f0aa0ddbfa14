"""SamplingParams, shaped as vLLM users know them."""

from __future__ import annotations

import dataclasses
import math

from nemolite.errors import NemoliteError


@dataclasses.dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # NeMo/HF: seen tokens' positive logits divided by it, negative multiplied
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated text
    max_tokens: int | None = 16  # None = up to the model's context
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False  # keep a matched stop string at the end of the text (NeMo end_strings)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token, besides the sampled one
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (OpenAI echo)
    full_logprobs: bool = False  # also keep the whole-vocabulary logprob row of every scored position (NeMo all_probs)
    skip_special_tokens: bool = True
    reward: bool = False  # score the prompt with a reward model's head instead of generating (max_tokens is 0)

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise NemoliteError(message)

        need(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        need(_number(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}")
        need(isinstance(self.top_k, int) and self.top_k >= -1, f"top_k must be -1, 0 (off) or a positive integer, "
             f"got {self.top_k!r}")
        need(_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        need(_number(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        need(_number(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            need(_number(value) and -2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value!r}")
        need(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 0),
             f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        need(isinstance(self.min_tokens, int) and self.min_tokens >= 0,
             f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        need(all(isinstance(s, str) and s for s in self.stop), "stop must be a non-empty string or a list of them")
        self.stop_token_ids = list(self.stop_token_ids or [])
        need(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be a list of non-negative integers")
        need(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        if self.reward:
            need(self.n == 1 and self.logprobs is None and self.prompt_logprobs is None,
                 "a reward request scores its prompt once: n must be 1 and logprobs/prompt_logprobs unset")
            self.max_tokens = self.min_tokens = 0
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 20),
                 f"{name} must be an integer in [0, 20], got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
