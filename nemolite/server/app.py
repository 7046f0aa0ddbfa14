"""One FastAPI app over one AsyncLLM; each protocol (nemo, openai, triton, reward) is a router of its own.

The routers share state and admission through ``nemolite.server.state``; this module composes them
and adds what wraps every route: the API-key check, the request-body limit, the access log, and error
bodies (a 4xx with a message, never a stack trace).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from nemolite.engine.async_llm import AsyncLLM, EngineDeadError, RequestFailedError
from nemolite.errors import NemoliteError
from nemolite.reward import resolve_weights
from nemolite.server import nemo, openai, playground, reward, triton
from nemolite.server.state import DEFAULT_MAX_QUEUE, DEFAULT_MAX_REQUEST_BYTES, RequestError, ServerState

log = logging.getLogger("nemolite.server")
access_log = logging.getLogger("nemolite.access")

UNAUTHENTICATED = ("/health", "/v2/health/live", "/v2/health/ready")
# Health probes and metric scrapes (the playground's live panel scrapes every second) are access-logged at
# DEBUG when they succeed: at INFO they would bury the requests in the log.
POLLED = (*UNAUTHENTICATED, "/metrics")


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


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server's {limit} bytes (--max-request-bytes)")


class BodyLimit:
    """ASGI middleware: a body larger than ``limit`` bytes is refused with 413, by its Content-Length
    before anything is read, or as soon as a chunked body passes the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            error = BodyTooLarge(self.limit) if declared.isdigit() else \
                StarletteHTTPException(400, "the Content-Length header is not a number")
            response = error_response(scope.get("path", ""), error.status_code, error.detail)
            return await response(scope, receive, send)
        received, refused, started = 0, False, False

        async def limited_receive():
            # Past the limit the client is answered 413 here, and the app reads a disconnect: it stops
            # reading, and whatever it answers is dropped.
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    if not started:
                        error = BodyTooLarge(self.limit)
                        await error_response(scope.get("path", ""), 413, error.detail)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


def build_app(engine: AsyncLLM, model_name: str, *, api_key: str | None = None,
              max_queue: int = DEFAULT_MAX_QUEUE, shutdown_engine: bool = True,
              reward_weights: list[float] | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, lora_modules: dict[str, str] | None = None,
              allow_runtime_lora: bool = False, enable_playground: bool = True) -> FastAPI:
    """The HTTP app over ``engine``; ``shutdown_engine`` stops the engine thread when the app stops.
    Per-request limits (stop strings, logprobs, sequences per request ...) are the engine's
    ``EngineArgs.limits``; ``max_queue`` counts sequences waiting beyond the running batch.
    ``lora_modules``: adapters served by name (read and checked now; the engine needs enable_lora).
    ``enable_playground``: the web page at ``/`` (nemolite.server.playground)."""
    if reward_weights is not None:
        resolve_weights(reward_weights, engine.config.reward_attributes)  # a bad --reward-weights fails at start
    if max_request_bytes < 1:
        raise NemoliteError(f"--max-request-bytes must be >= 1, got {max_request_bytes}")
    state = ServerState(engine, model_name, max_queue, reward_weights, max_request_bytes, allow_runtime_lora)
    if (lora_modules or allow_runtime_lora) and engine.engine.lora is None:
        raise NemoliteError("--lora-modules, --lora-dir and --allow-runtime-lora need --enable-lora")
    for name, path in (lora_modules or {}).items():
        try:
            state.add_lora_blocking(name, path)
        except RequestError as error:
            raise NemoliteError(f"--lora-modules {name}: {error.message}") from None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        history = asyncio.create_task(app.state.token_history.run()) if enable_playground else None
        yield
        if history is not None:
            history.cancel()
        state.close()
        if shutdown_engine:
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    public = frozenset(UNAUTHENTICATED) | (playground.PUBLIC_PATHS if enable_playground else frozenset())
    app = FastAPI(title="nemolite", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.nemolite = state
    if enable_playground:
        app.state.token_history = playground.TokenHistory(engine.stats)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.monotonic()
        path = request.url.path
        if api_key is not None and path not in public:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                response = error_response(path, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
                return _finish(request, response, started, state)
        try:
            response = await call_next(request)
        except ClientDisconnect:  # gone while its body was read (or refused by BodyLimit): nobody listens
            response = Response(status_code=499)
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

    @app.exception_handler(RequestFailedError)
    async def request_failed(request: Request, error: RequestFailedError):
        log.error("request failed in the engine: %s", error)
        return error_response(request.url.path, 500, str(error))

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
    if enable_playground:
        app.include_router(playground.router)
    app.add_middleware(BodyLimit, limit=max_request_bytes)
    return app


def _finish(request: Request, response: Response, started: float, state: ServerState) -> Response:
    path = request.url.path
    state.metrics.requests.labels(protocol_of(path), str(response.status_code)).inc()
    level = logging.DEBUG if path in POLLED and response.status_code < 400 else logging.INFO
    if access_log.isEnabledFor(level):
        client = request.client
        access_log.log(level, json.dumps({
            "time": round(time.time(), 3), "client": f"{client.host}:{client.port}" if client else None,
            "method": request.method, "path": path, "status": response.status_code,
            "ms": round(1000 * (time.monotonic() - started), 1)}))
    return response


def serve(engine: AsyncLLM, model_name: str, host: str, port: int, *, api_key: str | None = None,
          max_queue: int = DEFAULT_MAX_QUEUE, graceful_timeout: float = 30.0,
          reward_weights: list[float] | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
          lora_modules: dict[str, str] | None = None, allow_runtime_lora: bool = False,
          enable_playground: bool = True) -> None:
    """Run the server until SIGINT/SIGTERM: new connections stop, in-flight requests get
    ``graceful_timeout`` seconds to finish and are then aborted, and the engine stops."""
    import uvicorn

    app = build_app(engine, model_name, api_key=api_key, max_queue=max_queue, reward_weights=reward_weights,
                    max_request_bytes=max_request_bytes, lora_modules=lora_modules,
                    allow_runtime_lora=allow_runtime_lora, enable_playground=enable_playground)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=graceful_timeout)
    uvicorn.Server(config).run()
