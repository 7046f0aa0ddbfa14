"""The playground's files and routes over HTTP (the page itself runs in tests/server/test_playground_browser.py)."""

from __future__ import annotations

import re
from importlib import resources

import requests

from nemolite.reward import ATTRIBUTES, DEFAULT_WEIGHTS
from nemolite.server.playground import ASSETS
from tests.server.conftest import MODEL_NAME, start_server, stop_server

STATIC = resources.files("nemolite.server").joinpath("static")


def test_page_and_assets_are_served_with_a_policy_that_allows_only_this_origin(live_server):
    page = requests.get(live_server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "default-src 'none'" in policy
    assert 'src="/static/playground.js"' in page.text
    assert requests.head(live_server.url + "/", timeout=10).status_code == 200
    for name, media_type in ASSETS.items():
        asset = requests.get(f"{live_server.url}/static/{name}", timeout=10)
        assert asset.status_code == 200 and asset.headers["content-type"] == media_type
        assert asset.headers["x-content-type-options"] == "nosniff"
    for path in ("/static/index.html", "/static/..%2fplayground.py", "/static/%2e%2e/app.py", "/static/"):
        assert requests.get(live_server.url + path, timeout=10).status_code == 404


def test_the_package_ships_every_file_the_page_loads_and_nothing_from_elsewhere():
    shipped = {item.name for item in STATIC.iterdir()}
    assert shipped == {"index.html", *ASSETS}
    page = STATIC.joinpath("index.html").read_text()
    loaded = set(re.findall(r'(?:src|href)="/static/([^"]+)"', page))
    for name in ASSETS:
        text = STATIC.joinpath(name).read_text()
        loaded |= set(re.findall(r'from "\./([^"]+)"', text))
        # Model text enters the page as text nodes only; nothing is parsed as HTML.
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", text), name
    assert loaded == set(ASSETS)
    for name in shipped:  # offline: no CDN, no font service
        assert not re.search(r"https?://", STATIC.joinpath(name).read_text()), name


def test_config_describes_the_model(live_server):
    config = requests.get(live_server.url + "/playground/config", timeout=10).json()
    assert config == {"model": MODEL_NAME, "max_model_len": 1024, "chat": True, "add_bos": True, "reward": False,
                      "lora": False}


def test_reward_model_config_lists_attributes_and_the_weights_of_the_score(reward_model_dir):
    from nemolite.engine.async_llm import AsyncLLM
    from tests.conftest import DEVICE

    engine = AsyncLLM(reward_model_dir, dtype="float32", device=DEVICE, kv_cache_gb=0.01)
    live, server, thread = start_server(engine, reward_weights=[0, 0, 0, 0, 1, 0, 0, 0, -1])
    try:
        config = requests.get(live.url + "/playground/config", timeout=10).json()
    finally:
        stop_server(server, thread)
        engine.shutdown()
    assert config["reward"] is True and config["reward_attributes"] == list(ATTRIBUTES)
    assert config["reward_weights"] == [0, 0, 0, 0, 1, 0, 0, 0, -1] != list(DEFAULT_WEIGHTS)


def test_with_an_api_key_the_page_is_public_and_everything_it_fetches_is_not(demo_engine):
    live, server, thread = start_server(demo_engine, api_key="sesame")
    try:
        assert requests.get(live.url + "/", timeout=10).status_code == 200
        assert requests.get(live.url + "/static/playground.js", timeout=10).status_code == 200
        for path in ("/playground/config", "/metrics", "/v1/models"):
            assert requests.get(live.url + path, timeout=10).status_code == 401
            assert requests.get(live.url + path, headers={"Authorization": "Bearer sesame"}, timeout=10).ok
    finally:
        stop_server(server, thread)


def test_no_playground_serves_no_page(demo_engine):
    live, server, thread = start_server(demo_engine, enable_playground=False, api_key="sesame")
    try:
        for path in ("/", "/static/playground.js", "/playground/config"):
            assert requests.get(live.url + path, headers={"Authorization": "Bearer sesame"},
                                timeout=10).status_code == 404
        assert requests.get(live.url + "/", timeout=10).status_code == 401  # not public without the page
    finally:
        stop_server(server, thread)


def test_engine_token_counters_move_while_a_request_runs(live_server, wait_idle):
    """The live plot's rate comes from counters the engine updates every step, not when requests end."""
    def counters():
        text = requests.get(live_server.url + "/metrics", timeout=10).text
        return {name: float(value) for name, value in
                re.findall(r"^(nemolite_engine_\w+_total)\{[^}]*\} (\S+)$", text, re.MULTILINE)}

    before = counters()
    assert set(before) == {"nemolite_engine_prompt_tokens_total", "nemolite_engine_generation_tokens_total"}
    body = {"model": MODEL_NAME, "prompt": "Return the", "max_tokens": 40, "ignore_eos": True}
    assert requests.post(live_server.url + "/v1/completions", json=body, timeout=60).ok
    wait_idle()
    after = counters()
    assert after["nemolite_engine_generation_tokens_total"] - before["nemolite_engine_generation_tokens_total"] == 40
    assert after["nemolite_engine_prompt_tokens_total"] > before["nemolite_engine_prompt_tokens_total"]


def test_history_holds_the_generated_token_counter_of_the_last_minutes(live_server, wait_idle):
    history = live_server.app.state.token_history
    body = {"model": MODEL_NAME, "prompt": "Return the", "max_tokens": 30, "ignore_eos": True}
    wait_idle()
    history.sample()
    before = history.samples[-1][1]  # (the server's own task samples too, once a second)
    assert requests.post(live_server.url + "/v1/completions", json=body, timeout=60).ok
    wait_idle()
    history.sample()
    points = requests.get(live_server.url + "/playground/history", timeout=10).json()["generation_tokens"]
    ages = [age for age, _ in points]
    assert ages == sorted(ages, reverse=True) and ages[-1] >= 0  # oldest first
    assert points[-1][1] - before == 30
    assert len(points) <= history.samples.maxlen
