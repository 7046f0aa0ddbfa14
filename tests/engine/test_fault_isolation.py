"""A request that fails inside a step ends alone: the rest of its batch finishes with the tokens it would
have had without it, the engine keeps stepping, and no KV block is left behind."""

from __future__ import annotations

import asyncio

import pytest

from nemolite import SamplingParams
from nemolite.engine import llm_engine
from nemolite.engine.async_llm import AsyncLLM, RequestFailedError
from nemolite.errors import NemoliteError
from tests.conftest import DEVICE

PROMPTS = ["the model returns a value", "python reads files", "numbers like 42 and 1024 stay", "the list is empty"]
BAD_PROMPT = "each line ends with a newline character"


def params_for(index: int) -> SamplingParams:
    if index % 2:
        return SamplingParams(temperature=0.9, top_p=0.95, seed=100 + index, max_tokens=12, ignore_eos=True)
    return SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)


class Boom(RuntimeError):
    pass


def _inject(monkeypatch, engine, where: str, bad_params: SamplingParams) -> None:
    """Make the step fail at ``where`` whenever the bad request takes part, from its third step on."""
    calls = {"count": 0}

    def armed(seqs) -> bool:
        if any(seq.params is bad_params for seq in seqs):
            calls["count"] += 1
            return calls["count"] > 2
        return False

    if where == "forward":
        execute = engine.runner.execute
        monkeypatch.setattr(engine.runner, "execute",
                            lambda batch: (_ for _ in ()).throw(Boom("forward")) if armed([s for s, _ in batch])
                            else execute(batch))
    elif where == "sampler":
        sample = llm_engine.sample

        def failing_sample(logits, params, generators, banned=None):
            if any(p is bad_params for p in params) and armed([type("S", (), {"params": p}) for p in params]):
                raise Boom("sampler")
            return sample(logits, params, generators, banned)

        monkeypatch.setattr(llm_engine, "sample", failing_sample)
    elif where == "penalties":
        apply = llm_engine.apply_penalties

        def failing_penalties(row, params, prompt_ids, output_ids):
            if params is bad_params and len(output_ids) > 2:
                raise Boom("penalties")
            return apply(row, params, prompt_ids, output_ids)

        monkeypatch.setattr(llm_engine, "apply_penalties", failing_penalties)
    elif where == "detokenizer":
        append = engine.output_processor.append_token

        def failing_append(seq, token, logprob, top, full):
            if seq.params is bad_params and seq.num_output_tokens > 2:
                raise Boom("detokenizer")
            return append(seq, token, logprob, top, full)

        monkeypatch.setattr(engine.output_processor, "append_token", failing_append)


def _run_all(engine, requests) -> tuple[dict, dict]:
    outputs, errors = {}, {}
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, engine.tokenizer.encode(prompt), params)
    for _ in range(500):
        if not engine.has_unfinished_requests():
            break
        for request, finished in engine.step_requests():
            if request.error is not None:
                errors[request.request_id] = request.error
            elif finished:
                outputs[request.request_id] = request.output(True)
    return outputs, errors


@pytest.fixture(scope="module")
def expected(nemotron_llm):
    outputs, errors = _run_all(nemotron_llm.engine, {str(i): (p, params_for(i)) for i, p in enumerate(PROMPTS)})
    assert not errors
    return {key: (o.outputs[0].token_ids, o.outputs[0].text) for key, o in outputs.items()}


@pytest.mark.parametrize("where", ["forward", "sampler", "penalties", "detokenizer"])
def test_failing_request_ends_alone(nemotron_llm, expected, monkeypatch, where):
    engine = nemotron_llm.engine
    bad = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.2)
    _inject(monkeypatch, engine, where, bad)
    requests = {str(i): (p, params_for(i)) for i, p in enumerate(PROMPTS)}
    requests["bad"] = (BAD_PROMPT, bad)
    outputs, errors = _run_all(engine, requests)
    assert list(errors) == ["bad"] and isinstance(errors["bad"], Boom)
    assert {key: (o.outputs[0].token_ids, o.outputs[0].text) for key, o in outputs.items()} == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()


def test_engine_fault_still_stops_the_step(nemotron_llm, monkeypatch):
    engine = nemotron_llm.engine
    monkeypatch.setattr(engine.runner, "execute", lambda batch: (_ for _ in ()).throw(MemoryError()))
    engine.add_request("oom", None, [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(MemoryError):
        engine.step_requests()
    engine.abort_request("oom")
    monkeypatch.undo()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("field, value", [("stop_token_ids", [999999]), ("logit_bias", {999999: 1.0}),
                                          ("allowed_token_ids", [5, 10**6]), ("logprobs", 10**6),
                                          ("prompt_logprobs", 21), ("n", 10**6), ("stop", ["x"] * 1000),
                                          ("stop", ["x" * 10_000])])
def test_admission_checks_every_field_against_the_model(nemotron_llm, field, value):
    with pytest.raises(NemoliteError, match=field if field not in ("n", "stop") else "at most|longer"):
        nemotron_llm.engine.validate_request([1, 2, 3], SamplingParams(**{field: value}))


def test_async_engine_fails_one_request_and_goes_on(nemotron_dir, monkeypatch):
    engine = AsyncLLM(nemotron_dir, dtype="float32", device=DEVICE, kv_cache_gb=0.05)
    bad = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    _inject(monkeypatch, engine.engine, "detokenizer", bad)
    tokens = engine.tokenizer.encode(PROMPTS[0])

    async def run():
        async def final(params):
            last = None
            async for last in engine.generate(tokens, params, stream=False):
                pass
            return last

        return await asyncio.gather(final(SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)), final(bad),
                                    return_exceptions=True)

    try:
        good, failed = asyncio.run(run())
        assert isinstance(failed, RequestFailedError) and "Boom" in str(failed)
        assert len(good.outputs[0].token_ids) == 20 and engine.dead is None
        again = asyncio.run(run())[0]  # the engine still serves
        assert again.outputs[0].token_ids == good.outputs[0].token_ids
        assert engine.num_requests == 0 and engine.num_sequences == 0
    finally:
        engine.shutdown()
