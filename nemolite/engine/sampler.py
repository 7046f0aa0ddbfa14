"""Turns the logits of a step into next tokens, each row with its own SamplingParams.

Penalties (repetition as NeMo/HF apply it, OpenAI presence/frequency), ``min_tokens``
banning, then greedy or temperature + top-k + top-p + min-p sampling. Sampling inverts the
cumulative distribution at a uniform drawn from each sequence's own generator, so a row's token
depends only on its logits and seed, never on what else shares the batch. On the CPU the filters
and the draw run in one kernel (cpu_kernels ``sample_rows``: a histogram instead of ranking the
vocabulary) that draws the same tokens as the torch path below, which CUDA uses.
"""

from __future__ import annotations

from collections.abc import Sequence as Rows

import torch

from nemolite.engine.outputs import Logprob
from nemolite.engine.sampling_params import SamplingParams
from nemolite.model import cpu_kernels

# (token id, its logprob, {token: Logprob} when logprobs were asked, the [V] logprob row when full_logprobs)
SampleResult = tuple[int, float, "dict[int, Logprob] | None", "torch.Tensor | None"]


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def needs_processing(params: SamplingParams) -> bool:
    """Whether ``apply_penalties`` changes anything for ``params``."""
    return (params.repetition_penalty != 1.0 or bool(params.presence_penalty) or bool(params.frequency_penalty)
            or bool(params.logit_bias) or params.allowed_token_ids is not None)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> None:
    """In place on one row [V]: the penalties, then OpenAI's logit_bias, then vLLM's allowed_token_ids."""
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({t for t in (*prompt_ids, *output_ids) if t < vocab}), dtype=torch.long,
                            device=logits.device)
        if seen.numel():
            chosen = logits[seen]
            logits[seen] = torch.where(chosen > 0, chosen / params.repetition_penalty,
                                       chosen * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=vocab)[:vocab].float()
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=logits.device)
        logits.index_add_(0, ids, torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype,
                                               device=logits.device))
    if params.allowed_token_ids is not None:
        allowed = torch.tensor(params.allowed_token_ids, dtype=torch.long, device=logits.device)
        kept = logits[allowed]
        logits.fill_(float("-inf"))
        logits[allowed] = kept


# Top-p usually stops within the few dozen likeliest tokens: rank those, then more only if needed.
# torch's CPU topk changes method above k=64: 0.14 ms for k=64 and 1.5 ms for k=256 over [16, 4096].
TOP_P_HEADS = (64, 256)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """logits [S, V] (already divided by temperature), top_k [S] (0 = off), top_p [S], min_p [S]:
    the logits with the tokens that top-k, then top-p, then min-p exclude set to -inf."""
    if bool((top_k > 0).any()) or bool((top_p < 1.0).any()):
        logits = _top_k_top_p(logits, top_k, top_p, TOP_P_HEADS)
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 widths: tuple[int, ...]) -> torch.Tensor:
    """Rank only the ``widths[0]`` most likely tokens of each row; where top-k or top-p already ends
    inside them (the usual case) nothing else can survive and that is exact. The other rows try the
    next width, and finally rank all; so a row's result never depends on the rows beside it."""
    vocab = logits.shape[-1]
    width = min(widths[0], vocab) if widths else vocab
    ranked_logits, order = logits.topk(width, dim=-1) if width < vocab else logits.sort(dim=-1, descending=True)
    limit = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    cut = limit < vocab  # top-k removes tokens
    nucleus = top_p < 1.0  # top_p 1 is off: rounding must not cut the tail of the distribution
    drop = torch.arange(width, device=logits.device)[None, :] >= limit[:, None]
    # Probabilities renormalised over the top-k survivors (over all V tokens when top-k cuts none).
    normaliser = torch.where(cut, ranked_logits.masked_fill(drop, float("-inf")).logsumexp(-1),
                             logits.logsumexp(-1))
    probs = (ranked_logits - normaliser[:, None]).exp().masked_fill(drop, 0.0)
    unfiltered = ~cut & ~nucleus
    # A token goes when the tokens ranked above it already reach top_p; the first always stays.
    drop |= nucleus[:, None] & ((probs.cumsum(-1) - probs) >= top_p[:, None])
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(1, order, ~drop)
    keep |= unfiltered[:, None]
    filtered = logits.masked_fill(~keep, float("-inf"))
    if width < vocab:
        # Exact when: nothing is filtered; top-k's survivors are all ranked (the normaliser is theirs);
        # or top-k cuts nothing and top-p ends inside the ranked tokens.
        resolved = unfiltered | (cut & (limit <= width)) | (~cut & nucleus & (probs.sum(-1) >= top_p))
        unresolved = (~resolved).nonzero()[:, 0]
        if unresolved.numel():
            filtered[unresolved] = _top_k_top_p(logits[unresolved], top_k[unresolved], top_p[unresolved], widths[1:])
    return filtered


def draw(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
         min_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """A token per row of logits [S, V]: temperature, the filters, then the token where the cumulative
    distribution (in token order) passes uniforms[i] in [0, 1). On the CPU one kernel does it without
    ranking the vocabulary (0.24 instead of 1.8 ms at [16, 4096] with top-p), the same tokens."""
    if logits.device.type == "cpu" and cpu_kernels.has("sample_rows"):
        return torch.ops.nemolite.sample_rows(logits, temperature, top_k, top_p, min_p, uniforms)
    return draw_with_torch(logits, temperature, top_k, top_p, min_p, uniforms)


def draw_with_torch(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    min_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    cumulative = filter_logits(logits / temperature[:, None], top_k, top_p, min_p).softmax(-1).cumsum(-1)
    drawn = torch.searchsorted(cumulative, uniforms[:, None] * cumulative[:, -1:], right=True)[:, 0]
    return drawn.clamp(max=logits.shape[-1] - 1)


def argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's argmax and logsumexp (fp32 [S, V]); on the CPU one pass of one kernel per row."""
    if logits.device.type == "cpu" and logits.shape[-1] and cpu_kernels.has("greedy_rows"):
        return torch.ops.nemolite.greedy_rows(logits)
    return logits.argmax(-1), logits.logsumexp(-1)


def sample(logits: torch.Tensor, params: Rows[SamplingParams], generators: Rows[torch.Generator],
           banned_ids: Rows[list[int] | None] | None = None) -> list[SampleResult]:
    """logits [S, V] -> a SampleResult per row.

    ``banned_ids[i]`` (EOS and stop tokens before ``min_tokens``) can never be drawn in row i.
    Logprobs are those of the model's distribution after penalties, before temperature.
    """
    logits = logits.float()
    if banned_ids is not None and any(banned_ids):
        logits = logits.clone()
        for row, banned in enumerate(banned_ids):
            if banned:
                logits[row, banned] = float("-inf")
    sampled_rows = [row for row, p in enumerate(params) if not p.greedy]
    tokens, logsumexp = argmax_logsumexp(logits)
    if sampled_rows:
        device = logits.device
        rows = torch.tensor(sampled_rows, device=device)
        chosen = [params[row] for row in sampled_rows]
        temperature = torch.tensor([p.temperature for p in chosen], device=device)
        top_k = torch.tensor([min(max(p.top_k, 0), logits.shape[-1]) for p in chosen], device=device)
        top_p = torch.tensor([p.top_p for p in chosen], device=device)
        min_p = torch.tensor([p.min_p for p in chosen], device=device)
        # Inverse-CDF sampling: one uniform draw per row from its own generator (an exponential race
        # drew V of them per row and cost more than the rest of the sampler at batch 10).
        uniforms = torch.cat([torch.rand(1, generator=generators[row], device=device) for row in sampled_rows])
        tokens[rows] = draw(logits[rows], temperature, top_k, top_p, min_p, uniforms)
    token_list = tokens.tolist()
    # Whole rows of logprobs (4 V bytes written a row, ~70 us a step at V = 32000 on the 2-core CPU) only
    # for the requests that ask for them; another row's drawn token gets its logit less the row's
    # logsumexp. Each request's figures depend on its own parameters alone, never on its batch.
    row_logprobs = [row for row, p in enumerate(params) if p.logprobs is not None or p.full_logprobs]
    logprobs = dict(zip(row_logprobs, logits[row_logprobs].log_softmax(-1))) if row_logprobs else {}
    token_logprobs = (logits.gather(1, tokens[:, None])[:, 0] - logsumexp).tolist() \
        if len(row_logprobs) < len(params) else None
    results = []
    for row, token in enumerate(token_list):
        wanted = params[row].logprobs
        if row in logprobs:
            value = float(logprobs[row][token])
            top = None if wanted is None else logprob_entry(logprobs[row], token, wanted)
            full = logprobs[row].to("cpu", copy=True) if params[row].full_logprobs else None
        else:
            value, top, full = token_logprobs[row], None, None
        results.append((token, value, top, full))
    return results


def logprob_entry(logprobs: torch.Tensor, token: int, top_n: int) -> dict[int, Logprob]:
    """{token: its Logprob with rank} plus the ``top_n`` most likely tokens, from one row [V] of logprobs."""
    value = logprobs[token]
    entry = {token: Logprob(float(value), rank=int((logprobs > value).sum()) + 1)}
    if top_n > 0:
        values, ids = logprobs.topk(top_n)
        for rank, (top_value, token_id) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            entry.setdefault(token_id, Logprob(top_value, rank=rank))
    return entry
