"""One FastAPI app over one AsyncLLM; each protocol (nemo, openai, triton) is a router of its own.

Everything a protocol shares lives here: admission (a bounded queue), metrics, API-key check, the
access log, error bodies (a 4xx with a message, never a stack trace) and cancellation of requests
whose client went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from nemolite.engine.async_llm import AsyncLLM, EngineDeadError
from nemolite.engine.outputs import RequestOutput
from nemolite.engine.sampling_params import SamplingParams
from nemolite.errors import NemoliteError
from nemolite.json_body import parse_json_object
from nemolite.reward import resolve_weights
from nemolite.server.metrics import Metrics

log = logging.getLogger("nemolite.server")
access_log = logging.getLogger("nemolite.access")

DEFAULT_MAX_QUEUE = 1024
UNAUTHENTICATED = ("/health", "/v2/health/live", "/v2/health/ready")


class RequestError(Exception):
    """A request the server will not run; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


class ServerState:
    """What every protocol module needs: the engine, its tokenizer, the served name, admission, metrics."""

    def __init__(self, engine: AsyncLLM, model_name: str, max_queue: int = DEFAULT_MAX_QUEUE,
                 reward_weights: list[float] | None = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.config = engine.config
        self.model_name = model_name
        self.max_model_len = engine.config.max_position_embeddings
        self.capacity = engine.engine.args.max_num_seqs + max_queue
        self.metrics = Metrics(engine.stats, model_name)
        self.created = int(time.time())
        # A reward model's default attribute weights (None: HelpSteer2's for nine attributes, else uniform).
        self.reward_weights = reward_weights

    def admit(self, count: int = 1) -> None:
        """Refuse work beyond the running batch plus the bounded queue (503: retry later)."""
        if self.engine.dead is not None:
            raise RequestError(f"the engine stopped ({self.engine.dead}); restart the server", 503)
        if self.engine.num_requests + count > self.capacity:
            raise RequestError(f"the server is busy: {self.engine.num_requests} requests in flight, at most "
                               f"{self.capacity}; retry later", 503)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None, stream: bool = True) -> AsyncIterator[RequestOutput]:
        """The engine's cumulative outputs for one request (``stream=False``: the first and the last),
        with latency and token metrics recorded."""
        metrics, arrival = self.metrics, time.monotonic()
        first_token = None
        last: RequestOutput | None = None
        try:
            async for output in self.engine.generate(prompt_token_ids, params, prompt, stream=stream):
                if first_token is None and any(o.token_ids for o in output.outputs):
                    first_token = time.monotonic()
                    metrics.time_to_first_token.observe(first_token - arrival)
                last = output
                yield output
        finally:
            now = time.monotonic()
            metrics.prompt_tokens.inc(len(prompt_token_ids))
            generated = sum(len(o.token_ids) for o in last.outputs) if last is not None else 0
            metrics.generation_tokens.inc(generated)
            if last is not None and last.finished:
                metrics.e2e_latency.observe(now - arrival)
                longest = max(len(o.token_ids) for o in last.outputs)
                if first_token is not None and longest > 1:
                    metrics.time_per_output_token.observe((now - first_token) / (longest - 1))

    async def generate_final(self, prompt_token_ids: list[int], params: SamplingParams,
                             prompt: str | None = None) -> RequestOutput:
        """Run one request to the end."""
        final = None
        async for final in self.generate(prompt_token_ids, params, prompt, stream=False):
            pass
        assert final is not None and final.finished
        return final


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
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    return task.result()


def protocol_of(path: str) -> str:
    if path.startswith("/v1/") or path in ("/tokenize", "/detokenize", "/tokenizer_info"):
        return "openai"
    if path.startswith("/v2/"):
        return "triton"
    if path == "/generate":
        return "nemo"
    return "other"


def error_response(path: str, status: int, message: str) -> JSONResponse:
    """OpenAI clients read ``error.message``; NeMo and Triton clients read ``error`` as a string."""
    if protocol_of(path) == "openai":
        kind = "invalid_request_error" if status < 500 else "server_error"
        body: dict = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status)


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
        message = item.get("msg", "invalid value")
        if item.get("type") == "json_invalid":
            return "the request body is not valid JSON"
        if item.get("type") in ("model_attributes_type", "dict_type") and not location:
            return "the request body must be a JSON object, sent with 'Content-Type: application/json'"
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts) or "invalid request"


def build_app(engine: AsyncLLM, model_name: str, *, api_key: str | None = None,
              max_queue: int = DEFAULT_MAX_QUEUE, shutdown_engine: bool = True,
              reward_weights: list[float] | None = None) -> FastAPI:
    """The HTTP app over ``engine``; ``shutdown_engine`` stops the engine thread when the app stops."""
    from nemolite.server import nemo, openai, reward, triton

    if reward_weights is not None:
        resolve_weights(reward_weights, engine.config.reward_attributes)  # a bad --reward-weights fails at start
    state = ServerState(engine, model_name, max_queue, reward_weights)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if shutdown_engine:
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="nemolite", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.nemolite = state

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.monotonic()
        path = request.url.path
        if api_key is not None and path not in UNAUTHENTICATED:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                response = error_response(path, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
                return _finish(request, response, started, state)
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - a bug must cost one request, never the server
            log.exception("unhandled error in %s %s", request.method, path)
            response = error_response(path, 500, "internal error; the server logged it")
        return _finish(request, response, started, state)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return error_response(request.url.path, error.status, error.message)

    @app.exception_handler(NemoliteError)
    async def nemolite_error(request: Request, error: NemoliteError):
        return error_response(request.url.path, 400, str(error))

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, error: EngineDeadError):
        return error_response(request.url.path, 503, f"{error}; restart the server")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return error_response(request.url.path, 400, _validation_message(error))

    @app.exception_handler(UnicodeError)
    async def not_unicode(request: Request, error: UnicodeError):
        return error_response(request.url.path, 400, "text must be valid Unicode (no lone surrogates such as "
                                                     "\\ud800, no invalid UTF-8)")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        elif error.status_code == 400 and "parsing the body" in str(error.detail):
            message = "the request body is not valid JSON (or not UTF-8, or nested too deeply)"
        else:
            message = str(error.detail)
        return error_response(request.url.path, error.status_code, message)

    @app.get("/health")
    async def health():
        if engine.dead is not None:
            return JSONResponse({"status": "error", "error": str(engine.dead)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(nemo.router)
    app.include_router(openai.router)
    app.include_router(reward.router)
    app.include_router(triton.router)
    return app


def _finish(request: Request, response: Response, started: float, state: ServerState) -> Response:
    path = request.url.path
    state.metrics.requests.labels(protocol_of(path), str(response.status_code)).inc()
    if access_log.isEnabledFor(logging.INFO):
        client = request.client
        access_log.info(json.dumps({
            "time": round(time.time(), 3), "client": f"{client.host}:{client.port}" if client else None,
            "method": request.method, "path": path, "status": response.status_code,
            "ms": round(1000 * (time.monotonic() - started), 1)}))
    return response


def state_of(request: Request) -> ServerState:
    return request.app.state.nemolite


def serve(engine: AsyncLLM, model_name: str, host: str, port: int, *, api_key: str | None = None,
          max_queue: int = DEFAULT_MAX_QUEUE, graceful_timeout: float = 30.0,
          reward_weights: list[float] | None = None) -> None:
    """Run the server until SIGINT/SIGTERM: new connections stop, in-flight requests get
    ``graceful_timeout`` seconds to finish and are then aborted, and the engine stops."""
    import uvicorn

    app = build_app(engine, model_name, api_key=api_key, max_queue=max_queue, reward_weights=reward_weights)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=graceful_timeout)
    uvicorn.Server(config).run()
