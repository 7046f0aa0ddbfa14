"""Admission checks of one request against the model and the limits: the one place where every field
that reaches a tensor index, the sampler or an allocation is checked, whatever protocol it came by.

SamplingParams checks what no model can run (types, ranges, NaN); this module what this model cannot
(token ids beyond the vocabulary, prompts beyond the context, more KV than the cache holds) and what
the operator will not run (RequestLimits, the ``nemolite serve`` flags). Messages name the field and
the allowed range.
"""

from __future__ import annotations

import dataclasses

from nemolite.config import ModelConfig
from nemolite.engine.sampling_params import SamplingParams
from nemolite.errors import NemoliteError


@dataclasses.dataclass(slots=True, frozen=True)
class RequestLimits:
    """Bounds on the work one request may ask for (each a ``nemolite serve`` flag)."""

    max_seqs_per_request: int = 256  # prompts x n (--max-seqs-per-request)
    max_stop_strings: int = 64  # stop strings per request, scanned every token (--max-stop-strings)
    max_stop_length: int = 256  # characters in one stop string (--max-stop-length)
    max_logprobs: int = 20  # logprobs / top_logprobs / prompt logprobs per position (--max-logprobs), as vLLM's
    # Positions x vocabulary of whole-distribution outputs (NeMo all_probs): 4 bytes each in memory and
    # 10-20 as JSON. 2**22 is 16 MB in memory, up to ~80 MB of JSON: 16 positions of Nemotron-4's 256k
    # vocabulary, 1,024 of the demo model's 4k.
    max_full_logprob_values: int = 2**22  # (--max-full-logprob-values)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise NemoliteError(f"--{field.name.replace('_', '-')} must be an integer >= 1, got {value!r}")


def validate_request(prompt_token_ids: list[int], params: SamplingParams, config: ModelConfig,
                     kv_capacity_tokens: int, limits: RequestLimits, eos_token_ids: list[int],
                     own_stops: frozenset[str] = frozenset()) -> None:
    """Raise NemoliteError for a request this engine must not run; reads nothing that steps change.
    ``own_stops`` (the chat template's end-of-turn strings, added by the server) do not count against
    the client's stop-string limits."""
    if not isinstance(params, SamplingParams):
        raise NemoliteError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
    params.validate()  # again: fields may have been set after construction
    vocab, context = config.vocab_size, config.max_position_embeddings
    if not isinstance(prompt_token_ids, list) or not prompt_token_ids:
        raise NemoliteError("the prompt is empty; give at least one token")
    if len(prompt_token_ids) >= context:
        raise NemoliteError(f"the prompt has {len(prompt_token_ids)} tokens but the model's context is "
                            f"{context}; shorten the prompt")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt_token_ids):
        raise NemoliteError(f"prompt token ids must be integers in [0, {vocab})")
    _check_ids("stop_token_ids", params.stop_token_ids, vocab)
    _check_ids("logit_bias", list(params.logit_bias or ()), vocab)
    _check_ids("allowed_token_ids", params.allowed_token_ids or [], vocab)
    if params.allowed_token_ids is not None and params.min_tokens > 0:
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        if stops.issuperset(params.allowed_token_ids):
            raise NemoliteError("allowed_token_ids holds only stop tokens, which min_tokens forbids; "
                                "allow another token or set min_tokens to 0")
    if params.reward != config.is_reward_model:
        raise NemoliteError("this is a reward model: it scores conversations (POST /v1/reward) and generates "
                            "no text" if config.is_reward_model else
                            "this model has no reward head; serve a reward model to score responses")
    if params.n > limits.max_seqs_per_request:
        raise NemoliteError(f"n is {params.n}; this server runs at most {limits.max_seqs_per_request} sequences "
                            "per request (--max-seqs-per-request)")
    stops = [stop for stop in params.stop if stop not in own_stops]
    if len(stops) > limits.max_stop_strings:
        raise NemoliteError(f"{len(stops)} stop strings; at most {limits.max_stop_strings} per request "
                            "(--max-stop-strings)")
    if any(len(stop) > limits.max_stop_length for stop in stops):
        raise NemoliteError(f"a stop string is longer than {limits.max_stop_length} characters "
                            "(--max-stop-length)")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > min(limits.max_logprobs, vocab):
            raise NemoliteError(f"{name} is {value}; at most {min(limits.max_logprobs, vocab)} per position "
                                "(--max-logprobs)")
    generated = context - len(prompt_token_ids) if params.max_tokens is None else \
        min(params.max_tokens, context - len(prompt_token_ids))
    if params.full_logprobs:
        positions = params.n * generated + (len(prompt_token_ids) - 1 if params.prompt_logprobs is not None else 0)
        if positions * vocab > limits.max_full_logprob_values:
            raise NemoliteError(
                f"whole-distribution logprobs (all_probs/full_logprobs) for {positions} positions x {vocab} tokens "
                f"exceed this server's {limits.max_full_logprob_values} values (--max-full-logprob-values); "
                "ask for fewer tokens or prompts")
    longest = len(prompt_token_ids) + generated
    if longest > kv_capacity_tokens:
        raise NemoliteError(f"the KV cache ({kv_capacity_tokens} tokens) cannot hold the {longest} tokens this "
                            "request may need; raise --kv-cache-gb or lower max_tokens")


def _check_ids(field: str, ids: list[int], vocab: int) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise NemoliteError(f"{field} holds token id {bad}; token ids must be in [0, {vocab})")
