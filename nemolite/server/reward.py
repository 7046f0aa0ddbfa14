"""Reward models over HTTP: nemolite's ``POST /v1/reward`` and the chat-completions answer of NVIDIA's
hosted Nemotron-4-340B-Reward API (the ``nvidia/nemotron-4-340b-reward`` model card on build.nvidia.com),
which NeMo-Curator's ``query_reward_model`` reads (NVIDIA/NeMo-Curator
``nemo_curator/services/openai_client.py``).

Each conversation is one engine request (``SamplingParams(reward=True)``), so reward requests are
batched continuously with each other like generation requests are. The scalar score weighs the
attributes with the server's ``--reward-weights`` unless a request brings its own.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Field

from nemolite.engine.outputs import RequestOutput
from nemolite.engine.sampling_params import SamplingParams
from nemolite.reward import HELPSTEER2_ATTRIBUTES, resolve_weights, reward_result, reward_token_ids
from nemolite.server.schemas import Body, ChatMessage
from nemolite.server.state import Job, RequestError, ServerState, engine_call, state_of

router = APIRouter()

MAX_CONVERSATIONS = 128


class RewardRequest(Body):
    model: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    conversations: list[list[ChatMessage]] | None = Field(None, min_length=1, max_length=MAX_CONVERSATIONS)
    attribute_weights: list[float] | dict[str, float] | None = None


def _require_reward_model(state: ServerState) -> None:
    if not state.config.is_reward_model:
        raise RequestError(f"'{state.model_name}' is not a reward model (its checkpoint has no reward head); "
                           "serve a reward model to score responses")


async def score(state: ServerState, request: Request, token_ids: list[list[int]],
                lora=None) -> list[RequestOutput] | Response:
    """Each prompt's engine output with its reward (or the response for a client that went away); every
    prompt is checked before any runs, so a bad one fails the request whole. ``lora``: an adapter to score with."""
    state.check_sequences(len(token_ids))
    params = SamplingParams(reward=True)
    return await state.collect(request, [Job(ids, params, None, lora) for ids in token_ids])


async def _score_conversations(state: ServerState, request: Request, conversations: list[list[ChatMessage]],
                               lora=None):
    state.check_sequences(len(conversations))
    token_ids = [engine_call(reward_token_ids, state.tokenizer, [m.model_dump(exclude_none=True) for m in messages])
                 for messages in conversations]
    return await score(state, request, token_ids, lora)


@router.post("/v1/reward")
async def reward(body: RewardRequest, request: Request):
    state = state_of(request)
    lora = state.resolve_model(body.model)
    _require_reward_model(state)
    if (body.messages is None) == (body.conversations is None):
        raise RequestError("give 'messages' (one conversation ending with the assistant response to score) or "
                           "'conversations' (a list of them), not both")
    conversations = [body.messages] if body.messages is not None else body.conversations
    names = state.config.reward_attributes
    weights = engine_call(resolve_weights, body.attribute_weights if body.attribute_weights is not None
                          else state.reward_weights, names)
    outputs = await _score_conversations(state, request, conversations, lora)
    if not isinstance(outputs, list):
        return outputs
    return {"object": "reward", "model": state.model_name if lora is None else lora.lora_name,
            "data": [{"index": i, **reward_result(o.reward, names, weights)} for i, o in enumerate(outputs)],
            "usage": {"prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs)}}


async def chat_completion(state: ServerState, body, request: Request, lora=None):
    """A chat completion on a reward model scores the conversation's last assistant message: the attributes
    come back as ``choices[0].logprobs.content[i].token`` / ``.logprob`` and as ``"name:value,..."`` text."""
    if body.stream:
        raise RequestError("a reward model answers with one whole response; send stream: false")
    if body.n != 1:
        raise RequestError("a reward model scores a conversation once; send n: 1")
    outputs = await _score_conversations(state, request, [body.messages], lora)
    if not isinstance(outputs, list):
        return outputs
    output = outputs[0]
    values = dict(zip(state.config.reward_attributes, output.reward))
    shown = [name for name in HELPSTEER2_ATTRIBUTES if name in values] or list(values)
    content = [{"token": name, "logprob": values[name], "bytes": list(name.encode()), "top_logprobs": []}
               for name in shown]
    prompt_tokens = len(output.prompt_token_ids)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": state.model_name if lora is None else lora.lora_name,
            "choices": [{"index": 0, "finish_reason": "length", "logprobs": {"content": content},
                         "message": {"role": "assistant",
                                     "content": ",".join(f"{name}:{values[name]:.2f}" for name in shown)}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}}
