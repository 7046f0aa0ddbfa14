"""The playground: a web page at ``/`` for trying the served model in a browser.

Static files shipped in the package (``nemolite/server/static``: HTML, CSS and plain ES modules, no
build step, nothing fetched from elsewhere), served with a Content-Security-Policy that allows only
this origin's scripts, styles and connections. The page talks to the server through the public APIs
alone (OpenAI chat streaming, NeMo ``PUT /generate``, ``/v1/reward``, ``/v1/models``, ``/metrics``);
``GET /playground/config`` tells it what the model is. The page and its files are public (they hold
nothing of the model); everything it fetches afterwards carries the API key when the server has one.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

from nemolite.reward import resolve_weights
from nemolite.server.state import state_of

router = APIRouter()

# name -> media type; only these names are served (no paths from the request reach the filesystem)
ASSETS = {"playground.css": "text/css; charset=utf-8", "playground.js": "text/javascript; charset=utf-8",
          "api.js": "text/javascript; charset=utf-8", "live.js": "text/javascript; charset=utf-8",
          "tokens.js": "text/javascript; charset=utf-8"}
PUBLIC_PATHS = frozenset({"/", *(f"/static/{name}" for name in ASSETS)})

SECURITY_HEADERS = {
    # Scripts, styles and connections from this origin only: no inline script, nothing from a CDN. The page
    # never evaluates strings; 'unsafe-eval' is there for browser automation that does (Playwright's
    # wait_for_function with a string predicate fails under a policy without it).
    "Content-Security-Policy": "default-src 'none'; script-src 'self' 'unsafe-eval'; style-src 'self'; "
                               "connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a restarted server with a newer nemolite serves its own page
}


class TokenHistory:
    """The engine's generated-token counter once a second over the last ``seconds``, so that a page opened
    on a busy server draws the last minutes at once (the live panel then follows /metrics)."""

    def __init__(self, engine_stats: Callable[[], dict[str, float]], seconds: int = 300):
        self.engine_stats = engine_stats
        self.samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=seconds + 1)

    def sample(self) -> None:
        self.samples.append((time.monotonic(), float(self.engine_stats()["generation_tokens"])))

    async def run(self, interval: float = 1.0) -> None:
        while True:
            self.sample()
            await asyncio.sleep(interval)

    def as_json(self) -> dict:
        """``[seconds ago, tokens generated so far]`` pairs, oldest first."""
        now = time.monotonic()
        return {"generation_tokens": [[round(now - t, 3), value] for t, value in self.samples]}


def _read(name: str) -> bytes:
    return resources.files("nemolite.server").joinpath("static", name).read_bytes()


@router.api_route("/", methods=["GET", "HEAD"])
async def page():
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/static/{name}")
async def asset(name: str):
    if name not in ASSETS:
        return Response(status_code=404)
    return Response(_read(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)


@router.get("/playground/config")
async def config(request: Request):
    """What the page shows: the model's name and kind, and a reward model's attributes with the weights
    of its score (this server's ``--reward-weights``)."""
    state = state_of(request)
    tokenizer = state.tokenizer
    body = {"model": state.model_name, "max_model_len": state.max_model_len,
            "chat": tokenizer.chat_template is not None or tokenizer.chat_format is not None,
            "add_bos": tokenizer.add_bos_default is not False,
            "reward": bool(state.config.is_reward_model), "lora": state.engine.engine.lora is not None}
    if body["reward"]:
        names = list(state.config.reward_attributes)
        body["reward_attributes"] = names
        body["reward_weights"] = list(resolve_weights(state.reward_weights, names))
    return body


@router.get("/playground/history")
async def history(request: Request):
    return request.app.state.token_history.as_json()
