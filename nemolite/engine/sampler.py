"""Turns one position's logits into the next token: greedy, temperature, top-k, top-p, min-p."""

from __future__ import annotations

import torch

from nemolite.engine.outputs import Logprob
from nemolite.engine.sampling_params import SamplingParams


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] (already divided by temperature) with the tokens top-k/top-p/min-p exclude set to -inf."""
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
           banned_ids: list[int] | None = None) -> tuple[int, float, dict[int, Logprob] | None]:
    """logits [V] fp32 -> (token id, its logprob, top-N logprobs when asked).

    ``banned_ids`` (EOS and stop tokens before ``min_tokens``) can never be drawn. Sampling
    is an exponential race drawn from the request's own generator, so the result depends
    only on the logits and the seed, never on what else shares the batch.
    """
    logits = logits.float()
    if banned_ids:
        logits = logits.clone()
        logits[banned_ids] = float("-inf")
    logprobs = logits.log_softmax(-1)
    if params.greedy:
        token = int(logits.argmax())
    else:
        probs = filter_logits(logits / params.temperature, params).softmax(-1)
        race = torch.empty_like(probs).exponential_(generator=generator)
        token = int((probs / race).argmax())
    token_logprob = float(logprobs[token])
    top = None
    if params.logprobs is not None:
        top = {token: Logprob(token_logprob, rank=int((logprobs > logprobs[token]).sum()) + 1)}
        if params.logprobs > 0:
            values, ids = logprobs.topk(params.logprobs)
            for rank, (value, token_id) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
                top.setdefault(token_id, Logprob(value, rank=rank))
    return token, token_logprob, top
