from __future__ import annotations

import math

import pytest
import torch

from nemolite import SamplingParams
from nemolite.engine.sampler import apply_penalties, draw_with_torch, filter_logits, make_generator, sample
from nemolite.errors import NemoliteError

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def draws(params: SamplingParams, count: int = 400, seed: int = 0) -> list[int]:
    generator = make_generator(seed, "cpu")
    return [sample(LOGITS[None], [params], [generator])[0][0] for _ in range(count)]


def sample_one(params: SamplingParams, banned=None):
    return sample(LOGITS[None], [params], [make_generator(0, "cpu")], [banned])[0]


def test_greedy_takes_the_argmax():
    assert set(draws(SamplingParams(temperature=0), 20)) == {0}


def test_plain_sampling_follows_the_distribution():
    counts = torch.bincount(torch.tensor(draws(SamplingParams(temperature=1.0), 4000)), minlength=4) / 4000
    assert (counts - PROBS).abs().max() < 0.03


@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(top_k=2), {0, 1}),
    (SamplingParams(top_k=1, temperature=5.0), {0}),
    (SamplingParams(top_p=0.7), {0, 1}),
    (SamplingParams(top_p=0.81), {0, 1, 2}),
    (SamplingParams(min_p=0.5), {0, 1}),
])
def test_filters_limit_the_support(params, allowed):
    seen = set(draws(params))
    assert seen == allowed


def reference_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """top-k then top-p over one fully sorted row, the definition."""
    sorted_logits, order = logits.sort(descending=True)
    keep = torch.ones_like(logits, dtype=torch.bool)
    if top_k > 0:
        keep[order[top_k:]] = False
    probs = sorted_logits.masked_fill(~keep[order], float("-inf")).softmax(-1)
    before = probs.cumsum(-1) - probs
    if top_p < 1.0:
        keep[order[before >= top_p]] = False
    return logits.masked_fill(~keep, float("-inf"))


@pytest.mark.parametrize("scale", [8.0, 0.05])  # peaked rows (top-p ends early) and flat ones (it does not)
def test_top_k_top_p_equal_a_full_sort(scale):
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(24, 4096, generator=generator) * scale
    top_k = torch.tensor([0, 5, 300, 4096, 0, 1] * 4)
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.99, 0.999, 0.3, 1.0, 0.95] * 3)
    got = filter_logits(logits, top_k, top_p, torch.zeros(24))
    for row in range(24):
        expected = reference_filter(logits[row], int(top_k[row]), float(top_p[row]))
        assert torch.equal(got[row].isinf(), expected.isinf()), row
        # Alone too: a row whose top-k keeps more than the ranked head must not be decided by it.
        alone = filter_logits(logits[row:row + 1], top_k[row:row + 1], top_p[row:row + 1], torch.zeros(1))
        assert torch.equal(alone[0].isinf(), expected.isinf()), row


@pytest.fixture(scope="module")
def sample_rows():
    from nemolite.model import cpu_kernels

    if not cpu_kernels.has("sample_rows"):
        pytest.skip("no AVX512 sampler kernel here: the torch path samples")
    return torch.ops.nemolite.sample_rows


@pytest.mark.parametrize("vocab", [4096, 50])
def test_cpu_kernel_draws_what_the_draw_with_torch(sample_rows, vocab):
    generator = torch.Generator().manual_seed(vocab)
    rows = 32
    for scale in (0.5, 2.0, 5.0, 20.0):
        logits = torch.randn(rows, vocab, generator=generator) * scale
        logits[::3, :3] = float("-inf")  # banned tokens
        temperature = torch.rand(rows, generator=generator) + 0.3
        top_k = torch.tensor([0, 5, 300, vocab, 0, 1, 40, 0] * 4).clamp(max=vocab)
        top_p = torch.tensor([0.9, 1.0, 0.5, 0.99, 0.999, 0.3, 1.0, 0.95] * 4)
        min_p = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.05, 0.0, 0.0, 0.2] * 4)
        uniforms = torch.rand(rows, generator=generator)
        got = sample_rows(logits, temperature, top_k, top_p, min_p, uniforms)
        assert torch.equal(got, draw_with_torch(logits, temperature, top_k, top_p, min_p, uniforms)), scale
        assert not (got[::3] < 3).any()


def test_cpu_kernel_breaks_ties_in_token_order(sample_rows):
    flat = torch.zeros(2000, 10)  # ten equal tokens: top-k 3 keeps 0-2; top-p 0.35 keeps 0-3 (0.3 < 0.35 before 3)
    ones, uniforms = torch.ones(2000), torch.rand(2000, generator=torch.Generator().manual_seed(0))
    top_k = sample_rows(flat, ones, torch.full((2000,), 3), ones, torch.zeros(2000), uniforms)
    top_p = sample_rows(flat, ones, torch.zeros(2000, dtype=torch.long), torch.full((2000,), 0.35), torch.zeros(2000),
                        uniforms)
    assert set(top_k.tolist()) == {0, 1, 2} and set(top_p.tolist()) == {0, 1, 2, 3}


def test_same_seed_same_tokens_and_other_seed_differs():
    params = SamplingParams(temperature=1.0)
    assert draws(params, 50, seed=7) == draws(params, 50, seed=7)
    assert draws(params, 50, seed=7) != draws(params, 50, seed=8)


def test_banned_ids_are_never_drawn():
    assert sample_one(SamplingParams(temperature=0), banned=[0])[0] == 1


def test_logprobs_of_sampled_and_top_tokens():
    token, logprob, top, _ = sample_one(SamplingParams(temperature=0, logprobs=2))
    assert token == 0 and math.isclose(logprob, math.log(0.5), rel_tol=1e-5)
    assert list(top) == [0, 1] and top[0].rank == 1 and top[1].rank == 2
    assert math.isclose(top[1].logprob, math.log(0.3), rel_tol=1e-5)
    token, _, top, _ = sample_one(SamplingParams(temperature=0, logprobs=0), banned=[0])
    assert list(top) == [token]


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                    dict(max_tokens=-1), dict(min_tokens=5, max_tokens=2), dict(stop=[""]),
                                    dict(n=0), dict(logprobs=-1), dict(temperature=float("nan")),
                                    dict(repetition_penalty=0), dict(presence_penalty=3), dict(seed=2**64),
                                    dict(logit_bias={5: float("inf")}), dict(logit_bias={5: 101}),
                                    dict(allowed_token_ids=[]), dict(stop_token_ids=[True]), dict(ignore_eos=1),
                                    dict(stop=5), dict(stop_token_ids=7)])
def test_invalid_params_are_rejected(kwargs):
    with pytest.raises(NemoliteError):
        SamplingParams(**kwargs)


def test_rows_are_independent_of_their_batch():
    params = [SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=0), SamplingParams(top_p=0.8)]
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    together = sample(logits, params, [make_generator(i, "cpu") for i in range(3)])
    alone = [sample(logits[i:i + 1], [params[i]], [make_generator(i, "cpu")])[0] for i in range(3)]
    assert [r[0] for r in together] == [r[0] for r in alone]


def test_repetition_penalty_follows_nemo():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    apply_penalties(logits, SamplingParams(repetition_penalty=2.0), [0], [1])
    assert logits.tolist() == [1.0, -4.0, 1.0, 0.5]


def test_presence_and_frequency_penalties_count_generated_tokens():
    logits = torch.zeros(4)
    apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [3], [1, 1, 2])
    assert logits.tolist() == [0.0, -1.0, -0.75, 0.0]
