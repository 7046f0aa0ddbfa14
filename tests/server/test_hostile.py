"""Hostile requests over every protocol, one at a time: each must get a 2xx or a 4xx with a JSON error
message (never a 5xx or a timeout), and right after it the server must be idle, answer a small greedy
request with the reference text and report /health 200. The cases are in tests/server/hostile_cases.py.

The servers run on engines of their own (a case that kills one fails this file only); a dead engine is
started again before the next case, so that each death is blamed on the case that caused it.
"""

from __future__ import annotations

import logging

import pytest


from tests.server.conftest import MODEL_NAME, wait_until_idle
from tests.server.hostile import (REFERENCE_CONVERSATION, report, run_case)
from tests.server.hostile_cases import generation_cases, reward_cases

GENERATION_CASES = generation_cases()
REWARD_CASES = reward_cases()


@pytest.fixture(scope="module")
def reward_reference(reward_harness) -> dict:
    """The fresh reward server's attributes for the reference conversation (checked against the offline
    model in test_reward.py)."""
    import requests

    response = requests.post(f"{reward_harness.url}/v1/reward", timeout=30,
                             json={"model": MODEL_NAME, "messages": REFERENCE_CONVERSATION})
    assert response.status_code == 200, response.text
    return response.json()["data"][0]["attributes"]


@pytest.fixture(autouse=True)
def quiet_server_logs(caplog):
    caplog.set_level(logging.CRITICAL, logger="nemolite")  # stack traces of 500s; the failure names the case


@pytest.mark.parametrize("case", GENERATION_CASES, ids=[case.id for case in GENERATION_CASES])
def test_hostile_request(case, harness, reference):
    harness.ensure_fresh()
    problems = run_case(harness, case, reference)
    if problems:
        pytest.fail(report(case, problems), pytrace=False)


@pytest.mark.parametrize("case", REWARD_CASES, ids=[case.id for case in REWARD_CASES])
def test_hostile_reward_request(case, reward_harness, reward_reference):
    reward_harness.ensure_fresh()
    problems = run_case(reward_harness, case, reward_reference, reward=True)
    if problems:
        pytest.fail(report(case, problems), pytrace=False)


def test_idle_after_every_case(harness, reward_harness):
    """Runs after the cases above: nothing they sent is still running or holding KV blocks."""
    for server in (harness, reward_harness):
        wait_until_idle(server.engine, timeout=10.0)
    assert harness.restarts == 0 and reward_harness.restarts == 0, \
        f"the engine died and was restarted {harness.restarts} (language model) and {reward_harness.restarts} " \
        "(reward model) times during the hostile cases"
