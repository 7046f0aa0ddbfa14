"""NeMo's text-generation protocol: ``PUT /generate`` as ``megatron_gpt_eval.py server=True`` serves it.

Fields, defaults and validation messages are NeMo's (NVIDIA/NeMo
``nemo/collections/nlp/modules/common/text_generation_server.py``, ``MegatronGenerate.put``); unlike
NeMo a failed check answers 400 ``{"error": ...}``. Each sentence is its own engine request, so a
batch of sentences joins the running batch like any other traffic; the batch is validated whole
before any sentence runs, and a failure ends all of them.

Beyond NeMo, structured output (the OpenAI server's semantics, nemolite.engine.structured): at most one
of ``json_schema`` (an object, or its JSON text), ``regex`` (a string the whole completion matches),
``choice`` (a list of strings, the completion is one of them) and ``grammar`` (Lark or GBNF), or one
``structured_outputs`` object with vLLM's keys (json, regex, choice, grammar, json_object). It
constrains the completion of every sentence; ``sentences`` still answers prompt + completion. A bad
schema, regex or grammar is a 400 that names the problem.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from fastapi import APIRouter, Request

from nemolite.engine.outputs import RequestOutput
from nemolite.engine.sampling_params import SamplingParams
from nemolite.engine.structured import StructuredOutputs
from nemolite.json_body import valid_unicode
from nemolite.server.state import (LOGPROB_FLOOR, Job, RequestError, ServerState, engine_call, json_logprob,
                                   read_json_object, state_of)
from nemolite.tokenizer import IncrementalDetokenizer

router = APIRouter()

MAX_SENTENCES = 128
ALLOWED_KEYS = {"all_probs", "sentences", "task_ids", "tokens_to_generate", "temperature", "add_BOS", "greedy",
                "top_k", "top_p", "neighbors", "repetition_penalty", "min_tokens_to_generate", "end_strings",
                "compute_logprob", "random_seed", "adapter_id", "json_schema", "regex", "choice", "grammar",
                "structured_outputs"}
# Structured-output fields of the body (at most one); their StructuredOutputs (vLLM) names.
STRUCTURED_FIELDS = {"json_schema": "json", "regex": "regex", "choice": "choice", "grammar": "grammar"}


@dataclasses.dataclass(slots=True)
class GenerateRequest:
    sentences: list
    tokens_to_generate: int = 64
    temperature: float = 1.0
    add_BOS: bool = False
    top_k: int = 0
    top_p: float = 0.9
    greedy: bool = False
    all_probs: bool = False
    compute_logprob: bool = False
    repetition_penalty: float = 1.0
    min_tokens_to_generate: int = 0
    end_strings: list[str] = dataclasses.field(default_factory=lambda: ["<|endoftext|>"])
    random_seed: int | None = None
    adapter_id: str | None = None  # a served LoRA adapter's name (TGI's and LoRAX's field); None: the base model
    structured_outputs: StructuredOutputs | None = None  # what every completion must be; None: free text


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_request(data: dict) -> GenerateRequest:
    """NeMo's checks, in NeMo's order and words."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise RequestError(message)

    need("sentences" in data, "sentences is required: a list of prompt strings")
    sentences = data["sentences"]
    need(isinstance(sentences, list) and sentences, "sentences must be a non-empty list of strings")
    need(len(sentences) <= MAX_SENTENCES, f"Maximum number of sentences is {MAX_SENTENCES}")
    for sentence in sentences:
        need(isinstance(sentence, str) or (isinstance(sentence, list) and all(isinstance(m, dict) for m in sentence)),
             "sentences must be a list of strings (or of chat message lists)")
    if data.get("task_ids") is not None:
        raise RequestError("task_ids (p-tuning) is not supported")
    request = GenerateRequest(sentences=sentences)
    if "tokens_to_generate" in data:
        value = data["tokens_to_generate"]
        need(_is_int(value) and value >= 1, "tokens_to_generate must be an integer greater than 0")
        request.tokens_to_generate = value
    for key in ("all_probs", "add_BOS", "greedy", "compute_logprob"):
        if key in data:
            need(isinstance(data[key], bool), f"{key} must be a boolean value")
            setattr(request, key, data[key])
    if "temperature" in data:
        value = data["temperature"]
        need(_is_number(value) and 0.0 < value <= 100.0,
             "temperature must be a positive number less than or equal to 100.0")
        request.temperature = float(value)
    if "top_k" in data:
        value = data["top_k"]
        need(_is_number(value) and value >= 0 and value == int(value), "top_k must be a positive integer number")
        request.top_k = int(value)
    if "top_p" in data:
        value = data["top_p"]
        need(_is_number(value) and 0.0 <= value <= 1.0, "top_p must be a positive number less than or equal to 1.0")
        request.top_p = float(value)
    if "repetition_penalty" in data:
        value = data["repetition_penalty"]
        need(_is_number(value) and value >= 1.0, "repetition_penalty must be a positive number no less than 1.0")
        request.repetition_penalty = float(value)
    if "end_strings" in data:
        value = data["end_strings"]
        need(isinstance(value, list) and all(isinstance(s, str) for s in value),
             "expect end_strings to be a list of strings")
        need(all(valid_unicode(s) for s in value), "end_strings must be valid Unicode (no lone surrogates)")
        request.end_strings = [s for s in value if s]
    if "min_tokens_to_generate" in data:
        value = data["min_tokens_to_generate"]
        need(_is_int(value) and value >= 0, "min_tokens_to_generate must be an integer no less than 0")
        request.min_tokens_to_generate = value
    if "neighbors" in data and data["neighbors"] is not None:
        need(_is_int(data["neighbors"]) and data["neighbors"] >= 0, "num of neighbors must be an integer no less than 0")
    if "random_seed" in data:
        value = data["random_seed"]
        need(value is None or (_is_int(value) and value >= 0), "random_seed must be a positive integer number or None")
        request.random_seed = value
    if data.get("adapter_id") is not None:
        need(isinstance(data["adapter_id"], str), "adapter_id must be the name of a served LoRA adapter")
        request.adapter_id = data["adapter_id"]
    request.structured_outputs = _parse_structured(data)
    return request


def _parse_structured(data: dict) -> StructuredOutputs | None:
    """The body's one structured-output field (null counts as absent), its type checked, compiled later."""
    given = [key for key in (*STRUCTURED_FIELDS, "structured_outputs") if data.get(key) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise RequestError("send at most one of json_schema, regex, choice, grammar, structured_outputs; "
                           f"got {' and '.join(given)}")
    key = given[0]
    value = data[key]
    if key == "structured_outputs":
        return structured_outputs(value)
    if key == "json_schema" and not isinstance(value, (dict, str)):
        raise RequestError("json_schema must be a JSON schema: an object, or its JSON text")
    if key in ("regex", "grammar") and not (isinstance(value, str) and value):
        raise RequestError(f"{key} must be a non-empty string")
    if key == "choice" and not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
        raise RequestError("choice must be a non-empty list of non-empty strings")
    return structured_outputs({STRUCTURED_FIELDS[key]: value})


def structured_outputs(fields: Any) -> StructuredOutputs:
    """StructuredOutputs of vLLM-named ``fields`` (exactly one of json, regex, choice, grammar, json_object),
    or a 400 naming what is wrong. Only the spec is checked here; ServerState.compile_grammars compiles it."""
    return engine_call(StructuredOutputs.of, fields)


def nemo_sampling_params(state: ServerState, prompt_length: int, *, tokens: int, min_tokens: int, greedy: bool,
                         temperature: float, top_k: int, top_p: float, repetition_penalty: float, seed: int | None,
                         end_strings: list[str], **extra) -> SamplingParams:
    """NeMo's knobs in engine terms (also the Triton deployables'): top_k 1 is greedy, top_p 0 is off,
    end strings stop generation and stay in the text, and the length is clamped to the context."""
    max_tokens = max(0, min(tokens, state.max_model_len - prompt_length))
    greedy = greedy or top_k == 1
    stop_ids = [token_id for s in end_strings if (token_id := state.tokenizer.token_to_id(s)) is not None]
    return engine_call(
        SamplingParams, max_tokens=max_tokens, min_tokens=min(min_tokens, max_tokens),
        temperature=0.0 if greedy else temperature, top_k=0 if greedy else top_k,
        top_p=1.0 if greedy or top_p == 0.0 else top_p, repetition_penalty=repetition_penalty, seed=seed,
        stop=end_strings, stop_token_ids=stop_ids, include_stop_str_in_output=True, **extra)


def sampling_params(request: GenerateRequest, state: ServerState, prompt_length: int) -> SamplingParams:
    scored = request.compute_logprob or request.all_probs
    return nemo_sampling_params(
        state, prompt_length, tokens=request.tokens_to_generate, min_tokens=request.min_tokens_to_generate,
        greedy=request.greedy, temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
        repetition_penalty=request.repetition_penalty, seed=request.random_seed, end_strings=request.end_strings,
        logprobs=0 if scored else None, prompt_logprobs=0 if scored else None, full_logprobs=request.all_probs,
        structured_outputs=request.structured_outputs)


async def _prompt_text(sentence, state: ServerState) -> str:
    if isinstance(sentence, str):
        return sentence
    return await state.chat_prompt(sentence)


def _row(prompt: str, output: RequestOutput, request: GenerateRequest, state: ServerState) -> dict:
    completion = output.outputs[0]
    ids = [*output.prompt_token_ids, *completion.token_ids]
    detokenizer = IncrementalDetokenizer(state.tokenizer, [])
    offsets, length = [], 0
    for token_id in ids:
        offsets.append(length)
        length += len(detokenizer.push(token_id))
    row = {"sentence": prompt + completion.text, "tokens": state.tokenizer.convert_ids_to_tokens(ids),
           "token_ids": ids, "offsets": offsets, "logprob": None}
    if request.compute_logprob or request.all_probs:
        prompt_part = [json_logprob(entry[token].logprob) for entry, token in
                       zip(output.prompt_logprobs[1:], output.prompt_token_ids[1:])]
        generated = [json_logprob(entry[token].logprob) for entry, token in zip(completion.logprobs, completion.token_ids)]
        row["logprob"] = prompt_part + generated
    if request.all_probs:
        rows = [*(output.prompt_full_logprobs or []), *(completion.full_logprobs or [])]
        row["full_logprob"] = [r.clamp(min=LOGPROB_FLOOR).tolist() for r in rows]
    return row


@router.put("/generate")
async def generate(request: Request):
    state = state_of(request)
    parsed = parse_request(await read_json_object(request))
    lora = state.resolve_model(parsed.adapter_id)
    prompts = [await _prompt_text(sentence, state) for sentence in parsed.sentences]
    token_ids = [await state.encode(prompt, add_bos=parsed.add_BOS) for prompt in prompts]
    jobs = [Job(ids, sampling_params(parsed, state, len(ids)), prompt, lora) for prompt, ids in zip(prompts, token_ids)]
    outputs = await state.collect(request, jobs)
    if not isinstance(outputs, list):
        return outputs  # the client went away
    rows = [_row(prompt, output, parsed, state) for prompt, output in zip(prompts, outputs)]
    body = {"sentences": [r["sentence"] for r in rows], "tokens": [r["tokens"] for r in rows],
            "token_ids": [r["token_ids"] for r in rows], "offsets": [r["offsets"] for r in rows],
            "logprob": [r["logprob"] for r in rows] if parsed.compute_logprob or parsed.all_probs else None}
    if parsed.all_probs:
        body["full_logprob"] = [r["full_logprob"] for r in rows]
    return body
