"""Property-based fuzzing of every input route with hypothesis: bodies built from each route's field list,
each field valid, absent or replaced by a wrong value (wrong types, extremes, NaN/Infinity, unicode,
lone surrogates, deep nesting, numbers Python cannot read), and KServe binary bodies with lying sizes.

The property: no 5xx and no timeout, a 4xx carries a JSON error message, and the engine is alive after
every example; at the end nothing is left running and no KV block is held. ``derandomize`` makes every
run send the same examples. Examples are not shrunk: a case that kills the engine would make every
later one fail too, so each run collects all broken examples and reports them grouped by problem
(the engine is started again after a death, so the examples after it still count).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import struct

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from nemolite.engine.sampling_params import SamplingParams
from nemolite.kserve import DATATYPES, FIXED_WIDTH, HEADER_LENGTH, encode_bytes

from tests.server.conftest import MODEL_NAME, wait_until_idle
from tests.server.hostile import (INFER, REFERENCE_CONVERSATION, REFERENCE_PROMPT, REFERENCE_TOKENS, REWARD_INFER,
                                  VOCAB, Harness, Hostile, answer_problems, encode, health_problems, send)

EXAMPLES = 100
REWARD_EXAMPLES = 30
TIMEOUT = 30.0
MAX_RESTARTS = 3  # per route: each costs seconds, and after a few more deaths tell nothing new

SETTINGS = {"deadline": None, "derandomize": True, "database": None, "phases": [Phase.explicit, Phase.generate],
            "suppress_health_check": list(HealthCheck), "print_blob": False}


@dataclasses.dataclass(frozen=True)
class Raw:
    """JSON text written as is: literals json.dumps cannot produce (1e999999, 5,000-digit numbers, deep nesting)."""
    text: bytes


def to_json(value) -> bytes:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return b"{" + b", ".join(encode(str(key)) + b": " + to_json(item) for key, item in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b", ".join(to_json(item) for item in value) + b"]"
    return encode(value)


# ------------------------------------------------------------------------------------------- values

EXTREME_INTS = [-1, 0, 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1, 10**12, 10**30,
                VOCAB - 1, VOCAB, 999999, 1023, 1024, 1025, 128, 129, 20, 21]
INTS = st.one_of(st.integers(-3, 5), st.sampled_from(EXTREME_INTS), st.integers())
FLOATS = st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, -0.0, 5e-324, 1e-300]))
SURROGATES = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
TEXT = st.one_of(st.text(max_size=12), SURROGATES,
                 st.sampled_from(["", " ", "\x00", "\n", "é", "東京", "🙂", "<s>", "</s>", "<extra_id_1>",
                                  "\ufffd", "NaN", "1e999"]),
                 st.builds(lambda: "a" * 10_000))
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT)
JUNK = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)
RAW = st.one_of(st.integers(1, 3000).map(lambda depth: Raw(b"[" * depth + b"]" * depth)),
                st.integers(1, 2000).map(lambda depth: Raw(b'{"a": ' * depth + b"1" + b"}" * depth)),
                st.sampled_from([Raw(b"NaN"), Raw(b"Infinity"), Raw(b"-Infinity"), Raw(b"1e999999"),
                                 Raw(b"-1e999999"), Raw(b"1" + b"0" * 5000), Raw(b"-0"), Raw(b"0.0e0")]))
WRONG = st.one_of(JUNK, RAW)  # a value of the wrong type (or unreadable) for nearly any field
BOOL_EXTREMES = st.sampled_from([0, 1, "true", "false", None, [], {}])


def _slow(value) -> bool:
    """Whether a budget field (max_tokens ...) may read ``value`` as more than 4 tokens: such a request is
    valid but runs up to the context, too slow for many examples (hostile.py sends those)."""
    if isinstance(value, (list, tuple)):
        return any(_slow(item) for item in value)
    if isinstance(value, dict):
        return any(_slow(item) for item in value.values())
    if value is None:
        return True  # "up to the context" in OpenAI's max_tokens
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and value > 4


FAST_WRONG = WRONG.filter(lambda value: not _slow(value))


def weighted(*choices):
    """``one_of`` with weights, from (weight, strategy) pairs: hypothesis's one_of drops repeated branches."""
    slots = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(range(len(slots))).flatmap(lambda index: slots[index])


def spec(valid, extreme=None, extreme_weight: int = 1):
    """A field: its valid values, its extremes (the right type at the edges, or beyond them) and how often
    the extremes come (against 2 for valid values in a required field, 1 in an optional one)."""
    return valid, extreme if extreme is not None else valid, extreme_weight


@st.composite
def body(draw, required: dict, optional: dict, budget: frozenset = frozenset()):
    """A JSON object: required fields mostly valid, each optional one present or not and valid or extreme,
    then perhaps a field (or an unknown one) of the wrong type."""
    document = {}
    for name, (valid, extreme, extreme_weight) in required.items():
        document[name] = draw(weighted((2, valid), (extreme_weight, extreme)))
    for name, (valid, extreme, extreme_weight) in optional.items():
        if draw(st.booleans()):
            document[name] = draw(weighted((1, valid), (extreme_weight, extreme)))
    names = [*required, *optional, "unknown", ""]
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        name = draw(st.sampled_from(names))
        document[name] = draw(FAST_WRONG if name in budget else WRONG)
    return document


def grouped(required: dict, specs: dict, groups: list[list[str]], budget: frozenset = frozenset()):
    """Bodies of the required fields and one group of related optional ones ("!name": always there in that
    group): with every field of a route in play nearly every body would be refused for one of them
    before the code behind it runs."""
    def group_body(group):
        entries = [entry if isinstance(entry, tuple) else (entry, specs[entry.lstrip("!")]) for entry in group]
        always = {name[1:]: field for name, field in entries if name.startswith("!")}
        sometimes = {name: field for name, field in entries if not name.startswith("!")}
        return body({**required, **always}, sometimes, budget)

    return st.one_of(*(group_body(group) for group in groups))


def token_ids(min_size=1):
    return st.lists(st.integers(0, VOCAB - 1), min_size=min_size, max_size=6)


OUT_OF_VOCABULARY = [-1, VOCAB, VOCAB + 1, 999999, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63),
                     -(2**63) - 1, 10**12, 10**30]
# ids with at least one outside the vocabulary, anywhere in the list
EXTREME_IDS = st.tuples(st.lists(st.integers(0, VOCAB - 1), max_size=3), st.sampled_from(OUT_OF_VOCABULARY),
                        st.integers(0, 3)).map(lambda drawn: drawn[0][:drawn[2]] + [drawn[1]] + drawn[0][drawn[2]:])
SHORT_PROMPTS = st.sampled_from(["def f():", "Return the", "import os", "x = [1,", "hi", "é 東京 🙂", " "])
STOPS = spec(st.one_of(SHORT_PROMPTS, st.lists(SHORT_PROMPTS, max_size=3)),
             st.one_of(st.lists(TEXT, max_size=3), TEXT, st.builds(lambda: ["x"] * 2000)))
BUDGET = frozenset({"max_tokens", "max_completion_tokens", "tokens_to_generate"})
OPENAI_BUDGET = spec(st.integers(1, 4), st.sampled_from([-1, 0, 10**12, 2**63, 10**30, 1025, 1024]))
OPENAI_FIELDS = {
    "model": spec(st.just(MODEL_NAME), st.one_of(TEXT, st.just(None))),
    "temperature": spec(st.floats(0, 2), FLOATS), "top_p": spec(st.floats(0.01, 1), FLOATS),
    "top_k": spec(st.integers(-1, 50), INTS), "min_p": spec(st.floats(0, 1), FLOATS),
    "n": spec(st.integers(1, 3), st.sampled_from([0, -1, 128, 129, 10**6, 2**63])),
    "repetition_penalty": spec(st.floats(0.5, 2), FLOATS), "presence_penalty": spec(st.floats(-2, 2), FLOATS),
    "frequency_penalty": spec(st.floats(-2, 2), FLOATS),
    "min_tokens": spec(st.integers(0, 4), st.sampled_from([5, 10**12, -1, 2**63])), "stop": STOPS,
    "stop_token_ids": spec(token_ids(), EXTREME_IDS), "seed": spec(st.integers(-(2**63), 2**63 - 1), INTS),
    "ignore_eos": spec(st.booleans(), BOOL_EXTREMES), "stream": spec(st.booleans(), BOOL_EXTREMES),
    "stream_options": spec(st.fixed_dictionaries({"include_usage": st.booleans()}),
                           st.dictionaries(TEXT, SCALARS, max_size=2)),
    "logit_bias": spec(st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.floats(-100, 100), max_size=2),
                       st.dictionaries(st.one_of(INTS.map(str), TEXT), FLOATS, min_size=1, max_size=2)),
    "allowed_token_ids": spec(token_ids(), EXTREME_IDS),
    "user": spec(SHORT_PROMPTS, TEXT),
    "echo": spec(st.booleans(), BOOL_EXTREMES), "logprobs": spec(st.integers(0, 5), INTS),
    "best_of": spec(st.just(1), INTS), "suffix": spec(st.none(), TEXT),
    "max_completion_tokens": OPENAI_BUDGET, "top_logprobs": spec(st.integers(0, 5), INTS),
    "add_generation_prompt": spec(st.booleans(), BOOL_EXTREMES),
}
SAMPLING_GROUP = ["temperature", "top_p", "top_k", "min_p", "seed", "n", "repetition_penalty", "presence_penalty",
                  "frequency_penalty"]
# An out-of-vocabulary stop token id matters once min_tokens bans the stop ids: both always come here
IDS_GROUP = [("!stop_token_ids", spec(token_ids(), EXTREME_IDS, 4)),
             ("!min_tokens", spec(st.integers(1, 4), st.sampled_from([0, 5, 10**12, -1, 2**63]))), "ignore_eos", "n",
             "allowed_token_ids"]
PART = st.fixed_dictionaries({"type": st.just("text"), "text": SHORT_PROMPTS})
ODD_PART = st.fixed_dictionaries(
    {"type": weighted((2, st.just("text")), (1, st.sampled_from(["image_url", "input_audio", ""])), (1, SCALARS)),
     "text": weighted((2, SCALARS), (1, JUNK), (1, SHORT_PROMPTS))}, optional={"image_url": JUNK})
ROLES = st.sampled_from(["user", "assistant", "system"])
MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": st.one_of(SHORT_PROMPTS, st.lists(PART, min_size=1,
                                                                                           max_size=2))})
ODD_MESSAGE = st.fixed_dictionaries(
    {"role": weighted((3, ROLES), (1, st.sampled_from(["tool", "wizard", "", "USER"])), (1, SCALARS)),
     "content": weighted((3, st.lists(weighted((2, ODD_PART), (1, PART)), min_size=1, max_size=3)), (1, TEXT),
                         (1, JUNK))},
    optional={"name": TEXT, "tool_calls": JUNK})
MESSAGES = spec(st.lists(MESSAGE, min_size=1, max_size=3),
                st.lists(weighted((2, ODD_MESSAGE), (1, MESSAGE)), min_size=0, max_size=3))

COMPLETIONS = grouped(
    {"prompt": spec(st.one_of(SHORT_PROMPTS, st.lists(SHORT_PROMPTS, min_size=1, max_size=3), token_ids(),
                              st.lists(token_ids(), min_size=1, max_size=2)),
                    st.one_of(EXTREME_IDS, st.lists(EXTREME_IDS, max_size=2), st.lists(TEXT, max_size=3), TEXT)),
     "max_tokens": OPENAI_BUDGET},
    OPENAI_FIELDS, [IDS_GROUP + ["echo", "logprobs", "stream"],
                    ["!logit_bias", "allowed_token_ids", "logprobs", "temperature", "min_tokens", "stream"],
                    SAMPLING_GROUP,
                    ["stop", "stream", "stream_options", "echo", "logprobs", "suffix", "best_of", "user", "model",
                     "n"]],
    BUDGET)
CHAT = grouped(
    {"messages": MESSAGES, "max_tokens": OPENAI_BUDGET}, OPENAI_FIELDS,
    [IDS_GROUP + ["stream"], ["!logit_bias", "allowed_token_ids", "logprobs", "top_logprobs", "min_tokens", "stream"],
     SAMPLING_GROUP + ["max_completion_tokens"],
     ["stop", "stream", "stream_options", "n", "logprobs", "top_logprobs", "add_generation_prompt", "model", "user"]],
    BUDGET)
TOKENIZE_FLAGS = {"add_special_tokens": spec(st.booleans(), BOOL_EXTREMES),
                  "add_generation_prompt": spec(st.booleans(), BOOL_EXTREMES)}
TOKENIZE = st.one_of(body({"prompt": spec(SHORT_PROMPTS, TEXT)}, TOKENIZE_FLAGS),
                     body({"messages": MESSAGES}, TOKENIZE_FLAGS), body({}, {"prompt": spec(SHORT_PROMPTS, TEXT),
                                                                         "messages": MESSAGES}))
DETOKENIZE = body({"tokens": spec(token_ids(0), EXTREME_IDS)}, {})
NEMO_FIELDS = {
    "temperature": spec(st.floats(0.01, 2), FLOATS), "add_BOS": spec(st.booleans(), BOOL_EXTREMES),
    "top_k": spec(st.integers(0, 50), st.one_of(INTS, st.just(1e300))), "top_p": spec(st.floats(0, 1), FLOATS),
    "greedy": spec(st.booleans(), BOOL_EXTREMES), "all_probs": spec(st.booleans(), BOOL_EXTREMES),
    "compute_logprob": spec(st.booleans(), BOOL_EXTREMES), "repetition_penalty": spec(st.floats(1, 2), FLOATS),
    "min_tokens_to_generate": spec(st.integers(0, 4), st.sampled_from([10**9, 10**30, -1, 2**63])),
    "end_strings": spec(st.lists(SHORT_PROMPTS, max_size=3), st.lists(TEXT, max_size=3)),
    "random_seed": spec(st.one_of(st.none(), st.integers(0, 2**63 - 1)), INTS),
    "neighbors": spec(st.none(), INTS), "task_ids": spec(st.none(), JUNK)}
NEMO = grouped(
    {"sentences": spec(st.one_of(st.lists(SHORT_PROMPTS, min_size=1, max_size=3),
                                 st.lists(MESSAGES[0], min_size=1, max_size=2)),
                       st.lists(st.one_of(MESSAGES[1], TEXT), max_size=3)),
     # tokens_to_generate beyond the context is clamped to it (NeMo's rule): valid, so slow; not drawn here
     "tokens_to_generate": spec(st.integers(1, 4), st.sampled_from([0, -1, 4.0, 1e30, -(2**63)]))},
    NEMO_FIELDS, [["temperature", "top_k", "top_p", "greedy", "repetition_penalty", "random_seed"],
                  ["add_BOS", "all_probs", "compute_logprob", "min_tokens_to_generate", "end_strings", "neighbors",
                   "task_ids", "greedy"]],
    BUDGET)
CONVERSATION = spec(st.just(REFERENCE_CONVERSATION), MESSAGES[1])
REWARD_FIELDS = {"model": spec(st.just(MODEL_NAME), TEXT),
                 "attribute_weights": spec(st.lists(st.floats(-2, 2), min_size=9, max_size=9),
                                           st.one_of(st.lists(FLOATS, max_size=10),
                                                     st.dictionaries(st.sampled_from(["helpfulness", "verbosity", "x"]),
                                                                     FLOATS)))}
REWARD = st.one_of(
    body({"messages": CONVERSATION}, REWARD_FIELDS),
    body({"conversations": spec(st.lists(CONVERSATION[0], min_size=1, max_size=3),
                                st.lists(st.one_of(*CONVERSATION[:2]), max_size=3))}, REWARD_FIELDS),
    body({}, {"messages": CONVERSATION, "conversations": spec(st.lists(CONVERSATION[0], min_size=1, max_size=2))}))
# a reward model scores once, whole: n 1 and no stream are the valid values here
REWARD_CHAT = grouped({"messages": CONVERSATION}, OPENAI_FIELDS,
                      [[("n", spec(st.just(1), OPENAI_FIELDS["n"][1])), ("stream", spec(st.just(False), st.just(True))),
                        "model", "user"],
                       ["logprobs", "top_logprobs", "max_completion_tokens", "stop"], SAMPLING_GROUP[:5]], BUDGET)


# ------------------------------------------------------------------------------------------- KServe tensors

SHAPES = st.sampled_from([[1, 1], [1], [2, 1], [0], [1, 0], [-1], [10**12], [10**6, 10**6], [], [1, 1, 1]])
TRITON_KNOBS = [  # (name, datatype, valid value, extreme value)
    ("min_output_len", "INT64", st.integers(0, 4), st.sampled_from([10**9, 2**63 - 1, -1, 2**63])),
    ("top_k", "INT64", st.integers(0, 50), INTS), ("top_p", "FP32", st.floats(0, 1), FLOATS),
    ("temperature", "FP32", st.floats(0, 2), FLOATS), ("random_seed", "INT64", st.integers(0, 2**63 - 1), INTS),
    ("repetition_penalty", "FP32", st.floats(1, 2), FLOATS), ("use_greedy", "BOOL", st.booleans(), st.booleans()),
    ("add_BOS", "BOOL", st.booleans(), st.booleans()), ("stop_words_list", "BYTES", SHORT_PROMPTS, TEXT),
    ("end_strings", "BYTES", SHORT_PROMPTS, TEXT), ("bad_words_list", "BYTES", st.just(""), TEXT),
    ("output_context_logits", "BOOL", st.just(False), st.booleans())]
ENTRY_LIES = {"datatype": st.one_of(st.sampled_from(DATATYPES), WRONG), "shape": st.one_of(SHAPES, WRONG),
              "data": FAST_WRONG, "name": st.one_of(TEXT, WRONG), "parameters": st.one_of(JUNK, st.just(
                  {"binary_data_size": 4}))}


@st.composite
def triton_json(draw):
    prompts = draw(st.lists(weighted((4, SHORT_PROMPTS), (1, TEXT)), min_size=1, max_size=3))
    # max_output_len stays at most 4 whatever the lies: a valid long budget is slow, not hostile
    budget = draw(weighted((4, st.integers(1, 4)), (1, st.sampled_from([0, -1, 10**30, 2**63, -(2**63) - 1]))))
    inputs = [{"name": "prompts", "datatype": "BYTES", "shape": [len(prompts), 1], "data": prompts},
              {"name": "max_output_len", "datatype": "INT64", "shape": [1, 1], "data": [budget]}]
    for name, datatype, valid, extreme in TRITON_KNOBS:
        if draw(st.integers(0, 3)) == 0:
            inputs.append({"name": name, "datatype": datatype, "shape": [1, 1],
                           "data": [draw(weighted((3, valid), (1, extreme)))]})
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        entry, key = draw(st.sampled_from(inputs)), draw(st.sampled_from(list(ENTRY_LIES)))
        entry[key] = draw(ENTRY_LIES[key])
    document = {"id": "1", "inputs": draw(st.permutations(inputs))}
    if draw(st.booleans()):
        document["outputs"] = [{"name": "outputs", "parameters": {"binary_data": draw(st.booleans())}}]
    if draw(st.integers(0, 3)) == 0:
        document[draw(st.sampled_from(["id", "inputs", "outputs", "parameters"]))] = draw(WRONG)
    return document


def _buffer(datatype: str, values) -> bytes:
    if datatype == "BYTES":
        return encode_bytes([v.encode("utf-8", "surrogatepass") for v in values])
    return np.array(values, dtype=FIXED_WIDTH[datatype]).tobytes()


@st.composite
def triton_binary(draw):
    """(body, headers): a well-formed binary request, then perhaps one lie in it."""
    entries = [("prompts", "BYTES", draw(st.lists(weighted((3, SHORT_PROMPTS), (1, TEXT)), min_size=1, max_size=2))),
               ("max_output_len", "INT64", [draw(st.integers(1, 4))])]
    for name, datatype, values in [("temperature", "FP32", st.floats(width=32)),
                                   ("top_k", "INT64", st.integers(-(2**63), 2**63 - 1)),
                                   ("use_greedy", "BOOL", st.booleans()), ("stop_words_list", "BYTES", TEXT)]:
        if draw(st.booleans()):
            entries.append((name, datatype, [draw(values)]))
    inputs, buffers = [], []
    for name, datatype, values in entries:
        buffer = _buffer(datatype, values)
        inputs.append({"name": name, "datatype": datatype, "shape": [len(values), 1],
                       "parameters": {"binary_data_size": len(buffer)}})
        buffers.append(buffer)
    lie = draw(st.sampled_from(["none", "header length", "binary_data_size", "shape", "datatype", "truncate",
                                "trailing", "flip byte", "prefix"]))
    index = draw(st.integers(0, len(inputs) - 1))
    if lie == "binary_data_size":
        inputs[index]["parameters"]["binary_data_size"] = draw(
            st.one_of(st.integers(-5, 5).map(lambda d: len(buffers[index]) + d), WRONG))
    elif lie == "shape":
        inputs[index]["shape"] = draw(st.one_of(SHAPES, WRONG))
    elif lie == "datatype":
        inputs[index]["datatype"] = draw(st.one_of(st.sampled_from(DATATYPES), WRONG))
    elif lie == "prefix" and inputs[index]["datatype"] == "BYTES":
        buffers[index] = struct.pack("<I", draw(st.integers(0, 2**32 - 1))) + buffers[index][4:]
    header = to_json({"id": "1", "inputs": inputs})
    data = b"".join(buffers)
    if lie == "truncate":
        data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
    elif lie == "trailing":
        data += draw(st.binary(min_size=1, max_size=16))
    elif lie == "flip byte" and data:
        budget_start = len(buffers[0])  # max_output_len's 8 bytes stay: a huge budget is valid, only slow
        at = draw(st.integers(0, len(data) - 9))
        at += 8 if at >= budget_start else 0
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    length = str(len(header))
    if lie == "header length":
        length = draw(st.one_of(st.integers(-3, 3).map(lambda d: str(len(header) + d)),
                                st.sampled_from(["-1", "abc", "", "1e3", str(10**30), "0", "0x10", "+5"])))
    return header + data, {"Content-Type": "application/octet-stream", HEADER_LENGTH: length}


@st.composite
def reward_infer(draw):
    if draw(st.integers(0, 2)) == 0:
        texts = draw(st.lists(st.one_of(SHORT_PROMPTS, TEXT), min_size=1, max_size=2))
        return {"inputs": [{"name": "sentences", "datatype": "BYTES", "shape": [len(texts), 1], "data": texts}]}
    rows = draw(st.lists(weighted((3, token_ids()), (1, EXTREME_IDS)), min_size=1, max_size=3))
    width = max(len(row) for row in rows)
    lengths = [draw(weighted((6, st.just(len(row))), (1, st.integers(1, width)),
                             (1, st.sampled_from([0, -1, width + 1, 10**12])))) for row in rows]
    rows = [row + [0] * (width - len(row)) for row in rows]
    inputs = [{"name": "tokens", "datatype": "INT64", "shape": [len(rows), width], "data": rows},
              {"name": "sequence_lengths", "datatype": "INT64", "shape": [len(rows)], "data": lengths}]
    for _ in range(draw(st.sampled_from([0, 0, 0, 1]))):
        entry, key = draw(st.sampled_from(inputs)), draw(st.sampled_from(list(ENTRY_LIES)))
        entry[key] = draw(ENTRY_LIES[key])
    return {"inputs": inputs}


# ------------------------------------------------------------------------------------------- the runs

def json_cases(method: str, path: str, bodies):
    """Hostile requests from bodies: mostly the JSON object, sometimes not an object at all."""
    objects = bodies.map(to_json)
    whole = weighted((8, objects), (1, WRONG.map(to_json)), (1, st.binary(max_size=64)))
    return whole.map(lambda body: Hostile("fuzz", method, path, body, timeout=TIMEOUT))


ROUTES = {
    "completions": json_cases("POST", "/v1/completions", COMPLETIONS),
    "chat": json_cases("POST", "/v1/chat/completions", CHAT),
    "tokenize": json_cases("POST", "/tokenize", TOKENIZE),
    "detokenize": json_cases("POST", "/detokenize", DETOKENIZE),
    "nemo": json_cases("PUT", "/generate", NEMO),
    "triton": json_cases("POST", INFER, triton_json()),
    "triton-binary": triton_binary().map(lambda pair: Hostile("fuzz", "POST", INFER, pair[0], pair[1],
                                                              timeout=TIMEOUT)),
}
REWARD_ROUTES = {
    "reward": json_cases("POST", "/v1/reward", REWARD),
    "reward-chat": json_cases("POST", "/v1/chat/completions", REWARD_CHAT),
    "reward-triton": json_cases("POST", REWARD_INFER, reward_infer()),
}


def fuzz(harness: Harness, cases, examples: int) -> tuple[collections.Counter, list[tuple[Hostile, str]]]:
    """Send ``examples`` cases drawn from ``cases``: how many got each status ("none": no answer), and
    every (case, problem) seen."""
    problems: list[tuple[Hostile, str]] = []
    statuses: collections.Counter = collections.Counter()
    restarts = [0]

    @settings(max_examples=examples, **SETTINGS)
    @given(cases)
    def run(case: Hostile) -> None:
        if harness.engine.dead is not None:  # dead again after MAX_RESTARTS: the rest would all get 503
            statuses["not sent: engine dead"] += 1
            return
        response, failure = send(harness.url, case)
        statuses[response.status_code if response is not None else "none"] += 1
        found = [failure] if failure else answer_problems(case.path, response)
        if harness.engine.dead is not None:
            found.insert(0, f"ENGINE DIED: {harness.engine.dead!r}")
        else:
            health = requests.get(f"{harness.url}/health", timeout=10)
            if health.status_code != 200:
                found.append(f"/health afterwards: HTTP {health.status_code} {health.text[:200]!r}")
        problems.extend((case, problem) for problem in found)
        if found and restarts[0] < MAX_RESTARTS:
            restarts[0] += harness.engine.dead is not None
            harness.ensure_fresh()  # a dead engine is started again: the examples after this one still count

    run()
    return statuses, problems


def summary(route: str, statuses: collections.Counter, problems: list[tuple[Hostile, str]]) -> str:
    kinds: dict[str, list[str]] = {}
    for case, problem in problems:
        kinds.setdefault(problem[:70], []).append(f"{problem[:300]}\n        <- {case.describe(200)}")
    broken = len({id(case) for case, _ in problems})
    answers = dict(sorted(statuses.items(), key=str))
    lines = [f"{route}: {broken} of {sum(statuses.values())} examples broke the contract (answers: {answers})"]
    for kind, examples in kinds.items():
        lines.append(f"--- {len(examples)} x {kind}")
        lines += [f"    {example}" for example in examples[:3]]
    return "\n".join(lines)


def check_route(harness: Harness, route: str, cases, examples: int) -> None:
    statuses, problems = fuzz(harness, cases, examples)
    if problems:
        pytest.fail(summary(route, statuses, problems), pytrace=False)
    answered = sum(count for status, count in statuses.items() if isinstance(status, int) and status < 300)
    assert answered >= 5, f"{route}: only {answered} 2xx answers ({dict(statuses)}): the bodies no longer reach " \
                          "the engine; fix the strategies"


@pytest.fixture(autouse=True)
def quiet_server_logs(caplog):
    caplog.set_level(logging.CRITICAL, logger="nemolite")


@pytest.mark.parametrize("route", list(ROUTES))
def test_property_fuzz(route, harness):
    check_route(harness, route, ROUTES[route], EXAMPLES)


@pytest.mark.parametrize("route", list(REWARD_ROUTES))
def test_property_fuzz_reward_model(route, reward_harness):
    check_route(reward_harness, route, REWARD_ROUTES[route], REWARD_EXAMPLES)


def test_no_leak_after_fuzzing(harness, reward_harness, demo_llm):
    """Runs after the fuzzing above: every KV block free, the engines alive and still correct."""
    params = SamplingParams(temperature=0, max_tokens=REFERENCE_TOKENS)
    reference = demo_llm.generate([REFERENCE_PROMPT], params, use_tqdm=False)[0].outputs[0].text
    problems = health_problems(harness, reference, settle=30.0)
    assert not problems, problems
    for server in (harness, reward_harness):
        stats = wait_until_idle(server.engine, timeout=10.0)
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
        assert server.restarts == 0, f"the engine died {server.restarts} times while fuzzing"
