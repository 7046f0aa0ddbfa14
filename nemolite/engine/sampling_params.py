"""SamplingParams, shaped as vLLM users know them."""

from __future__ import annotations

import dataclasses
import math

from nemolite.engine.structured import StructuredOutputs
from nemolite.errors import NemoliteError
from nemolite.json_body import valid_unicode


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
    logit_bias: dict[int, float] | None = None  # OpenAI: added to these tokens' logits, each in [-100, 100]
    allowed_token_ids: list[int] | None = None  # vLLM: only these tokens may be drawn
    # vLLM: the output must match a JSON schema, regex, choice or grammar (a StructuredOutputs or a dict
    # of its fields); the grammar compiles when the request is added
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise NemoliteError for a value no model can use; the engine checks the rest against its model
        (token ids against the vocabulary, lengths against the context, counts against RequestLimits)."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise NemoliteError(message)

        need(_integer(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        need(_number(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}")
        need(_integer(self.top_k) and self.top_k >= -1, f"top_k must be -1, 0 (off) or a positive integer, "
             f"got {self.top_k!r}")
        need(_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        need(_number(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        need(_number(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            need(_number(value) and -2.0 <= value <= 2.0, f"{name} must be in [-2, 2], got {value!r}")
        need(self.max_tokens is None or (_integer(self.max_tokens) and self.max_tokens >= 0),
             f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        need(_integer(self.min_tokens) and self.min_tokens >= 0,
             f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        need(self.stop is None or isinstance(self.stop, (list, tuple)), "stop must be a string or a list of strings")
        self.stop = list(self.stop or [])
        need(all(isinstance(s, str) and s for s in self.stop), "stop must be a non-empty string or a list of them")
        need(all(valid_unicode(s) for s in self.stop), "stop strings must be valid Unicode (no lone surrogates)")
        need(self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)),
             "stop_token_ids must be a list of token ids")
        self.stop_token_ids = list(self.stop_token_ids or [])
        need(all(_integer(t) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be a list of non-negative integers")
        need(self.seed is None or (_integer(self.seed) and -(2**63) <= self.seed < 2**64),
             f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if self.logit_bias is not None:
            need(isinstance(self.logit_bias, dict) and all(
                _integer(t) and _number(b) and -100 <= b <= 100 for t, b in self.logit_bias.items()),
                "logit_bias must map token ids to numbers in [-100, 100]")
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()} or None
        if self.allowed_token_ids is not None:
            need(isinstance(self.allowed_token_ids, (list, tuple)) and self.allowed_token_ids
                 and all(_integer(t) for t in self.allowed_token_ids),
                 "allowed_token_ids must be a non-empty list of token ids")
            self.allowed_token_ids = list(dict.fromkeys(self.allowed_token_ids))
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputs.of(self.structured_outputs)
        for name in ("include_stop_str_in_output", "ignore_eos", "full_logprobs", "skip_special_tokens", "reward"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.reward:
            need(self.n == 1 and self.logprobs is None and self.prompt_logprobs is None
                 and self.structured_outputs is None, "a reward request scores its prompt once: n must be 1 and "
                 "logprobs/prompt_logprobs/structured_outputs unset")
            self.max_tokens = self.min_tokens = 0
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            need(value is None or (_integer(value) and value >= 0), f"{name} must be an integer >= 0, got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
