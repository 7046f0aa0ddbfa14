"""What every protocol router shares: the server's state and the one admission path.

A router parses its protocol into ``Job``s (token ids, SamplingParams, prompt text) and hands them
all to ``ServerState.submit``, which validates every job against the model and the limits before
any runs, admits the request whole or not at all (counting sequences: prompts x n), and adds them
to the engine at once. ``collect`` and ``merged`` then run them: a failure of one job or a client
that goes away cancels every sibling, so nothing keeps generating for a request already answered.

Routers import this module, ``app`` imports the routers: the import graph runs one way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from nemolite.engine.async_llm import AsyncLLM, RequestStream
from nemolite.engine.outputs import RequestOutput
from nemolite.engine.sampling_params import SamplingParams
from nemolite.errors import NemoliteError
from nemolite.json_body import parse_json_object
from nemolite.lora.request import LoRARequest
from nemolite.server.metrics import Metrics

DEFAULT_MAX_QUEUE = 1024  # sequences waiting beyond the running batch (--max-queue)
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20  # request body (--max-request-bytes)
# Text longer than this is tokenised (and chat-templated) on a worker thread, so that one large request
# never holds up the event loop's other clients; shorter text costs less than the hop to a thread.
OFF_LOOP_CHARACTERS = 4096


# JSON has no -Infinity: a token that a filter (allowed_token_ids, min_tokens) made impossible is sent
# with this logprob, as vLLM's OpenAI server does.
LOGPROB_FLOOR = -9999.0


def json_logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


class RequestError(Exception):
    """A request the server will not run; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


@dataclasses.dataclass(slots=True)
class Job:
    """One engine request of an HTTP request."""

    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    lora_request: LoRARequest | None = None  # the adapter the request's model name chose


class ServerState:
    """What every protocol module needs: the engine, its tokenizer, the served name, admission, metrics."""

    def __init__(self, engine: AsyncLLM, model_name: str, max_queue: int = DEFAULT_MAX_QUEUE,
                 reward_weights: list[float] | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 allow_runtime_lora: bool = False):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.config = engine.config
        self.model_name = model_name
        self.max_model_len = engine.config.max_position_embeddings
        self.limits = engine.engine.args.limits
        self.max_queue = max_queue
        self.capacity = engine.engine.args.max_num_seqs + max_queue  # sequences
        self.max_request_bytes = max_request_bytes
        self.metrics = Metrics(engine.stats, model_name)
        self.created = int(time.time())
        # A reward model's default attribute weights (None: HelpSteer2's for nine attributes, else uniform).
        self.reward_weights = reward_weights
        self._workers = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="nemolite-tokenize")
        self.loras: dict[str, LoRARequest] = {}  # served adapters by name (--lora-modules, load_lora_adapter)
        self.allow_runtime_lora = allow_runtime_lora
        self._lora_ids = itertools.count(1)

    def resolve_model(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's model name picks: None for the base model (named or left out); any other
        name is a 404 that lists the served ones."""
        if model is None or model in (self.model_name, ""):
            return None
        lora = self.loras.get(model) if isinstance(model, str) else None
        if lora is None:
            served = ", ".join(repr(name) for name in [self.model_name, *self.loras])
            raise RequestError(f"the model {str(model)[:200]!r} does not exist; this server serves {served}", 404)
        return lora

    # ------------------------------------------------------------------ LoRA adapters

    def lora_request(self, name, path) -> LoRARequest:
        """A new adapter's LoRARequest, its name and path checked (a name must be new and printable)."""
        if not isinstance(name, str) or not 0 < len(name) <= 256 or not name.isprintable():
            raise RequestError("an adapter's name must be a printable string of 1 to 256 characters")
        if name == self.model_name or name in self.loras:
            raise RequestError(f"the name {name!r} is taken; give the adapter another name")
        if not isinstance(path, str) or not path:
            raise RequestError("an adapter's path must be a non-empty string")
        return LoRARequest(name, next(self._lora_ids), path, self.model_name)

    def add_lora_blocking(self, name: str, path: str) -> LoRARequest:
        """Read and register an adapter before serving (raises NemoliteError for a bad one)."""
        lora = self.lora_request(name, path)
        self.engine.call_blocking(lambda engine, request: engine.add_lora(request), lora)
        self.loras[name] = lora
        return lora

    async def load_lora(self, name, path) -> LoRARequest:
        lora = self.lora_request(name, path)
        try:
            await self.engine.call(lambda engine, request: engine.add_lora(request), lora)
        except NemoliteError as error:
            raise RequestError(str(error)) from None
        if name in self.loras:  # loaded twice at once: the first one stays
            raise RequestError(f"the name {name!r} is taken; give the adapter another name")
        self.loras[name] = lora
        return lora

    async def unload_lora(self, name) -> None:
        lora = self.loras.get(name) if isinstance(name, str) else None
        if lora is None:
            raise RequestError(f"no adapter named {str(name)[:200]!r} is loaded; loaded: {sorted(self.loras)}", 404)
        try:
            await self.engine.call(lambda engine, lora_id: engine.remove_lora(lora_id), lora.lora_int_id)
        except NemoliteError as error:
            raise RequestError(str(error), 409) from None
        self.loras.pop(name, None)

    # ------------------------------------------------------------------ text in, off the loop when large

    async def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return await self._call(len(text) if isinstance(text, str) else 0, self.tokenizer.encode, text, add_bos)

    async def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True,
                          tools: list[dict] | None = None) -> str:
        size = sum(len(str(message.get("content", ""))) for message in messages if isinstance(message, dict))
        size += len(str(tools)) if tools else 0
        return await self._call(size, self.tokenizer.apply_chat_template, messages, add_generation_prompt, tools)

    async def decode(self, token_ids: list[int]) -> str:
        return await self._call(len(token_ids), self.tokenizer.decode, token_ids)

    async def _call(self, size: int, function: Callable[..., Any], *args) -> Any:
        if size <= OFF_LOOP_CHARACTERS:
            return engine_call(function, *args)
        return await asyncio.get_running_loop().run_in_executor(self._workers, engine_call, function, *args)

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ admission

    def check_sequences(self, count: int) -> None:
        """Refuse a request of more than the per-request limit of sequences before any work is done for it."""
        if count > self.limits.max_seqs_per_request:
            raise RequestError(f"this request asks for {count} sequences (prompts x n); this server runs at "
                               f"most {self.limits.max_seqs_per_request} per request (--max-seqs-per-request)")

    def submit(self, jobs: list[Job], stream: bool = False) -> list[RequestStream]:
        """Validate every job, then admit all of them or none; their streams, already in the engine."""
        if self.engine.dead is not None:
            raise RequestError(f"the engine stopped ({self.engine.dead}); restart the server", 503)
        for index, job in enumerate(jobs):
            try:
                self.engine.engine.validate_request(job.prompt_token_ids, job.params)
            except NemoliteError as error:
                raise RequestError(f"prompt {index}: {error}" if len(jobs) > 1 else str(error)) from None
        sequences = sum(job.params.n for job in jobs)
        self.check_sequences(sequences)
        in_flight = self.engine.num_sequences
        if in_flight + sequences > self.capacity:
            raise RequestError(f"the server is busy: {in_flight} sequences in flight, at most {self.capacity} "
                               "(--max-num-seqs + --max-queue); retry later", 503)
        streams: list[RequestStream] = []
        try:
            for job in jobs:
                streams.append(self.engine.add_request(job.prompt_token_ids, job.params, job.prompt, stream=stream,
                                                       validated=True, lora_request=job.lora_request))
        except BaseException:
            for added in streams:
                added.abort()
            raise
        return streams

    async def compile_grammars(self, jobs: list[Job]) -> None:
        """Compile the structured outputs of ``jobs`` (each distinct one once, cached) on a worker thread, so
        that the engine finds them ready and no request waits for another's grammar; a bad schema, regex
        or grammar is a 400 that names the problem."""
        specs = {job.params.structured_outputs.key: job.params.structured_outputs for job in jobs
                 if job.params.structured_outputs is not None}
        grammars = self.engine.engine.grammars
        for spec in specs.values():
            await asyncio.get_running_loop().run_in_executor(self._workers, engine_call, grammars.compile, spec)

    async def collect(self, request: Request, jobs: list[Job]) -> list[RequestOutput] | Response:
        """Run every job to its end: the final outputs in order, or the response for a client that went
        away. The first failure cancels every sibling and is raised."""
        await self.compile_grammars(jobs)
        streams = self.submit(jobs)
        tasks = [asyncio.ensure_future(self._final(stream, job)) for stream, job in zip(streams, jobs)]
        return await cancel_on_disconnect(request, _all_or_none(tasks, streams))

    async def merged(self, jobs: list[Job], streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of ``submit``ted jobs as they come, tagged with the job's index; leaving early or a
        failure of one aborts them all."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index: int) -> None:
            try:
                async for output in self._observe(streams[index], jobs[index]):
                    queue.put_nowait((index, output))
            except Exception as error:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((index, error))
            finally:
                queue.put_nowait((index, done))

        tasks = [asyncio.ensure_future(pump(index)) for index in range(len(jobs))]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            for stream in streams:
                stream.abort()

    async def _final(self, stream: RequestStream, job: Job) -> RequestOutput:
        final = None
        async for final in self._observe(stream, job):
            pass
        assert final is not None and final.finished
        return final

    async def _observe(self, stream: RequestStream, job: Job) -> AsyncIterator[RequestOutput]:
        """The stream's outputs, with latency and token metrics recorded."""
        metrics, arrival = self.metrics, time.monotonic()
        first_token = None
        last: RequestOutput | None = None
        try:
            async for output in stream:
                if first_token is None and any(o.token_ids for o in output.outputs):
                    first_token = time.monotonic()
                    metrics.time_to_first_token.observe(first_token - arrival)
                last = output
                yield output
        finally:
            stream.abort()
            now = time.monotonic()
            generated = sum(len(o.token_ids) for o in last.outputs) if last is not None else 0
            metrics.prompt_tokens.inc(len(job.prompt_token_ids))
            metrics.generation_tokens.inc(generated)
            if job.lora_request is not None:
                metrics.lora_requests.labels(job.lora_request.lora_name).inc()
                metrics.lora_generation_tokens.labels(job.lora_request.lora_name).inc(generated)
            if last is not None and last.finished:
                metrics.e2e_latency.observe(now - arrival)
                longest = max(len(o.token_ids) for o in last.outputs)
                if first_token is not None and longest > 1:
                    metrics.time_per_output_token.observe((now - first_token) / (longest - 1))


async def _all_or_none(tasks: list[asyncio.Future], streams: list[RequestStream]) -> list[RequestOutput]:
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()
        await asyncio.gather(*tasks, return_exceptions=True)


def engine_call(function: Callable[..., Any], *args, **kwargs) -> Any:
    """Call into the engine or tokenizer, turning NemoliteError (bad input) into a 400."""
    try:
        return function(*args, **kwargs)
    except NemoliteError as error:
        raise RequestError(str(error)) from error


async def read_json_object(request: Request) -> dict:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        return parse_json_object(await request.body(), "the request body")
    except ValueError as error:
        raise RequestError(str(error)) from None


async def cancel_on_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work`` unless the client goes away first; then cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is stopping: stop the work too
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    return task.result()


def state_of(request: Request) -> ServerState:
    return request.app.state.nemolite
