"""The OpenAI protocol: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, plus vLLM's
``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` (what lm-evaluation-harness probes).

Request bodies are pydantic models that accept unknown fields (clients send ``user``,
``stream_options`` ...); anything nemolite cannot honour is refused with a 400, never ignored
silently when it would change the answer.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import Field

from nemolite.engine.llm import with_chat_stops
from nemolite.engine.outputs import CompletionOutput, Logprob, RequestOutput
from nemolite.engine.sampling_params import SamplingParams
from nemolite.lora.request import LoRARequest
from nemolite.server import reward, tools
from nemolite.server.guided import structured_outputs
from nemolite.server.schemas import Body, ChatMessage
from nemolite.server.state import Job, RequestError, ServerState, engine_call, json_logprob, state_of
from nemolite.tokenizer import IncrementalDetokenizer, Tokenizer

router = APIRouter()


class StreamOptions(Body):
    include_usage: bool = False


class _SamplingFields(Body):
    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    min_tokens: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    allowed_token_ids: list[int] | None = None  # vLLM's extension


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)
    best_of: int | None = None
    suffix: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(Body):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(Body):
    tokens: list[int]


# ---------------------------------------------------------------------------------------------- helpers

def _logit_bias(body: _SamplingFields) -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys (strings)."""
    if not body.logit_bias:
        return None
    bias = {}
    for key, value in body.logit_bias.items():
        if len(key) > 20 or not key.strip().lstrip("-").isdigit():
            raise RequestError(f"logit_bias keys must be token ids, got {key[:40]!r}")
        bias[int(key)] = value
    return bias


def _sampling_params(body: _SamplingFields, max_tokens: int | None, **extra) -> SamplingParams:
    return engine_call(
        SamplingParams, n=body.n, max_tokens=max_tokens, min_tokens=min(body.min_tokens, max_tokens or body.min_tokens),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, stop=body.stop, stop_token_ids=body.stop_token_ids,
        seed=body.seed, ignore_eos=body.ignore_eos, logit_bias=_logit_bias(body),
        allowed_token_ids=body.allowed_token_ids, **extra)


def _max_tokens(state: ServerState, prompt_ids: list[int], requested: int | None) -> int:
    """The completion budget; prompts and budgets beyond the context are refused (400), as vLLM does."""
    context = state.max_model_len
    if not prompt_ids:
        raise RequestError("the prompt is empty; give at least one token")
    if len(prompt_ids) >= context:
        raise RequestError(f"this model's maximum context length is {context} tokens, but the prompt has "
                           f"{len(prompt_ids)}; shorten the prompt")
    if requested is None:
        return context - len(prompt_ids)
    if len(prompt_ids) + requested > context:
        raise RequestError(f"this model's maximum context length is {context} tokens; you requested "
                           f"{len(prompt_ids) + requested} ({len(prompt_ids)} in the prompt, {requested} for the "
                           "completion); lower max_tokens or shorten the prompt")
    return requested


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _piece(tokenizer: Tokenizer, previous: int | None, token: int) -> str:
    """The text ``token`` adds after ``previous`` (SentencePiece drops a leading space when decoded alone)."""
    alone = tokenizer.decode([token], skip_special_tokens=False)
    if previous is None:
        return alone
    before = tokenizer.decode([previous], skip_special_tokens=False)
    both = tokenizer.decode([previous, token], skip_special_tokens=False)
    return both[len(before):] if both.startswith(before) else alone


def _top(tokenizer: Tokenizer, previous: int | None, entry: dict[int, Logprob]) -> dict[str, float]:
    """{token text: logprob}; when two ids share a text the larger logprob stays, so the argmax is kept."""
    top: dict[str, float] = {}
    for token_id, value in entry.items():
        text = _piece(tokenizer, previous, token_id)
        top[text] = max(json_logprob(value.logprob), top.get(text, -float("inf")))
    return top


class _TextTracker:
    """Token texts and their offsets in the running text, so that the tokens join to the text."""

    def __init__(self, tokenizer: Tokenizer):
        self.detokenizer = IncrementalDetokenizer(tokenizer, [])
        self.offset = 0

    def push(self, token_id: int) -> tuple[str, int]:
        text, offset = self.detokenizer.push(token_id), self.offset
        self.offset += len(text)
        return text, offset


def _scored_positions(output: RequestOutput, completion: CompletionOutput,
                      echo: bool) -> tuple[list[int], list[dict[int, Logprob] | None]]:
    """Token ids and their logprob entries: the prompt's too with ``echo`` (its first entry None)."""
    ids, entries = list(completion.token_ids), list(completion.logprobs or [])
    if echo:
        ids = output.prompt_token_ids + ids
        entries = (output.prompt_logprobs or [None] * len(output.prompt_token_ids)) + entries
    return ids, entries


def _completion_logprobs(tokenizer: Tokenizer, ids: list[int], entries: list[dict[int, Logprob] | None],
                         tracker: _TextTracker, first: int = 0) -> dict:
    """OpenAI's legacy logprobs object for positions ``first`` onward; ``tracker`` has seen the positions
    before ``first`` (a stream keeps one per choice, so no chunk re-reads the text before it)."""
    result: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for position in range(first, min(len(ids), len(entries))):
        token_id, entry = ids[position], entries[position]
        text, offset = tracker.push(token_id)
        previous = ids[position - 1] if position else None
        result["tokens"].append(text)
        result["text_offset"].append(offset)
        result["token_logprobs"].append(None if entry is None else json_logprob(entry[token_id].logprob))
        result["top_logprobs"].append(None if entry is None else _top(tokenizer, previous, entry))
    return result


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream_errors(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once the stream has started a failure can only be told in the stream: an error event, then [DONE]."""
    try:
        async for event in events:
            yield event
    except Exception as error:  # noqa: BLE001
        message = error.message if isinstance(error, RequestError) else str(error)
        yield _sse({"error": {"message": message, "type": "server_error", "code": 500}})
        yield _sse("[DONE]")


# ---------------------------------------------------------------------------------------------- routes

def _model_card(state: ServerState, lora: LoRARequest | None) -> dict:
    """A /v1/models entry: the base model, or an adapter with its ``parent`` (as vLLM lists them)."""
    if lora is None:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "nemolite",
                "root": state.model_name, "parent": None, "max_model_len": state.max_model_len}
    return {"id": lora.lora_name, "object": "model", "created": state.created, "owned_by": "nemolite",
            "root": lora.lora_path, "parent": state.model_name, "max_model_len": state.max_model_len}


def _served_name(state: ServerState, model: str | None) -> str:
    """The ``model`` of a response: the adapter asked for, else the base model's name."""
    lora = state.resolve_model(model)
    return state.model_name if lora is None else lora.lora_name


@router.get("/v1/models")
async def list_models(request: Request):
    state = state_of(request)
    return {"object": "list", "data": [_model_card(state, None),
                                       *(_model_card(state, lora) for lora in state.loras.values())]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    state = state_of(request)
    return _model_card(state, state.resolve_model(model_id))


class LoadLoRARequest(Body):
    lora_name: str
    lora_path: str


class UnloadLoRARequest(Body):
    lora_name: str


def _runtime_lora(state: ServerState) -> None:
    if not state.allow_runtime_lora:
        raise RequestError("loading and unloading adapters at run time is off; start the server with "
                           "--enable-lora --allow-runtime-lora", 403)
    if state.engine.engine.lora is None:
        raise RequestError("this server runs without LoRA; start it with --enable-lora", 400)


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRARequest, request: Request):
    """vLLM's runtime adapter loading: ``{"lora_name": ..., "lora_path": ...}``."""
    state = state_of(request)
    _runtime_lora(state)
    lora = await state.load_lora(body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRARequest, request: Request):
    state = state_of(request)
    _runtime_lora(state)
    await state.unload_lora(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


async def _completion_prompts(state: ServerState, prompt, n: int) -> list[tuple[str | None, list[int]]]:
    """(text, token ids) per prompt: a string, a list of strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise RequestError("prompt must not be empty")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    state.check_sequences(len(prompt) * n)
    prompts = []
    for item in prompt:
        if isinstance(item, str):
            prompts.append((item, await state.encode(item)))
        else:
            prompts.append((None, list(item)))  # ids are checked against the vocabulary at admission
    return prompts


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = state_of(request)
    lora = state.resolve_model(body.model)
    if body.suffix:
        raise RequestError("suffix is not supported")
    if body.best_of is not None and body.best_of != body.n:
        raise RequestError("best_of must equal n (or be left out)")
    if body.stream and body.echo and body.logprobs is not None:
        raise RequestError("echo with logprobs is only supported without stream")
    prompts = await _completion_prompts(state, body.prompt, body.n)
    constraint = structured_outputs(body)
    jobs = []
    for index, (text, ids) in enumerate(prompts):
        try:
            max_tokens = _max_tokens(state, ids, body.max_tokens)
        except RequestError as error:
            raise RequestError(f"prompt {index}: {error.message}" if len(prompts) > 1 else error.message) from None
        params = _sampling_params(body, max_tokens, logprobs=body.logprobs, structured_outputs=constraint,
                                  prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None)
        jobs.append(Job(ids, params, text, lora))
    request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    model = _served_name(state, body.model)
    if body.stream:
        await state.compile_grammars(jobs)
        streams = state.submit(jobs, stream=True)
        return _stream_response(_stream_errors(_stream_completions(state, body, prompts, jobs, streams, request_id,
                                                                   created)))
    outputs = await state.collect(request, jobs)
    if not isinstance(outputs, list):
        return outputs
    choices, completion_tokens = [], 0
    for prompt_index, ((text, ids), output) in enumerate(zip(prompts, outputs)):
        prompt_text = text if text is not None else state.tokenizer.decode(ids)
        for completion in output.outputs:
            completion_tokens += len(completion.token_ids)
            choices.append({
                "index": prompt_index * body.n + completion.index,
                "text": (prompt_text if body.echo else "") + completion.text,
                "logprobs": None if body.logprobs is None else
                _completion_logprobs(state.tokenizer, *_scored_positions(output, completion, body.echo),
                                     _TextTracker(state.tokenizer)),
                "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason})
    return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": _usage(sum(len(ids) for _, ids in prompts), completion_tokens)}


async def _stream_completions(state: ServerState, body: CompletionRequest, prompts, jobs, streams, request_id: str,
                              created: int) -> AsyncIterator[str]:
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    closed: set[int] = set()
    trackers: dict[int, _TextTracker] = {}
    completion_tokens = 0
    model = _served_name(state, body.model)

    def chunk(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> str:
        return _sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                     "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                  "finish_reason": finish_reason}]})

    if body.echo:
        for prompt_index, (text, ids) in enumerate(prompts):
            prompt_text = text if text is not None else state.tokenizer.decode(ids)
            for j in range(body.n):
                yield chunk(prompt_index * body.n + j, prompt_text, None, None)
    async for prompt_index, output in state.merged(jobs, streams):
        for completion in output.outputs:
            index = prompt_index * body.n + completion.index
            if index in closed:
                continue
            start, first = sent_text.get(index, 0), sent_tokens.get(index, 0)
            finished = completion.finish_reason is not None
            if len(completion.text) == start and len(completion.token_ids) == first and not finished:
                continue
            logprobs = None
            if body.logprobs is not None:
                tracker = trackers.setdefault(index, _TextTracker(state.tokenizer))
                logprobs = _completion_logprobs(state.tokenizer, *_scored_positions(output, completion, echo=False),
                                                tracker, first)
            sent_text[index], sent_tokens[index] = len(completion.text), len(completion.token_ids)
            yield chunk(index, completion.text[start:], logprobs, completion.finish_reason)
            if finished:
                completion_tokens += len(completion.token_ids)
                closed.add(index)
    if body.stream_options is not None and body.stream_options.include_usage:
        yield _sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                    "choices": [], "usage": _usage(sum(len(ids) for _, ids in prompts), completion_tokens)})
    yield _sse("[DONE]")


def _chat_logprobs(state: ServerState, prompt_ids: list[int], completion: CompletionOutput, top_n: int,
                   first: int = 0) -> dict:
    tokenizer = state.tokenizer
    content = []
    previous = completion.token_ids[first - 1] if first else (prompt_ids[-1] if prompt_ids else None)
    for token_id, entry in zip(completion.token_ids[first:], (completion.logprobs or [])[first:]):
        text = _piece(tokenizer, previous, token_id)
        ranked = sorted(entry.items(), key=lambda item: -item[1].logprob)[:top_n]
        top = [{"token": (t := _piece(tokenizer, previous, tid)), "logprob": json_logprob(value.logprob),
                "bytes": list(t.encode())} for tid, value in ranked]
        content.append({"token": text, "logprob": json_logprob(entry[token_id].logprob), "bytes": list(text.encode()),
                        "top_logprobs": top})
        previous = token_id
    return {"content": content}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = state_of(request)
    lora = state.resolve_model(body.model)
    if state.config.is_reward_model:
        return await reward.chat_completion(state, body, request, lora)
    state.check_sequences(body.n)
    tool_plan = tools.plan(body.tools, body.tool_choice, body.parallel_tool_calls)
    constraint = structured_outputs(body)
    if tool_plan is not None and tool_plan.constraint is not None:
        if constraint is not None:
            raise RequestError("a named or required tool_choice constrains the answer already; drop the "
                               "structured-output field (or use tool_choice auto)")
        constraint = tool_plan.constraint
    messages = [message.model_dump(exclude_none=True) for message in body.messages]
    prompt = await _chat_prompt(state, messages, body.add_generation_prompt, tool_plan)
    ids = await state.encode(prompt, add_bos=False)
    max_tokens = _max_tokens(state, ids, body.max_completion_tokens or body.max_tokens)
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs and not body.logprobs:
        raise RequestError("top_logprobs needs logprobs: true")
    params = with_chat_stops(state.tokenizer, _sampling_params(body, max_tokens, logprobs=top_logprobs,
                                                               structured_outputs=constraint))
    job = Job(ids, params, prompt, lora)
    request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if tool_plan is not None and tool_plan.mode == "none":
        tool_plan = None  # nothing to parse
    if body.stream:
        await state.compile_grammars([job])
        streams = state.submit([job], stream=True)
        return _stream_response(_stream_errors(_stream_chat(state, body, job, streams, request_id, created,
                                                            tool_plan)))
    outputs = await state.collect(request, [job])
    if not isinstance(outputs, list):
        return outputs
    output = outputs[0]
    choices = []
    for c in output.outputs:
        message, finish_reason = _chat_message(tool_plan, c)
        choices.append({"index": c.index, "message": message, "finish_reason": finish_reason,
                        "logprobs": _chat_logprobs(state, ids, c, body.top_logprobs or 0) if body.logprobs else None,
                        "stop_reason": c.stop_reason})
    return {"id": request_id, "object": "chat.completion", "created": created, "model": _served_name(state, body.model),
            "choices": choices, "usage": _usage(len(ids), sum(len(c.token_ids) for c in output.outputs))}


async def _chat_prompt(state: ServerState, messages: list[dict], add_generation_prompt: bool,
                       tool_plan: "tools.ToolPlan | None") -> str:
    """The prompt, with the tools where the model is to see them: the template's own ``tools`` when it
    reads them, else a system message that lists them (tool_choice none: no tools at all)."""
    if tool_plan is None or tool_plan.mode == "none":
        return await state.chat_prompt(messages, add_generation_prompt)
    if tools.template_reads_tools(state.tokenizer.chat_template):
        return await state.chat_prompt(messages, add_generation_prompt, tool_plan.tools)
    listing = tools.tools_system_message(tool_plan.tools)
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        messages = [{**messages[0], "content": messages[0]["content"] + "\n\n" + listing}, *messages[1:]]
    else:
        messages = [{"role": "system", "content": listing}, *messages]
    return await state.chat_prompt(messages, add_generation_prompt)


def _chat_message(tool_plan: "tools.ToolPlan | None", completion: CompletionOutput) -> tuple[dict, str | None]:
    """The assistant message of a finished choice and its finish_reason ("tool_calls" when it called)."""
    if tool_plan is not None and completion.finish_reason == "stop":
        calls = tools.calls_of(tool_plan, completion.text)
        if calls:
            return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": completion.text}, completion.finish_reason


async def _stream_chat(state: ServerState, body: ChatCompletionRequest, job: Job, streams, request_id: str,
                       created: int, tool_plan: "tools.ToolPlan | None" = None) -> AsyncIterator[str]:
    """Content deltas as they come. An answer that may be a tool call (any with a named or required
    tool_choice; with auto, one whose text starts as a call does: ``{`` or ``<|python_tag|>``) is held
    until it ends, then sent as ``tool_calls`` deltas (one per call, its arguments whole) or as one
    content delta; an auto answer that starts as text streams as text."""
    model = _served_name(state, body.model)

    def chunk(index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> str:
        return _sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                     "model": model, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                                             "finish_reason": finish_reason}]})

    for index in range(body.n):
        yield chunk(index, {"role": "assistant", "content": ""})
    sent_text = [0] * body.n
    sent_tokens = [0] * body.n
    closed = [False] * body.n
    completion_tokens = 0
    ids = job.prompt_token_ids
    # Per choice: held as a possible call (True), streamed as text (False), or not known yet (None).
    held: list[bool | None] = [None if tool_plan is not None and tool_plan.mode == "auto" else tool_plan is not None
                               for _ in range(body.n)]
    async for _, output in state.merged([job], streams):
        for completion in output.outputs:
            index = completion.index
            if closed[index]:
                continue
            finished = completion.finish_reason is not None
            if held[index] is None:
                start = completion.text.lstrip()
                if start.startswith(("{", tools.PYTHON_TAG)) or (finished and not start):
                    held[index] = True
                elif start and not tools.PYTHON_TAG.startswith(start):
                    held[index] = False
                elif not finished:
                    continue
                else:
                    held[index] = True
            if held[index]:
                if not finished:
                    continue
                message, finish_reason = _chat_message(tool_plan, completion)
                delta = {"content": message["content"]} if message["content"] else {}
                if message.get("tool_calls"):
                    delta = {"tool_calls": [{"index": number, **call}
                                            for number, call in enumerate(message["tool_calls"])]}
                logprobs = _chat_logprobs(state, ids, completion, body.top_logprobs or 0) if body.logprobs else None
                yield chunk(index, delta, logprobs, finish_reason)
                closed[index] = True
                completion_tokens += len(completion.token_ids)
                continue
            text = completion.text[sent_text[index]:]
            if not text and len(completion.token_ids) == sent_tokens[index] and not finished:
                continue
            logprobs = (_chat_logprobs(state, ids, completion, body.top_logprobs or 0, sent_tokens[index])
                        if body.logprobs else None)
            sent_text[index], sent_tokens[index] = len(completion.text), len(completion.token_ids)
            yield chunk(index, {"content": text} if text else {}, logprobs, completion.finish_reason)
            if finished:
                closed[index] = True
                completion_tokens += len(completion.token_ids)
    if body.stream_options is not None and body.stream_options.include_usage:
        yield _sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": _usage(len(ids), completion_tokens)})
    yield _sse("[DONE]")


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    state = state_of(request)
    if (body.prompt is None) == (body.messages is None):
        raise RequestError("give either prompt or messages")
    if body.messages is not None:
        text = await state.chat_prompt([m.model_dump(exclude_none=True) for m in body.messages],
                                       body.add_generation_prompt)
        tokens = await state.encode(text, add_bos=False)
    else:
        tokens = await state.encode(body.prompt, add_bos=None if body.add_special_tokens else False)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": state.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    state = state_of(request)
    vocab = state.config.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise RequestError(f"token ids must be in [0, {vocab})")
    return {"prompt": await state.decode(body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    state = state_of(request)
    tokenizer = state.tokenizer
    token = lambda token_id: None if token_id is None else tokenizer.convert_ids_to_tokens([token_id])[0]  # noqa: E731
    return {"eos_token": token(tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None),
            "bos_token": token(tokenizer.bos_token_id), "pad_token": tokenizer.pad_token,
            "chat_template": tokenizer.chat_template, "model_max_length": state.max_model_len,
            "vocab_size": tokenizer.vocab_size, "add_bos_token": tokenizer.add_bos_default,
            "tokenizer_class": "nemolite"}

