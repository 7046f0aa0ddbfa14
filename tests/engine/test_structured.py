"""Structured output in the engine (nemolite.engine.structured): vocabulary, masks, per-sequence matchers,
preemption, compile cache, failure isolation."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nemolite import LLM, SamplingParams
from nemolite.engine import structured
from nemolite.engine.structured import (GrammarCompiler, MaskFiller, StructuredOutputs, allowed_tokens,
                                        apply_token_bitmask, tighten_schema)
from nemolite.errors import NemoliteError
from nemolite.tokenizer import Tokenizer

from tests.conftest import DEVICE

RECORD = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def llm():
    return LLM(None, dtype="float32", device=DEVICE)


@pytest.fixture(scope="module")
def tokenizer(llm) -> Tokenizer:
    return llm.tokenizer


def mask_of(tokenizer, matcher) -> torch.Tensor:
    bitmask = MaskFiller(tokenizer.vocab_size, torch.device("cpu")).start([matcher]).result()
    return allowed_tokens(bitmask, tokenizer.vocab_size)[0]


@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20))
def test_sentencepiece_tokens_spell_exactly_the_text(tokenizer, text):
    vocab = structured._SentencePieceVocab(tokenizer)
    ids = vocab(text)
    assert b"".join(vocab.tokens[i] for i in ids) == text.encode()


def test_special_tokens_are_never_allowed_inside_structured_output(tokenizer):
    special = tokenizer.special_token_ids()
    assert {0, 1, 2, 3, 4, 5, 6} <= special  # <pad> <unk> <s> </s> <extra_id_0..2> of the demo tokenizer
    compiler = GrammarCompiler(tokenizer)
    matcher = compiler.new_matcher(StructuredOutputs(json={"type": "string"}))
    spell = structured._SentencePieceVocab(tokenizer)  # token ids of exactly a text (no dummy-prefix space)
    assert matcher.consume_token(tokenizer.token_to_id("<0x22>"))
    inside = mask_of(tokenizer, matcher)
    assert inside.sum() > 1000  # nearly any piece may follow inside a string...
    assert not inside[sorted(special)].any()  # ...but no special one, EOS included (the string is open)
    for token in spell('hello"'):
        assert matcher.consume_token(token)
    assert matcher.is_stopped()


def test_json_whitespace_is_bounded_and_values_may_start_with_a_spaced_piece(tokenizer):
    compiler = GrammarCompiler(tokenizer)
    matcher = compiler.new_matcher(StructuredOutputs(json=RECORD))
    allowed = mask_of(tokenizer, matcher)
    pieces = {tokenizer.convert_ids_to_tokens([i])[0] for i in allowed.nonzero()[:, 0].tolist()}
    assert pieces and all(p.lstrip("\u2581").startswith("{") or p == "<0x7B>" for p in pieces)
    for token in structured._SentencePieceVocab(tokenizer)('{"name":'):
        assert matcher.consume_token(token)
    allowed = mask_of(tokenizer, matcher)
    texts = {tokenizer.decode([i]) or tokenizer.convert_ids_to_tokens([i])[0] for i in allowed.nonzero()[:, 0].tolist()}
    space = tokenizer.token_to_id("\u2581")
    assert allowed[space]  # one space after ':' ...
    assert matcher.consume_token(space)
    allowed = mask_of(tokenizer, matcher)
    assert not allowed[space] and not allowed[tokenizer.token_to_id("<0x20>")]  # ... and no second one
    assert texts  # the spaced quote piece '▁"' starts the value directly
    assert allowed[tokenizer.token_to_id("<0x22>")]


def test_sampled_answers_validate_and_each_sequence_has_its_own_matcher(llm):
    params = SamplingParams(n=4, temperature=0.8, seed=11, max_tokens=120, structured_outputs={"json": RECORD})
    outputs = llm.generate(["A record:", "Another record:"], params, use_tqdm=False)
    texts = [o.text for output in outputs for o in output.outputs]
    for output in outputs:
        for completion in output.outputs:
            assert completion.finish_reason == "stop"
            assert completion.token_ids[-1] not in llm.tokenizer.eos_token_ids  # it ended as the JSON did
            jsonschema.validate(json.loads(completion.text), RECORD)
    assert len(set(texts)) > 1


def test_choice_regex_and_grammars(llm):
    def one(spec, prompt="Answer:"):
        return llm.generate([prompt], SamplingParams(temperature=0.8, seed=2, max_tokens=40, structured_outputs=spec),
                            use_tqdm=False)[0].outputs[0]

    assert one({"choice": ["alpha", "beta gamma"]}).text in ("alpha", "beta gamma")
    assert one({"regex": r"[0-9]{3}-[a-z]{2}"}).text[3] == "-"
    assert re.fullmatch(r"yes|no|x[0-9]{2}", one({"grammar": 'start: "yes" | "no" | "x" NUM\nNUM: /[0-9]{2}/'}).text)
    lark = one({"grammar": 'start: "(" WORD ")"\nWORD: /[a-z]{1,5}/'}).text
    assert lark.startswith("(") and lark.endswith(")") and lark[1:-1].isalpha()
    gbnf = one({"grammar": 'root ::= "<" [a-c]+ ">"'}).text
    assert gbnf.startswith("<") and gbnf.endswith(">") and set(gbnf[1:-1]) <= set("abc")
    assert one({"json_object": True}).text.startswith("{")


def test_preempted_constrained_sequences_still_validate():
    small = LLM(None, dtype="float32", device=DEVICE, block_size=4, kv_cache_gb=28 * 4 * 6 * 2 * 2 * 64 * 4 / 1e9)
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=60, structured_outputs={"json": RECORD})
    outputs = small.generate([f"Record {i}:" for i in range(6)], params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    for output in outputs:
        jsonschema.validate(json.loads(output.outputs[0].text), RECORD)


def test_a_grammar_compiles_once(llm, monkeypatch):
    compiler = GrammarCompiler(llm.tokenizer)
    built = []
    original = compiler._build
    monkeypatch.setattr(compiler, "_build", lambda spec: built.append(spec.key) or original(spec))
    for _ in range(3):
        compiler.new_matcher(StructuredOutputs(json=RECORD))
        compiler.new_matcher(StructuredOutputs(json=json.dumps(RECORD)))  # the same schema as text
    compiler.new_matcher(StructuredOutputs(regex="a+"))
    assert len(built) == 2


@pytest.mark.parametrize("spec, words", [
    ({"json": {"type": "strin"}}, "Invalid type"),
    ({"json": {"not": {"type": "string"}}}, "Unimplemented"),
    ({"json": {"enum": []}}, "JSON schema"),
    ({"regex": "(abc"}, "regex"),
    ({"grammar": "start: foo"}, "grammar"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": {"type": "integer"}, "regex": "a"}, "exactly one"),
    ({}, "exactly one"),
    ({"choice": ["a", 3]}, "choice"),
    ({"schema": {}}, "unknown fields"),
])
def test_bad_specs_name_the_problem(llm, spec, words):
    with pytest.raises(NemoliteError, match=words):
        llm.generate(["x"], SamplingParams(max_tokens=5, structured_outputs=spec), use_tqdm=False)


def test_a_request_the_grammar_cannot_satisfy_fails_alone(llm):
    engine = llm.engine
    digits_only = SamplingParams(temperature=0.8, max_tokens=10, structured_outputs={"regex": "[0-9]+"},
                                 allowed_token_ids=[llm.tokenizer.token_to_id("\u2581the")])
    good = SamplingParams(temperature=0.8, seed=1, max_tokens=60, structured_outputs={"json": RECORD})
    engine.add_request("bad", None, llm.tokenizer.encode("x"), digits_only)
    engine.add_request("good", None, llm.tokenizer.encode("y"), good)
    results = {}
    while engine.has_unfinished_requests():
        for request, finished in engine.step_requests():
            if finished:
                results[request.request_id] = request
    assert isinstance(results["bad"].error, NemoliteError) and "grammar" in str(results["bad"].error)
    assert results["good"].error is None
    jsonschema.validate(json.loads(results["good"].seqs[0].output.text), RECORD)


def test_the_mask_kernel_equals_the_torch_path():
    generator = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 5), dtype=torch.int32, generator=generator)
    for dtype in (torch.float32, torch.bfloat16):
        for vocab in (150, 160, 170):  # fewer, as many and more tokens than the bitmask's 160 bits
            logits = torch.randn(4, vocab, generator=generator).to(dtype)
            expected = logits.clone()
            expected[[2, 0, 3]] = expected[[2, 0, 3]].masked_fill(~allowed_tokens(bitmask, vocab), float("-inf"))
            apply_token_bitmask(logits, bitmask, [2, 0, 3])
            assert torch.equal(logits, expected)


def test_listed_properties_close_an_object_unless_the_schema_opens_it():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"x": {"type": "string"}}},
                                               "b": {"type": "object", "properties": {}, "additionalProperties": True},
                                               "c": {"allOf": [{"properties": {"p": {}}}, {"properties": {"q": {}}}]},
                                               "d": {"type": "object"}}}
    tightened = tighten_schema(schema)
    assert tightened["additionalProperties"] is False
    properties = tightened["properties"]
    assert properties["a"]["additionalProperties"] is False
    assert properties["b"]["additionalProperties"] is True
    assert all("additionalProperties" not in member for member in properties["c"]["allOf"])
    assert properties["d"] == {"type": "object"}


def test_unbounded_numbers_get_bounds_and_given_ones_stay():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "number", "minimum": 2},
                                               "c": {"type": ["integer", "null"], "maximum": -10**16},
                                               "d": {"enum": [{"type": "integer"}]}}}
    bounded = tighten_schema(schema)["properties"]
    assert bounded["a"] == {"type": "integer", "maximum": 10**15, "minimum": -10**15}
    assert bounded["b"] == {"type": "number", "minimum": 2, "maximum": 10**15}
    assert bounded["c"] == {"type": ["integer", "null"], "maximum": -10**16}  # a lower bound would contradict it
    assert bounded["d"] == {"enum": [{"type": "integer"}]}  # data, not a schema


def test_json_near_its_token_budget_is_steered_to_close(llm):
    schema = {"type": "object", "required": ["summary", "items"],
              "properties": {"summary": {"type": "string"}, "items": {"type": "array", "items": {"type": "string"}}}}
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Summarise as JSON."}])
    outputs = llm.generate([prompt], SamplingParams(n=8, temperature=0.8, seed=7, max_tokens=40,
                                                    structured_outputs={"json": schema}), use_tqdm=False)[0].outputs
    for completion in outputs:  # unsteered, most of these wrote the summary string until max_tokens
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), schema)
    regex = llm.generate([prompt], SamplingParams(temperature=0.8, seed=7, max_tokens=12,
                                                  structured_outputs={"regex": "[a-z]{300}"}), use_tqdm=False)
    assert regex[0].outputs[0].finish_reason == "length"  # only JSON is steered


@pytest.mark.parametrize("text, inside", [('{"a": "x', True), ('{"a": "x\\"', True), ('{"a": "x\\\\"', False),
                                          ('{"a": "x"', False), ('["a", "', True), ("", False)])
def test_the_json_string_scan(text, inside):
    whole = structured.SequenceGrammar(None, is_json=True)
    assert whole.in_string(text) is inside
    grown = structured.SequenceGrammar(None, is_json=True)  # fed as the text grows, a character at a time
    assert [grown.in_string(text[:end]) for end in range(len(text) + 1)][-1] is inside
