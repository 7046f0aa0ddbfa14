"""Triton's KServe v2 HTTP protocol: the subset NemoQuery/NemoQueryLLM (NVIDIA/NeMo
``nemo/deploy/nlp/query_llm.py``), pytriton's ``ModelClient`` and ``tritonclient.http`` use (the KServe
v2 inference protocol, kserve/kserve ``docs/predict-api/v2/required_api.md``; Triton's binary tensor
extension, triton-inference-server/server ``docs/protocol/extension_binary_data.md``), serving one
model shaped like NeMo's TensorRT-LLM
deployable: input ``prompts`` plus optional knobs, output ``outputs`` (the completion only).

Requests may carry tensors as JSON ``data`` or in the binary tensor extension (nemolite.kserve);
``outputs`` goes back binary when the client asks for it. Knobs are NeMo's: scalars come from each
input's first element, ``stop_words_list``/``bad_words_list``/``end_strings`` are flat word lists
whatever their shape, unknown inputs are ignored, and defaults are the TensorRT-LLM deployable's
(64 tokens, top_k 1, so greedy unless the client says otherwise). Unlike NeMo, a request nemolite
cannot run answers 4xx ``{"error": ...}`` instead of an in-band "An error occurred" string.

Structured output (nemolite's, as the OpenAI and NeMo routers take it): at most one of the BYTES inputs
``json_schema`` (a JSON schema's text), ``regex``, ``grammar`` (one string for the whole request,
whatever the shape) and ``choice`` (a flat list of strings, like ``end_strings``); empty strings count
as absent. The constraint applies to every prompt; a bad one is a 400 that names the problem.

A reward model is served instead as NeMo-Aligner's reward server serves it: model ``reward_model``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

import nemolite
from nemolite.engine.sampling_params import SamplingParams
from nemolite.kserve import HEADER_LENGTH, TensorError, pack, read_tensors, split_body, tensor_to_bytes
from nemolite.engine.structured import StructuredOutputs
from nemolite.server.nemo import STRUCTURED_FIELDS, nemo_sampling_params, structured_outputs
from nemolite.server.reward import score
from nemolite.server.state import Job, RequestError, ServerState, state_of

router = APIRouter()

MAX_BATCH_SIZE = 128
VERSION = "1"

# (name, Triton config type, KServe datatype); every input but prompts is optional
INPUTS = [("prompts", "TYPE_STRING", "BYTES"), ("max_output_len", "TYPE_INT64", "INT64"),
          ("min_output_len", "TYPE_INT64", "INT64"), ("top_k", "TYPE_INT64", "INT64"),
          ("top_p", "TYPE_FP32", "FP32"), ("temperature", "TYPE_FP32", "FP32"),
          ("random_seed", "TYPE_INT64", "INT64"), ("repetition_penalty", "TYPE_FP32", "FP32"),
          ("use_greedy", "TYPE_BOOL", "BOOL"), ("add_BOS", "TYPE_BOOL", "BOOL"), ("all_probs", "TYPE_BOOL", "BOOL"),
          ("compute_logprob", "TYPE_BOOL", "BOOL"), ("stop_words_list", "TYPE_STRING", "BYTES"),
          ("bad_words_list", "TYPE_STRING", "BYTES"), ("end_strings", "TYPE_STRING", "BYTES"),
          ("output_context_logits", "TYPE_BOOL", "BOOL"), ("output_generation_logits", "TYPE_BOOL", "BOOL"),
          ("adapter_id", "TYPE_STRING", "BYTES"), ("json_schema", "TYPE_STRING", "BYTES"),
          ("regex", "TYPE_STRING", "BYTES"), ("choice", "TYPE_STRING", "BYTES"), ("grammar", "TYPE_STRING", "BYTES")]
OUTPUTS = [("outputs", "TYPE_STRING", "BYTES")]  # the TYPE_STRING output first: NemoQueryLLM reads outputs[0]
# A reward model is served as NeMo-Aligner's reward server serves it (NVIDIA/NeMo-Aligner
# nemo_aligner/algorithms/reward_server.py): model "reward_model",
# formatted ``sentences`` (or ``tokens`` + ``sequence_lengths``) in, one FP32 row of attributes out per input.
REWARD_MODEL_NAME = "reward_model"
REWARD_INPUTS = [("sentences", "TYPE_STRING", "BYTES"), ("tokens", "TYPE_INT64", "INT64"),
                 ("sequence_lengths", "TYPE_INT64", "INT64")]
REWARD_OUTPUTS = [("rewards", "TYPE_FP32", "FP32")]


@dataclasses.dataclass(slots=True)
class InferRequest:
    prompts: list[str]
    max_output_len: int = 64
    min_output_len: int = 0
    top_k: int = 1
    top_p: float = 0.0
    temperature: float = 1.0
    random_seed: int | None = None
    repetition_penalty: float = 1.0
    use_greedy: bool = False
    add_BOS: bool | None = None  # None: the checkpoint's own rule
    stop: list[str] = dataclasses.field(default_factory=list)
    adapter_id: str | None = None  # a served LoRA adapter's name, one for the whole request
    structured_outputs: StructuredOutputs | None = None  # what every completion must be; None: free text


def _model_name(state: ServerState) -> str:
    return REWARD_MODEL_NAME if state.config.is_reward_model else state.model_name


def _tables(state: ServerState) -> tuple[list, list]:
    """The served model's (inputs, outputs): (name, Triton config type, KServe datatype) each."""
    return (REWARD_INPUTS, REWARD_OUTPUTS) if state.config.is_reward_model else (INPUTS, OUTPUTS)


def _check_model(state: ServerState, name: str, version: str | None = None) -> None:
    if name != _model_name(state):
        raise RequestError(f"unknown model '{name}'; this server serves '{_model_name(state)}'", 404)
    if version not in (None, "", VERSION):
        raise RequestError(f"model '{name}' has no version '{version}'; it has version {VERSION}", 404)


def _strings(tensor: np.ndarray, name: str) -> list[str]:
    if tensor.dtype != object:
        raise RequestError(f"input '{name}' must be BYTES (UTF-8 strings), got {tensor.dtype.name}")
    try:
        return [item.decode() for item in tensor.flat]
    except UnicodeDecodeError:
        raise RequestError(f"input '{name}' is not valid UTF-8") from None


def _first(tensors: dict[str, np.ndarray], name: str) -> float | bool | None:
    """An input's scalar (its first element), or None when it is absent."""
    tensor = tensors.get(name)
    if tensor is None:
        return None
    if tensor.dtype == object:
        raise RequestError(f"input '{name}' must be a number or BOOL, not BYTES")
    if tensor.size == 0:
        raise RequestError(f"input '{name}' is empty; send one value per prompt, shape [batch, 1]")
    return tensor.flat[0].item()


def _integer(tensors: dict[str, np.ndarray], name: str, minimum: int) -> int | None:
    value = _first(tensors, name)
    if value is None:
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value == int(value)):
        raise RequestError(f"input '{name}' must be a whole number, got {value}")
    if int(value) < minimum:
        raise RequestError(f"input '{name}' must be >= {minimum}, got {int(value)}")
    return int(value)


def _number(tensors: dict[str, np.ndarray], name: str, low: float, high: float) -> float | None:
    value = _first(tensors, name)
    if value is None:
        return None
    if not (math.isfinite(value) and low <= value <= high):
        raise RequestError(f"input '{name}' must be in [{low}, {high}], got {value}")
    return float(value)


def _flag(tensors: dict[str, np.ndarray], name: str) -> bool | None:
    value = _first(tensors, name)
    return None if value is None else bool(value)


def parse_request(tensors: dict[str, np.ndarray]) -> InferRequest:
    if "prompts" not in tensors:
        raise RequestError("input 'prompts' is required: BYTES, shape [batch, 1], one UTF-8 prompt per row")
    prompts = _strings(tensors["prompts"], "prompts")
    if not 1 <= len(prompts) <= MAX_BATCH_SIZE:
        raise RequestError(f"'prompts' holds {len(prompts)} prompts; send 1 to {MAX_BATCH_SIZE} per request")
    for name in ("output_context_logits", "output_generation_logits"):
        if _flag(tensors, name):
            raise RequestError(f"{name} is not supported by nemolite; send it false or leave it out")
    for name in ("bad_words_list", "lora_uids", "task_id"):
        if name in tensors and any(_strings(tensors[name], name)):
            raise RequestError(f"{name} is not supported by nemolite; leave it out")
    if _number(tensors, "no_repeat_ngram_size", 0, math.inf):
        raise RequestError("no_repeat_ngram_size is not supported by nemolite; leave it out")
    request = InferRequest(prompts=prompts)
    max_output_len = _integer(tensors, "max_output_len", 1)
    if max_output_len is None:
        max_output_len = _integer(tensors, "max_output_token", 1)  # NemoQuery's older name
    values = {"max_output_len": max_output_len, "min_output_len": _integer(tensors, "min_output_len", 0),
              "top_k": _integer(tensors, "top_k", 0), "top_p": _number(tensors, "top_p", 0.0, 1.0),
              "temperature": _number(tensors, "temperature", 0.0, 100.0),
              "random_seed": _integer(tensors, "random_seed", -(2**63)),
              "repetition_penalty": _number(tensors, "repetition_penalty", 1e-6, 100.0),
              "use_greedy": _flag(tensors, "use_greedy"), "add_BOS": _flag(tensors, "add_BOS")}
    for name, value in values.items():
        if value is not None:
            setattr(request, name, value)
    for name in ("stop_words_list", "end_strings"):
        if name in tensors:
            request.stop += [word for word in _strings(tensors[name], name) if word]
    if "adapter_id" in tensors:
        names = set(_strings(tensors["adapter_id"], "adapter_id")) - {""}
        if len(names) > 1:
            raise RequestError("adapter_id names one LoRA adapter for the whole request; send one name")
        request.adapter_id = names.pop() if names else None
    request.structured_outputs = _structured(tensors)
    return request


def _structured(tensors: dict[str, np.ndarray]) -> StructuredOutputs | None:
    """The request's one structured-output input, or None: json_schema, regex and grammar hold one
    string (repeated per row is fine), choice a flat list; empty strings count as absent."""
    fields = {}
    for name, field in STRUCTURED_FIELDS.items():
        if name not in tensors:
            continue
        values = [value for value in _strings(tensors[name], name) if value]
        if name != "choice":
            values = list(dict.fromkeys(values))
            if len(values) > 1:
                raise RequestError(f"input '{name}' holds {len(values)} different strings; send one {name} for the "
                                   "whole request")
        if values:
            fields[field] = values if name == "choice" else values[0]
    if len(fields) > 1:
        given = [name for name, field in STRUCTURED_FIELDS.items() if field in fields]
        raise RequestError("send at most one of the inputs json_schema, regex, choice, grammar; "
                           f"got {' and '.join(given)}")
    return structured_outputs(fields) if fields else None


def sampling_params(request: InferRequest, state: ServerState, prompt_length: int) -> SamplingParams:
    return nemo_sampling_params(
        state, prompt_length, tokens=request.max_output_len, min_tokens=request.min_output_len,
        greedy=request.use_greedy or request.temperature == 0.0, temperature=request.temperature,
        top_k=request.top_k, top_p=request.top_p, repetition_penalty=request.repetition_penalty,
        seed=request.random_seed, end_strings=request.stop, structured_outputs=request.structured_outputs)


def _binary_wanted(header: dict, name: str) -> bool:
    """Whether the client asked for output ``name`` as binary data (per output, or for all outputs)."""
    parameters = header.get("parameters")
    wanted = isinstance(parameters, dict) and bool(parameters.get("binary_data_output", False))
    requested = header.get("outputs")
    for entry in requested if isinstance(requested, list) else []:
        if isinstance(entry, dict) and entry.get("name") == name and isinstance(entry.get("parameters"), dict):
            wanted = bool(entry["parameters"].get("binary_data", wanted))
    return wanted


def _response(state: ServerState, header: dict, name: str, datatype: str, array: np.ndarray) -> Response:
    """One output tensor, as JSON ``data`` or in the binary extension, as the client asked."""
    output: dict = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    body: dict = {"model_name": _model_name(state), "model_version": VERSION, "id": str(header.get("id", "")),
                  "outputs": [output]}
    if not _binary_wanted(header, name):
        output["data"] = array.flatten().tolist()
        return JSONResponse(body)
    buffer = tensor_to_bytes(datatype, array)
    output["parameters"] = {"binary_data_size": len(buffer)}
    content, header_length = pack(body, [buffer])
    return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


@router.get("/v2/health/live")
async def live():
    return Response(status_code=200)


@router.get("/v2/health/ready")
async def ready(request: Request):
    return Response(status_code=200 if state_of(request).engine.dead is None else 503)


@router.get("/v2")
async def server_metadata():
    return {"name": "nemolite", "version": nemolite.__version__, "extensions": ["binary_tensor_data"]}


@router.post("/v2/repository/index")
async def repository_index(request: Request):
    return [{"name": _model_name(state_of(request)), "version": VERSION, "state": "READY"}]


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str, version: str | None = None):
    state = state_of(request)
    _check_model(state, name, version)
    return Response(status_code=200 if state.engine.dead is None else 503)


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def model_metadata(request: Request, name: str, version: str | None = None):
    state = state_of(request)
    _check_model(state, name, version)
    inputs, outputs = _tables(state)

    def tensors(table):
        return [{"name": n, "datatype": datatype, "shape": [-1, -1]} for n, _, datatype in table]

    return {"name": name, "versions": [VERSION], "platform": "nemolite", "inputs": tensors(inputs),
            "outputs": tensors(outputs)}


@router.get("/v2/models/{name}/config")
@router.get("/v2/models/{name}/versions/{version}/config")
async def model_config(request: Request, name: str, version: str | None = None):
    state = state_of(request)
    _check_model(state, name, version)
    inputs, outputs = _tables(state)
    return {"name": name, "platform": "nemolite", "backend": "nemolite", "max_batch_size": MAX_BATCH_SIZE,
            "input": [{"name": n, "data_type": t, "dims": [-1], "optional": n != "prompts"} for n, t, _ in inputs],
            "output": [{"name": n, "data_type": t, "dims": [-1]} for n, t, _ in outputs],
            "dynamic_batching": {}, "instance_group": [{"kind": "KIND_CPU", "count": 1}],
            "model_transaction_policy": {"decoupled": False}, "parameters": {}}


@router.post("/v2/models/{name}/infer")
@router.post("/v2/models/{name}/versions/{version}/infer")
async def infer(request: Request, name: str, version: str | None = None):
    state = state_of(request)
    _check_model(state, name, version)
    body = await request.body()
    try:
        header, buffers = split_body(body, request.headers.get(HEADER_LENGTH))
        tensors = read_tensors(header.get("inputs"), buffers)
    except TensorError as error:
        raise RequestError(str(error)) from None
    if state.config.is_reward_model:
        return await _infer_rewards(request, state, header, tensors)
    parsed = parse_request(tensors)
    lora = state.resolve_model(parsed.adapter_id)
    token_ids = [await state.encode(prompt, add_bos=parsed.add_BOS) for prompt in parsed.prompts]
    jobs = [Job(ids, sampling_params(parsed, state, len(ids)), prompt, lora)
            for prompt, ids in zip(parsed.prompts, token_ids)]
    outputs = await state.collect(request, jobs)
    if not isinstance(outputs, list):
        return outputs  # the client went away
    texts = [output.outputs[0].text for output in outputs]
    return _response(state, header, "outputs", "BYTES", np.array(texts, dtype=object).reshape(len(texts), 1))


async def _reward_token_ids(state: ServerState, tensors: dict[str, np.ndarray]) -> list[list[int]]:
    """The inputs to score: ``sentences`` already in the reward format (tokenized with no BOS/EOS, as
    NeMo-Aligner does), or ``tokens`` [B, S] cut to ``sequence_lengths`` [B]."""
    if "sentences" in tensors:
        return [await state.encode(text, add_bos=False) for text in _strings(tensors["sentences"], "sentences")]
    if "tokens" not in tensors or "sequence_lengths" not in tensors:
        raise RequestError("send input 'sentences' (BYTES, one formatted conversation per row) or 'tokens' "
                           "(INT64 [batch, length]) with 'sequence_lengths' (INT64 [batch])")
    tokens, lengths = tensors["tokens"], tensors["sequence_lengths"]
    if tokens.dtype.kind not in "iu" or lengths.dtype.kind not in "iu" or tokens.ndim != 2:
        raise RequestError("'tokens' must be INT64 [batch, length] and 'sequence_lengths' INT64 [batch]")
    lengths = lengths.reshape(-1)
    if len(lengths) != len(tokens) or not all(1 <= n <= tokens.shape[1] for n in lengths):
        raise RequestError(f"'sequence_lengths' needs one length in [1, {tokens.shape[1]}] per row of 'tokens'")
    return [row[:n].tolist() for row, n in zip(tokens, lengths)]


async def _infer_rewards(request: Request, state: ServerState, header: dict,
                         tensors: dict[str, np.ndarray]) -> Response:
    token_ids = await _reward_token_ids(state, tensors)
    if not 1 <= len(token_ids) <= MAX_BATCH_SIZE:
        raise RequestError(f"send 1 to {MAX_BATCH_SIZE} inputs per request, got {len(token_ids)}")
    outputs = await score(state, request, token_ids)
    if not isinstance(outputs, list):
        return outputs
    return _response(state, header, "rewards", "FP32", np.array([o.reward for o in outputs], dtype=np.float32))
