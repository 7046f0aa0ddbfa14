"""AsyncLLM: the engine on a background thread, requests as async streams; the server's only door."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import gc
import itertools
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import torch

from nemolite.engine.llm_engine import LLMEngine
from nemolite.engine.outputs import RequestOutput
from nemolite.engine.sampling_params import SamplingParams
from nemolite.errors import NemoliteError

log = logging.getLogger(__name__)
TORCH_THREADS = torch.get_num_threads()  # torch's own choice (the physical cores), before anyone changes it
# The engine thread lets the GIL go during every long torch op and needs it back to issue the next;
# a thread that wants the GIL waits up to the switch interval (Python's default: 5 ms) while the
# event loop runs Python (JSON, tokenising). At 1 ms the demo model's 15-sequence decode steps in the
# server took 9.8-10.4 instead of 11.1-12.0 ms (SDG open-qa at concurrency 16, 2-core CPU).
GIL_SWITCH_INTERVAL = 0.001


def shared_cpu_threads() -> int | None:
    """Intra-op threads for an engine whose process also runs an event loop: all cores but one.

    OpenMP workers spin between the many small operators of a step; a thread that wakes for HTTP,
    tokenising or handing outputs over then preempts one of them and the whole step waits for it.
    On the 2-core machine we test on, the demo model's step at batch 1 took 8.4 ms in the server with
    2 threads and 4.6 ms with 1 (batch 16: 15.5 and 11.2 ms). vLLM's CPU backend likewise keeps cores
    apart from its OpenMP threads. Steps with long prompts still use all cores (PREFILL_STEP_TOKENS).
    None (torch's choice) when OMP_NUM_THREADS says what to use."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, TORCH_THREADS - 1)


class EngineDeadError(RuntimeError):
    """The engine loop failed; the process should be restarted."""


class AsyncLLM:
    """Requests reach the engine thread through a command queue that it drains before each step,
    so adding or aborting never waits for a step, and a fast engine (CUDA graphs) cannot starve
    the event loop of its lock. Only the engine thread touches the engine."""

    def __init__(self, model: str | Path | None = None, dtype: str | torch.dtype = "auto",
                 device: str | torch.device | None = None, seed: int = 0, tokenizer: str | Path | None = None,
                 **engine_args):
        if engine_args.get("cpu_threads") is None:  # on the CPU: leave a core to the event loop
            engine_args["cpu_threads"] = shared_cpu_threads()
            if engine_args["cpu_threads"] is not None:  # but not in steps of long prompts
                engine_args.setdefault("cpu_prefill_threads", TORCH_THREADS)
        self.engine = LLMEngine.from_pretrained(model, dtype, device, seed, tokenizer, **engine_args)
        if sys.getswitchinterval() > GIL_SWITCH_INTERVAL:
            sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        # What exists now (torch, the model, the tokenizer) lives as long as the process: frozen out of
        # the cyclic GC, an oldest-generation collection scans only what requests allocated since.
        # Unfrozen, each took up to 190 ms of the engine thread (4 in a 15 s SDG run at concurrency 16).
        # vLLM's API server freezes its startup heap the same way.
        gc.collect()
        gc.freeze()
        self.tokenizer, self.config = self.engine.tokenizer, self.engine.config
        self._lock = threading.Lock()  # guards _streams only, never held across a step
        self._wake = threading.Event()
        self._commands: collections.deque = collections.deque()
        self._streams: dict[str, _Stream] = {}
        self._num_sequences = 0
        self._ids = itertools.count()
        self._stats = self.engine.stats()
        self._closed = False
        self.dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nemolite-engine", daemon=True)
        self._thread.start()

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None,
                    request_id: str | None = None, stream: bool = True, validated: bool = False,
                    lora_request=None) -> "RequestStream":
        """Hand one request to the engine now (validated here, in the caller: bad input raises
        NemoliteError; ``validated`` when the caller has just run ``engine.validate_request`` itself) and
        return its stream of outputs. Call from a running event loop; a stream that is dropped
        unfinished aborts its request. ``lora_request``: a LoRARequest the engine has registered
        (``add_lora``), or None for the base model."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead}")
        if not validated:
            self.engine.validate_request(prompt_token_ids, params)
        stream_ = _Stream(asyncio.get_running_loop(), params.n, final_only=not stream)
        with self._lock:
            request_id = f"async-{next(self._ids)}" if request_id is None else request_id
            if request_id in self._streams:
                raise NemoliteError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream_
            self._num_sequences += params.n
        self._commands.append((request_id, prompt, list(prompt_token_ids), params, lora_request))
        self._wake.set()
        return RequestStream(self, request_id, stream_)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None,
                       request_id: str | None = None, stream: bool = True,
                       lora_request=None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request as it progresses; leaving early aborts the request.
        With ``stream=False`` only the first output with a token and the final one come (no wake-up
        per step for a caller that wants the end result). A structured output's grammar is compiled on a
        worker thread first, so that neither the engine nor the event loop waits for it."""
        if params.structured_outputs is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.grammars.compile,
                                                             params.structured_outputs)
        request = self.add_request(prompt_token_ids, params, prompt, request_id, stream, lora_request=lora_request)
        try:
            async for output in request:
                yield output
        finally:
            request.abort()

    def call_blocking(self, function: Callable, *args):
        """``function(engine, *args)`` on the engine thread, between steps (the engine is not thread-safe:
        adding or removing a LoRA adapter goes this way); its result, or its exception raised here."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.append((function, args, future))
        self._wake.set()
        return future.result()

    async def call(self, function: Callable, *args):
        """``call_blocking`` from an event loop, without blocking it."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.append((function, args, future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    def abort(self, request_id: str) -> None:
        """Stop a request; the engine frees its KV blocks before its next step."""
        with self._lock:
            self._forget(request_id)
        self._commands.append(request_id)
        self._wake.set()

    def _forget(self, request_id: str) -> "_Stream | None":
        """Drop a request's stream (call with the lock held)."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._num_sequences -= stream.num_sequences
        return stream

    def stats(self) -> dict[str, float]:
        """The engine's counters as of its last step or command (never waits for a step)."""
        return dict(self._stats)

    @property
    def num_requests(self) -> int:
        """Requests added and not yet finished or aborted."""
        return len(self._streams)

    @property
    def num_sequences(self) -> int:
        """Sequences (``n`` per request) of the requests added and not yet finished or aborted."""
        return self._num_sequences

    def shutdown(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)

    def _apply_commands(self) -> bool:
        """Add and abort what callers asked for since the last step; True if there was anything."""
        applied = False
        while self._commands:
            command = self._commands.popleft()
            applied = True
            if isinstance(command, str):
                with self._lock:
                    self._forget(command)
                self.engine.abort_request(command)
                continue
            if callable(command[0]):
                function, args, future = command
                try:
                    future.set_result(function(self.engine, *args))
                except Exception as error:  # noqa: BLE001 - the caller's to handle
                    future.set_exception(error)
                continue
            request_id = command[0]
            try:
                self.engine.add_request(*command)
            except Exception as error:  # noqa: BLE001 - this request's own failure: tell its caller alone
                if not isinstance(error, NemoliteError):
                    log.exception("adding request %s failed", request_id)
                with self._lock:
                    stream = self._forget(request_id)
                if stream is not None:
                    _deliver([(stream, error)])
        return applied

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self.engine.close()  # from this thread: the only one that talks to the other ranks

    def _loop(self) -> None:
        while not self._closed:
            try:
                if self._apply_commands():
                    self._stats = self.engine.stats()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    self.engine.runner.keep_alive()
                    continue
                moved = self.engine.step_requests()
                self._stats = self.engine.stats()
            except Exception as error:  # noqa: BLE001 - every waiting stream must hear of it
                log.exception("engine step failed")
                self.dead = error
                with self._lock:
                    streams, self._streams, self._num_sequences = list(self._streams.values()), {}, 0
                _deliver([(stream, error) for stream in streams])
                while self._commands:  # calls waiting for the engine thread hear of it too
                    command = self._commands.popleft()
                    if not isinstance(command, str) and callable(command[0]):
                        command[2].set_exception(EngineDeadError(f"the engine stopped: {error}"))
                return
            targets = []
            with self._lock:
                for request, finished in moved:
                    stream = self._forget(request.request_id) if finished else self._streams.get(request.request_id)
                    if stream is not None and (finished or not stream.final_only or not stream.started):
                        stream.started = True
                        targets.append((stream, request, finished))
            _deliver([(stream, request.error if request.error is not None else request.output(finished))
                      for stream, request, finished in targets])


class RequestFailedError(RuntimeError):
    """One request failed in the engine for a reason that is not its input's fault (a bug it hit);
    the engine went on with every other request."""


class RequestStream:
    """The outputs of one request added with ``AsyncLLM.add_request``: iterate it (cumulative outputs,
    the last one finished); ``abort()`` stops it. Its request's failure is raised by the iteration:
    NemoliteError when the input was at fault, RequestFailedError otherwise, EngineDeadError when the
    engine itself stopped."""

    def __init__(self, engine: AsyncLLM, request_id: str, stream: "_Stream"):
        self.engine, self.request_id, self._stream = engine, request_id, stream
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        stream = self._stream
        while not self.finished:
            await stream.ready.wait()
            stream.ready.clear()
            item, stream.latest = stream.latest, None
            if isinstance(item, BaseException):
                self.finished = True
                if isinstance(item, NemoliteError):
                    raise item
                if self.engine.dead is not None:
                    raise EngineDeadError(f"the engine stopped: {item}")
                raise RequestFailedError(f"this request failed in the engine ({type(item).__name__}: {item}); "
                                         "the server logged it") from item
            if item is None:
                continue
            self.finished = item.finished
            yield item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)

    def __del__(self) -> None:  # a stream nobody reads any more (a response that never started)
        if not self.finished:  # no lock here: the collector may run on the engine thread while it holds it
            self.engine._commands.append(self.request_id)
            self.engine._wake.set()


class _Stream:
    """Where the engine thread leaves a request's newest output. Outputs are cumulative, so a consumer
    slower than the engine skips intermediate snapshots instead of queueing them."""

    __slots__ = ("loop", "ready", "latest", "final_only", "started", "num_sequences")

    def __init__(self, loop: asyncio.AbstractEventLoop, num_sequences: int, final_only: bool = False):
        self.loop = loop
        self.num_sequences = num_sequences
        self.final_only = final_only  # deliver the first output and the last one only
        self.started = False
        self.ready = asyncio.Event()
        self.latest: RequestOutput | BaseException | None = None


def _deliver(items: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    """Hand one step's outputs over: one wake-up per event loop, not one per request."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for stream, item in items:
        by_loop.setdefault(stream.loop, []).append((stream, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_publish, batch)
        except RuntimeError:  # that loop is closed: nobody is listening any more
            pass


def _publish(batch: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    for stream, item in batch:
        if not isinstance(stream.latest, BaseException):
            stream.latest = item
        stream.ready.set()
