"""The playground in a real browser: headless Chromium (Debian's package, driven by Playwright) on the page
of ``nemolite serve`` with the demo model, found by role and accessible name as a user or screen reader
would: the "Prompt" text box, the "Send" button, the ``role="log"`` transcript."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import pytest
import requests

from tests.browser import open_page, screenshot
from tests.server.conftest import MODEL_NAME, serve_process, start_server, stop_server

ANSWER_TIMEOUT_MS = 60_000
# Pixels of the live plot in the accent green (#76b900): the tokens/s line and its fill.
GREEN_PIXELS = """() => {
    const canvas = document.getElementById('rate-plot');
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let green = 0;
    for (let i = 0; i < data.length; i += 4) if (data[i + 1] > 120 && data[i] < 160 && data[i + 3] > 200) green++;
    return green;
}"""


@pytest.fixture(scope="module")
def served():
    with serve_process("--served-model-name", "demo") as (_, url):
        yield url


def answers(page):
    return page.locator("#log .entry.assistant")


def wait_answered(page, count: int = 1):
    """Wait until the ``count``-th answer has its statistics line (written when it ends)."""
    page.locator(f"#log .entry.assistant >> nth={count - 1} >> .meta").filter(has_text=re.compile(r"\S")) \
        .wait_for(timeout=ANSWER_TIMEOUT_MS)
    return answers(page).nth(count - 1)


def send(page, text: str):
    page.get_by_role("textbox", name="Prompt").fill(text)
    page.get_by_role("button", name="Send").click()


def test_chat_answer_streams_into_the_log(browser, served):
    """The acceptance path: fill "Prompt", press "Send", the streamed answer lands in the role=log transcript;
    at temperature 0 it is the server's own greedy answer to the same chat."""
    with open_page(browser, served + "/") as page:
        page.get_by_role("spinbutton", name="Temperature").fill("0")
        with page.expect_response("**/v1/chat/completions") as response:
            send(page, "How do I open a file?")
        assert response.value.headers["content-type"].startswith("text/event-stream")
        answer = wait_answered(page)
        log = page.get_by_role("log")
        assert "How do I open a file?" in log.inner_text()
        expected = requests.post(served + "/v1/chat/completions", timeout=60, json={
            "model": "demo", "messages": [{"role": "user", "content": "How do I open a file?"}],
            "max_tokens": 256, "temperature": 0}).json()["choices"][0]["message"]["content"]
        assert expected and answer.locator(".body").inner_text() == expected
        meta = answer.locator(".meta").inner_text()
        assert re.fullmatch(r"\d+ tokens · first token \d+ ms · [\d.]+ tokens/s", meta), meta
        assert page.get_by_role("textbox", name="Prompt").input_value() == ""  # sent, so cleared


def test_keyboard_alone_drives_it(browser, served):
    with open_page(browser, served + "/") as page:
        prompt = page.get_by_role("textbox", name="Prompt")
        prompt.focus()
        page.keyboard.type("first line")
        page.keyboard.press("Shift+Enter")
        page.keyboard.type("second line")
        assert prompt.input_value() == "first line\nsecond line" and answers(page).count() == 0
        page.keyboard.press("Enter")
        wait_answered(page)
        assert page.locator("#log .entry.user").inner_text() == "first line\nsecond line"
        page.get_by_role("tab", name="Chat").focus()  # arrows move between the tabs
        page.keyboard.press("ArrowRight")
        assert page.get_by_role("tab", name="Completion").get_attribute("aria-selected") == "true"
        page.keyboard.press("ArrowLeft")
        assert page.get_by_role("tab", name="Chat").get_attribute("aria-selected") == "true"
        # Regenerate replaces the last answer; Clear empties the transcript.
        page.get_by_role("button", name="Regenerate").click()
        wait_answered(page)
        assert answers(page).count() == 1
        page.get_by_role("button", name="Clear").click()
        assert page.locator("#log .entry").count() == 0


def test_a_reload_keeps_the_settings_the_mode_and_the_chat(browser, served):
    with open_page(browser, served + "/") as page:
        page.get_by_role("spinbutton", name="Temperature").fill("0.3")
        page.get_by_label("Colour tokens by probability").check()
        send(page, "What is a tuple?")
        answer = wait_answered(page).locator(".body").inner_text()
        page.reload()
        page.locator("#log .entry.assistant").wait_for(timeout=10_000)
        assert page.get_by_role("spinbutton", name="Temperature").input_value() == "0.3"
        assert page.get_by_label("Colour tokens by probability").is_checked()
        assert page.locator("#log .entry.user").inner_text() == "What is a tuple?"
        assert page.locator("#log .entry.assistant .body").inner_text() == answer
        with page.expect_request("**/v1/chat/completions") as request:  # the chat goes on from there
            send(page, "And a list?")
        assert [m["content"] for m in json.loads(request.value.post_data)["messages"]] == \
            ["What is a tuple?", answer, "And a list?"]
        wait_answered(page, 2)
        page.get_by_role("tab", name="Completion").click()
        page.get_by_role("button", name="Clear").click()
        page.reload()
        page.get_by_role("tab", name="Completion").and_(page.locator("[aria-selected=true]")).wait_for(timeout=10_000)
        assert page.locator("#log .entry").count() == 0


def test_tokens_coloured_by_probability(browser, served):
    with open_page(browser, served + "/") as page:
        page.get_by_label("Colour tokens by probability").check()
        send(page, "What is a list?")
        answer = wait_answered(page)
        tokens = answer.locator(".token")
        assert tokens.count() > 0
        title = tokens.first.get_attribute("title")
        assert re.fullmatch(r'logprob -?[\d.]+ · p [\d.]+%\nmost likely: (".*" [\d.]+%, ){4}".*" [\d.]+%', title), title
        assert "".join(tokens.all_inner_texts()) == answer.locator(".body").inner_text()


def test_completion_mode_sends_the_put_generate_it_shows_as_curl(browser, served):
    with open_page(browser, served + "/") as page:
        page.get_by_role("tab", name="Completion").click()
        page.get_by_role("spinbutton", name="Tokens to generate").fill("12")
        page.get_by_label("Greedy").check()
        page.get_by_label("Compute logprobs (colour)").check()
        page.get_by_role("textbox", name="Prompt").fill("Return the")
        end_strings = page.get_by_label("End strings")
        end_strings.fill('["a, b", "<|endoftext|>"]')  # a JSON array for strings with commas
        assert '"end_strings":["a, b","<|endoftext|>"]' in page.locator("#curl").inner_text()
        end_strings.fill('["a", 1]')
        assert page.locator("#curl").inner_text().startswith("# end strings: give a JSON array of strings")
        end_strings.fill("<|endoftext|>, ")
        curl = page.locator("#curl").inner_text()
        assert curl.startswith(f"curl -X PUT '{served}/generate'")
        ran = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60, check=True)
        expected = json.loads(ran.stdout)["sentences"][0]
        with page.expect_request("**/generate") as request:
            page.get_by_role("button", name="Send").click()
        assert request.value.method == "PUT"
        assert json.loads(request.value.post_data) == json.loads(curl.split(" -d ", 1)[1][1:-1].replace("'\\''", "'"))
        answer = wait_answered(page)
        assert "Return the" + answer.locator(".body").inner_text() == expected
        assert answer.locator(".token").count() > 0
        assert answer.locator(".meta").inner_text().startswith("12 tokens")


def test_json_schema_box_constrains_the_answer(browser, served):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}}, "required": ["name"]}
    with open_page(browser, served + "/") as page:
        page.locator("summary", has_text="JSON schema").click()
        page.get_by_role("textbox", name="JSON schema").fill(json.dumps(schema))
        send(page, "Describe a file")
        answer = json.loads(wait_answered(page).locator(".body").inner_text())
        assert set(answer) == {"name"} and isinstance(answer["name"], str)
        page.get_by_role("textbox", name="JSON schema").fill("{not json")
        send(page, "again")
        assert "the JSON schema is not valid JSON" in page.get_by_role("alert").inner_text()


def test_server_errors_and_a_lost_connection_are_shown_in_the_page(browser, served):
    with open_page(browser, served + "/") as page:
        page.get_by_role("spinbutton", name="Temperature").fill("-1")
        send(page, "hello")
        alert = page.get_by_role("alert")
        alert.wait_for(timeout=10_000)
        assert "temperature" in alert.inner_text()  # the server's 400 message, word for word
        assert "temperature" in page.locator("#log .entry.failed .error-text").inner_text()
        assert not page.get_by_role("button", name="Send").is_disabled()

        page.get_by_role("spinbutton", name="Temperature").fill("0.7")
        page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
        page.get_by_role("button", name="Regenerate").click()
        page.get_by_role("alert").filter(has_text="lost the connection").wait_for(timeout=10_000)

        page.unroute("**/v1/chat/completions")  # a stream cut before [DONE]
        page.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=200, content_type="text/event-stream",
            body='data: {"choices": [{"index": 0, "delta": {"content": "half"}}]}\n\n'))
        page.get_by_role("button", name="Regenerate").click()
        page.get_by_role("alert").filter(has_text="ended before the server finished").wait_for(timeout=10_000)


def test_model_text_is_never_inserted_as_html(browser, served):
    hostile = '<img src=x onerror="window.pwned=1"><b>bold</b><script>window.pwned=2</script>'
    chunks = [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in (hostile[:20], hostile[20:])]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    with open_page(browser, served + "/") as page:
        page.route("**/v1/chat/completions",
                   lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
        send(page, hostile)
        answer = wait_answered(page)
        assert answer.locator(".body").inner_text() == hostile
        assert page.locator("#log img, #log b, #log script").count() == 0
        assert page.evaluate("window.pwned") is None


def test_stop_ends_a_long_answer_and_the_server_frees_it(browser, served):
    endless = {"type": "array", "minItems": 500, "items": {"type": "integer"}}  # longer than max tokens
    with open_page(browser, served + "/") as page:
        page.get_by_role("spinbutton", name="Max tokens").fill("900")
        page.locator("summary", has_text="JSON schema").click()
        page.get_by_role("textbox", name="JSON schema").fill(json.dumps(endless))
        send(page, "numbers")
        page.locator("#log .entry.assistant .body").filter(has_text=re.compile(r"\d")).wait_for(timeout=30_000)
        page.get_by_role("button", name="Stop").click()
        assert wait_answered(page).locator(".meta").inner_text().endswith("stopped")
        assert page.get_by_role("alert").is_hidden()
        deadline = time.monotonic() + 10
        while "nemolite_num_requests_running{model_name=\"demo\"} 0.0" not in requests.get(served + "/metrics").text:
            assert time.monotonic() < deadline, "the stopped answer still runs on the server"
            time.sleep(0.1)
        # Regenerate continues from the stopped answer's prompt; Clear in the middle of an answer leaves
        # nothing of it in the next request.
        page.get_by_role("button", name="Regenerate").click()
        page.locator("#log .entry.assistant .body").filter(has_text=re.compile(r"\d")).wait_for(timeout=30_000)
        page.get_by_role("button", name="Clear").click()
        page.get_by_role("textbox", name="JSON schema").fill("")
        with page.expect_request("**/v1/chat/completions") as request:
            send(page, "hello")
        assert json.loads(request.value.post_data)["messages"] == [{"role": "user", "content": "hello"}]
        wait_answered(page)


def test_live_panel_follows_the_server_and_the_page_screenshot(browser, served):
    """Load from another client shows in the live panel (running requests, tokens/s, the plot); then a
    screenshot of the page for a person to look at."""
    stop = threading.Event()

    def load():
        while not stop.is_set():
            requests.post(served + "/v1/completions", timeout=60, json={
                "model": "demo", "prompt": "Return the", "max_tokens": 120, "ignore_eos": True, "n": 4})

    with open_page(browser, served + "/") as page:
        page.get_by_role("spinbutton", name="Temperature").fill("0.8")
        send(page, "How do I read a file line by line?")
        wait_answered(page)
        clients = [threading.Thread(target=load) for _ in range(2)]
        for client in clients:
            client.start()
        try:
            page.locator("#stat-running").filter(has_text=re.compile(r"^[1-9]")).wait_for(timeout=20_000)
            page.locator("#rate-now").filter(has_text=re.compile(r"^[1-9]")).wait_for(timeout=20_000)
            time.sleep(4)
        finally:
            stop.set()
            for client in clients:
                client.join()
        send(page, "What does str.split return?")
        wait_answered(page, 2)
        time.sleep(2.5)  # the rate falls back to 0 on the plot
        assert re.fullmatch(r"\d+ / \d+", page.locator("#stat-kv").inner_text())
        assert page.evaluate(GREEN_PIXELS) > 100, "the tokens/s line is not drawn"
        assert screenshot(page, "playground-chat.png").stat().st_size > 10_000
    with open_page(browser, served + "/") as page:  # opened later: the server's last minutes at once
        page.locator("#rate-summary").filter(has_text=re.compile(r"peak [1-9]")).wait_for(timeout=5_000)
        assert page.evaluate(GREEN_PIXELS) > 100


def test_api_key_is_asked_once_and_sent_as_the_bearer_token(browser, demo_engine):
    live, server, thread = start_server(demo_engine, api_key="sesame")
    try:
        with open_page(browser, live.url + "/") as page:
            dialog = page.get_by_role("dialog", name="API key")
            dialog.wait_for(timeout=10_000)
            key = page.get_by_role("textbox", name="API key")
            key.fill("wrong")
            page.keyboard.press("Enter")
            page.get_by_text("The server refused that key.").wait_for(timeout=10_000)  # asked again
            key.fill("sesame")
            page.keyboard.press("Enter")
            page.locator("#model-name").filter(has_text=MODEL_NAME).wait_for(timeout=10_000)
            with page.expect_request("**/v1/chat/completions") as request:
                send(page, "Return the")
            assert request.value.headers["authorization"] == "Bearer sesame"
            wait_answered(page)
            page.reload()  # the key is kept for the tab: not asked again
            page.locator("#model-name").filter(has_text=MODEL_NAME).wait_for(timeout=10_000)
            assert dialog.is_hidden()
    finally:
        stop_server(server, thread)


def test_reward_model_scores_two_answers_side_by_side(browser, reward_model_dir):
    from nemolite.engine.async_llm import AsyncLLM
    from tests.conftest import DEVICE

    engine = AsyncLLM(reward_model_dir, dtype="float32", device=DEVICE, kv_cache_gb=0.01)
    live, server, thread = start_server(engine)
    try:
        with open_page(browser, live.url + "/") as page:
            reward_tab = page.get_by_role("tab", name="Reward")
            reward_tab.wait_for(timeout=10_000)
            assert reward_tab.get_attribute("aria-selected") == "true"
            assert page.get_by_role("tab", name="Chat").is_hidden()
            page.get_by_role("textbox", name="Prompt").fill("How do I open a file?")
            page.get_by_role("textbox", name="Answer A").fill("Call open(path) and read it.")
            page.get_by_role("textbox", name="Answer B").fill("Files are blue.")
            page.get_by_role("button", name="Send").click()
            cards = page.locator("#log .score-card")
            cards.nth(1).wait_for(timeout=ANSWER_TIMEOUT_MS)
            expected = requests.post(live.url + "/v1/reward", timeout=60, json={"conversations": [
                [{"role": "user", "content": "How do I open a file?"}, {"role": "assistant", "content": answer}]
                for answer in ("Call open(path) and read it.", "Files are blue.")]}).json()["data"]
            for card, scored in zip((cards.nth(0), cards.nth(1)), expected):
                assert card.locator(".score").inner_text() == f"{scored['score']:.2f}"
                rows = card.locator(".bar-row")
                assert rows.count() == len(scored["attributes"])
                assert rows.first.locator(".num").inner_text() == f"{next(iter(scored['attributes'].values())):.2f}"
            winner = 0 if expected[0]["score"] >= expected[1]["score"] else 1
            assert "winner" in cards.nth(winner).get_attribute("class")
            screenshot(page, "playground-reward.png")
    finally:
        stop_server(server, thread)
        engine.shutdown()
