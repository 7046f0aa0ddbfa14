from __future__ import annotations

import pytest
import torch

from nemolite import LLM, SamplingParams
from nemolite.errors import NemoliteError
from tests.conftest import DEVICE

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPT = "the model returns a value"


def test_greedy_generate_equals_transformers(nemotron_llm, nemotron_dir):
    from transformers import AutoModelForCausalLM

    [result] = nemotron_llm.generate(PROMPT, GREEDY)
    reference = AutoModelForCausalLM.from_pretrained(nemotron_dir, dtype=torch.float32)
    ids = torch.tensor([result.prompt_token_ids])
    expected = reference.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert result.prompt == PROMPT and result.prompt_token_ids[0] == 2  # BOS
    assert result.outputs[0].token_ids == expected[0, ids.shape[1]:].tolist()
    assert result.outputs[0].finish_reason == "length"
    assert result.outputs[0].text == nemotron_llm.tokenizer.decode(result.prompt_token_ids + result.outputs[0].token_ids)[
        len(nemotron_llm.tokenizer.decode(result.prompt_token_ids)):]


def test_prompt_token_ids_and_params_per_prompt(nemotron_llm):
    ids = nemotron_llm.tokenizer.encode(PROMPT)
    results = nemotron_llm.generate(prompt_token_ids=[ids, ids[:3]],
                                    sampling_params=[GREEDY, SamplingParams(temperature=0, max_tokens=3)],
                                    use_tqdm=False)
    assert [r.prompt for r in results] == [None, None]
    assert results[0].outputs[0].token_ids == nemotron_llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    assert len(results[1].outputs[0].token_ids) <= 3


def test_seeded_sampling_is_reproducible(nemotron_llm):
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=11, ignore_eos=True)
    first = nemotron_llm.generate([PROMPT, PROMPT], params, use_tqdm=False)
    again = nemotron_llm.generate(PROMPT, params)
    assert first[0].outputs[0].token_ids == first[1].outputs[0].token_ids == again[0].outputs[0].token_ids
    other = nemotron_llm.generate(PROMPT, SamplingParams(temperature=1.0, max_tokens=16, seed=12, ignore_eos=True))
    assert other[0].outputs[0].token_ids != first[0].outputs[0].token_ids


def test_unseeded_requests_differ_but_llm_seed_reproduces(nemotron_dir, nemotron_llm):
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    a, b = nemotron_llm.generate([PROMPT, PROMPT], params, use_tqdm=False)
    assert a.outputs[0].token_ids != b.outputs[0].token_ids
    fresh = [LLM(nemotron_dir, dtype="float32", device=DEVICE, seed=5) for _ in range(2)]
    assert fresh[0].generate(PROMPT, params)[0].outputs[0].token_ids == \
        fresh[1].generate(PROMPT, params)[0].outputs[0].token_ids


def test_n_completions(nemotron_llm):
    [result] = nemotron_llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=1,
                                                            ignore_eos=True))
    assert [o.index for o in result.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in result.outputs}) > 1


def test_stop_token_and_min_tokens(nemotron_llm):
    first = nemotron_llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids[0]
    stopped = nemotron_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[first]))
    assert stopped[0].outputs[0].token_ids == [first]
    assert stopped[0].outputs[0].finish_reason == "stop" and stopped[0].outputs[0].stop_reason == first
    held = nemotron_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, min_tokens=4,
                                                        stop_token_ids=[first]))[0].outputs[0]
    assert first not in held.token_ids[:4] and len(held.token_ids) >= 4


def test_eos_ends_generation_unless_ignored(nemotron_llm):
    eos = nemotron_llm.tokenizer.eos_token_ids[0]
    bias = torch.zeros(nemotron_llm.config.vocab_size, device=DEVICE)
    bias[eos] = 1e3  # make EOS the model's favourite token
    hook = nemotron_llm.model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + bias)
    try:
        out = nemotron_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5))[0].outputs[0]
        held = nemotron_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5, min_tokens=2))[0].outputs[0]
        ignored = nemotron_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    finally:
        hook.remove()
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.stop_reason is None and out.text == ""
    assert len(held.token_ids) == 3 and eos not in held.token_ids[:2] and held.token_ids[2] == eos
    assert ignored[0].outputs[0].token_ids == [eos] * 5


def test_stop_string_is_removed(nemotron_llm):
    full = nemotron_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    assert stop.strip(), f"degenerate completion {full.text!r}"
    cut = nemotron_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                       stop=[stop]))[0].outputs[0]
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop


def test_streaming_deltas_add_up_to_the_text(nemotron_llm):
    pieces = []
    ids = nemotron_llm.tokenizer.encode(PROMPT)
    output = nemotron_llm.stream(ids, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=["zzzq"]),
                                 pieces.append)
    assert "".join(pieces) == output.text and len(pieces) > 1


def test_logprobs(nemotron_llm):
    [result] = nemotron_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))
    output = result.outputs[0]
    assert len(output.logprobs) == 4
    for token, entry in zip(output.token_ids, output.logprobs):
        assert entry[token].rank == 1 and len(entry) == 3
        assert entry[token].decoded_token == nemotron_llm.tokenizer.decode([token], skip_special_tokens=False)
    assert output.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(output.token_ids,
                                                                                       output.logprobs)))


def test_context_limits(nemotron_llm):
    context = nemotron_llm.config.max_position_embeddings
    with pytest.raises(NemoliteError, match="context"):
        nemotron_llm.generate(prompt_token_ids=[[5] * context])
    [result] = nemotron_llm.generate(prompt_token_ids=[[5] * (context - 3)],
                                     sampling_params=SamplingParams(max_tokens=100, ignore_eos=True))
    assert len(result.outputs[0].token_ids) == 3 and result.outputs[0].finish_reason == "length"
    [empty] = nemotron_llm.generate(PROMPT, SamplingParams(max_tokens=0))
    assert empty.outputs[0].token_ids == [] and empty.outputs[0].finish_reason == "length"


def test_chat_uses_the_nemotron_format(nemotron_llm):
    [result] = nemotron_llm.chat([{"role": "user", "content": "Hey how are you?"}],
                                 SamplingParams(temperature=0, max_tokens=6))
    assert result.prompt == "<extra_id_0>System\n\n<extra_id_1>User\nHey how are you?\n<extra_id_1>Assistant\n"
    assert result.prompt_token_ids[0] != nemotron_llm.tokenizer.bos_token_id
    assert "<extra_id_1>" not in result.outputs[0].text
    two = nemotron_llm.chat([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]])
    assert len(two) == 2


@pytest.mark.parametrize("call, message", [
    (lambda llm: llm.generate(), "prompts"),
    (lambda llm: llm.generate(["a"], prompt_token_ids=[[1]]), "not both"),
    (lambda llm: llm.generate([1, 2]), "string"),
    (lambda llm: llm.generate(prompt_token_ids=[[10**9]]), r"ids in \[0, 320\)"),
    (lambda llm: llm.generate(["a", "b"], [SamplingParams()] * 3), "3 SamplingParams for 2 prompts"),
])
def test_bad_calls_raise_clear_errors(nemotron_llm, call, message):
    with pytest.raises(NemoliteError, match=message):
        call(nemotron_llm)


def test_llama_checkpoint_generates_with_its_template(llama_dir):
    llm = LLM(llama_dir, dtype="float32", device=DEVICE)
    assert llm.tokenizer.eos_token_ids == [4]
    [result] = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4))
    assert result.prompt.startswith("<|begin_of_text|><|start_header_id|>user")
    assert result.prompt_token_ids.count(0) == 1


def test_unknown_model_path():
    with pytest.raises(NemoliteError, match="not a local path"):
        LLM("nvidia/Nemotron-4-340B-Instruct")
