"""Headless Chromium for the playground tests: Debian's ``chromium`` package driven by Playwright for Python
(Playwright's own browser download cannot work offline; ``.ci/run`` installs the package where it is missing).

``open_page`` gives a fresh page (its own storage) that records uncaught script errors; every test asserts
there were none. Screenshots go to ``$NEMOLITE_TEST_ARTIFACTS`` (default ``.test-artifacts/`` in the repo).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("NEMOLITE_TEST_CHROMIUM", "/usr/bin/chromium")
# As root in a container Chromium needs --no-sandbox; the network flags stop it calling Google's services,
# which this machine's closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage"]
ARTIFACTS = Path(os.environ.get("NEMOLITE_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / ".test-artifacts"))
VIEWPORT = {"width": 1280, "height": 800}


@contextlib.contextmanager
def chromium():
    """A launched headless Chromium, or a skip that says what to install."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python (the test extra)")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run installs it)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def open_page(browser, url: str):
    """A page at ``url`` in a new context; uncaught script errors fail the test."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    return path
