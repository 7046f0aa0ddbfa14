"""Where SDG requests go: an OpenAI-compatible server or an in-process ``AsyncLLM``, for generation
and for reward scoring. The pipelines see one shape either way: ``chat(messages, sampling, seed)``
returns {text, prompt_tokens, completion_tokens, finish_reason}; ``score(messages)`` returns
{attributes, score} (the last message is the assistant response being scored). A chat backend's
``structured_lists`` says whether its engine is nemolite's, whose structured output (the sampling
field ``structured_outputs``) the list stages use to get JSON arrays they need not reformat.

HTTP calls retry what a busy or restarting server answers (429, 5xx, refused connections,
timeouts) with exponential backoff and jitter, a bounded number of times; any other 4xx fails that
request at once with the server's message (retrying a bad request cannot help).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from nemolite.errors import NemoliteError

# Statuses that condemn one request (its prompt is too long, a field is invalid), not the whole run.
REQUEST_STATUSES = (400, 413, 422)


class RequestFailed(NemoliteError):
    """The server refused a request; ``status`` says whether it was this request or the setup."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class HttpClient:
    """One connection pool with the retry policy; counts retries for the summary."""

    def __init__(self, endpoint: str, api_key: str | None = None, *, attempts: int = 6, base_delay: float = 0.5,
                 max_delay: float = 30.0, timeout: float = 600.0):
        self.base = endpoint.rstrip("/").removesuffix("/v1")
        if not self.base.startswith(("http://", "https://")):
            raise NemoliteError(f"endpoint {endpoint!r} must be a URL such as http://localhost:1424")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No pool limit: the run's sliding window bounds the requests in flight.
        self.client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        self.attempts, self.base_delay, self.max_delay = attempts, base_delay, max_delay
        self.retries = 0

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        url = self.base + path
        for attempt in range(self.attempts):
            try:
                response = await self.client.request(method, url, json=body)
            except httpx.TransportError as error:  # refused, reset, timed out
                failure, wait = f"{type(error).__name__}: {error}".rstrip(": "), None
            else:
                if response.status_code == 200:
                    return response.json()
                message = _server_message(response)
                if response.status_code != 429 and response.status_code < 500:
                    raise RequestFailed(f"{url} answered {response.status_code}: {message}", response.status_code)
                failure, wait = f"HTTP {response.status_code}: {message}", _retry_after(response)
            if attempt + 1 == self.attempts:
                raise NemoliteError(f"{url} failed {self.attempts} times, last with {failure}; check the server, "
                                    "then rerun the same command to resume")
            self.retries += 1
            delay = min(self.max_delay, self.base_delay * 2 ** attempt)
            await asyncio.sleep(wait if wait is not None else delay + random.uniform(0, self.base_delay))
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self.client.aclose()


def _server_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", response.text)
    except (ValueError, AttributeError):
        return response.text[:500]
    return str(error.get("message", error) if isinstance(error, dict) else error)[:500]


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(60.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


class OpenAIChat:
    """``/v1/chat/completions`` of any OpenAI-compatible server (nemolite, vLLM, NIM...)."""

    def __init__(self, endpoint: str, api_key: str | None = None, model: str | None = None, **retry):
        self.http = HttpClient(endpoint, api_key, **retry)
        self.model = model
        self.structured_lists = False  # known after start()

    async def start(self) -> None:
        """Read ``/v1/models``: without a model name, which model the server serves (vLLM and NIM require
        one); and whether that model is nemolite's (``owned_by: "nemolite"``), whose chat completions take
        ``structured_outputs``. With a model name, a listing the server refuses (404: it has none), that is
        not JSON or that lacks the model only means no structured lists; one that still fails after the
        retries (the server is down) fails the start, as the first request would."""
        try:
            listing = await self.http.request("GET", "/v1/models")
        except (RequestFailed, json.JSONDecodeError, UnicodeDecodeError):  # the last two: not JSON
            if self.model is None:
                raise
            listing = None
        models = listing.get("data") if isinstance(listing, dict) else None
        if self.model is None:
            if not models:
                raise NemoliteError(f"{self.http.base}/v1/models lists no model; give --model NAME")
            self.model = models[0]["id"]
        entry = next((m for m in models or () if isinstance(m, dict) and m.get("id") == self.model), None)
        self.structured_lists = entry is not None and entry.get("owned_by") == "nemolite"

    @property
    def name(self) -> str:
        return str(self.model)

    @property
    def retries(self) -> int:
        return self.http.retries

    async def chat(self, messages: list[dict], sampling: Mapping, seed: int) -> dict:
        body = {"model": self.model, "messages": messages, "seed": seed, **sampling}
        answer = await self.http.request("POST", "/v1/chat/completions", body)
        try:
            choice, usage = answer["choices"][0], answer.get("usage") or {}
            return {"text": choice["message"]["content"] or "", "finish_reason": choice.get("finish_reason"),
                    "prompt_tokens": usage.get("prompt_tokens", 0),
                    "completion_tokens": usage.get("completion_tokens", 0)}
        except (KeyError, IndexError, TypeError):
            raise NemoliteError(f"{self.http.base}/v1/chat/completions answered without choices[0].message; "
                                "is it an OpenAI-compatible server?") from None

    async def aclose(self) -> None:
        await self.http.aclose()


class InProcessChat:
    """The same requests run on an ``AsyncLLM`` in this process (no server)."""

    structured_lists = True  # the sampling dict becomes SamplingParams, structured_outputs included

    def __init__(self, engine, name: str = "in-process"):
        self.engine, self.name = engine, name

    async def start(self) -> None:
        pass

    async def chat(self, messages: list[dict], sampling: Mapping, seed: int) -> dict:
        from nemolite.engine.llm import with_chat_stops
        from nemolite.engine.sampling_params import SamplingParams

        tokenizer = self.engine.tokenizer
        try:
            params = with_chat_stops(tokenizer, SamplingParams(seed=seed, **sampling))
        except TypeError as error:
            raise NemoliteError(f"sampling: {error}; give SamplingParams fields (temperature, top_p, "
                                "max_tokens...)") from None
        try:
            ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_bos=False)
            final = None
            async for final in self.engine.generate(ids, params, stream=False):
                pass
        except NemoliteError as error:  # this prompt (too long for the context, say), not the run
            raise RequestFailed(str(error)) from None
        completion = final.outputs[0]
        return {"text": completion.text, "finish_reason": completion.finish_reason, "prompt_tokens": len(ids),
                "completion_tokens": len(completion.token_ids)}

    async def aclose(self) -> None:
        pass


def _reward_item(item: Any, where: str) -> dict:
    if not (isinstance(item, dict) and isinstance(item.get("attributes"), dict)
            and isinstance(item.get("score"), (int, float))):
        raise NemoliteError(f"{where} did not answer {{attributes: {{...}}, score: number}}; is it a reward model?")
    return {"attributes": {k: float(v) for k, v in item["attributes"].items()}, "score": float(item["score"])}


class HttpReward:
    """``POST /v1/reward`` of a nemolite reward server: one conversation, every attribute and the score."""

    def __init__(self, endpoint: str, api_key: str | None = None, model: str | None = None,
                 weights: Sequence[float] | Mapping[str, float] | None = None, **retry):
        self.http = HttpClient(endpoint, api_key, **retry)
        self.model, self.weights = model, weights

    @property
    def name(self) -> str:
        return f"{self.http.base}/v1/reward" + (f" ({self.model})" if self.model else "")

    @property
    def identity(self) -> dict:
        """What decides a score, for the reward cache: the server, the model asked for (None: whichever it
        serves, so a different model behind the same URL goes unnoticed) and the attribute weights."""
        return {"url": f"{self.http.base}/v1/reward", "model": self.model, "weights": self.weights}

    @property
    def retries(self) -> int:
        return self.http.retries

    async def score(self, messages: list[dict]) -> dict:
        body: dict = {"messages": messages}
        if self.model is not None:
            body["model"] = self.model
        if self.weights is not None:
            body["attribute_weights"] = self.weights
        answer = await self.http.request("POST", "/v1/reward", body)
        data = answer.get("data") if isinstance(answer, dict) else None
        return _reward_item(data[0] if data else None, f"{self.http.base}/v1/reward")

    async def aclose(self) -> None:
        await self.http.aclose()


class InProcessReward:
    """A reward model on an ``AsyncLLM`` in this process, through ``nemolite.reward.score_conversation``."""

    def __init__(self, engine, weights: Sequence[float] | Mapping[str, float] | None = None,
                 name: str = "in-process"):
        self.engine, self.weights, self.name = engine, weights, name

    @property
    def identity(self) -> dict:
        """What decides a score, for the reward cache: the checkpoint (its name is its path, or the demo
        model's name) and the attribute weights."""
        return {"model": self.name, "weights": self.weights}

    async def score(self, messages: list[dict]) -> dict:
        from nemolite.reward import score_conversation

        try:
            result = await score_conversation(self.engine, messages, self.weights)
        except NemoliteError as error:
            raise RequestFailed(str(error)) from None
        return _reward_item(result, "score_conversation")

    async def aclose(self) -> None:
        pass
