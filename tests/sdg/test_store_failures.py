"""A write that fails under a run (disk full, EIO, read-only, the file moved away) stops it with whole
rows on disk and a message that says what to do; the same command then finishes the same file."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nemolite.errors import NemoliteError
from nemolite.sdg import arun_pipeline, run_pipeline
from nemolite.sdg.backends import HttpReward, InProcessReward
from nemolite.sdg.store import JsonlLog, sidecar, write_atomic

from tests.sdg.conftest import TINY, FailingWrites, ScriptedChat, ScriptedReward, read_rows

ROOT = Path(__file__).resolve().parents[2]
WIDE = {**TINY, "open-qa": {"n_macro_topics": 3, "n_subtopics": 2, "n_questions": 2, "n_revisions": 1}}
STOP_WITHIN_S = 30  # a run that does not stop on the failure by then hangs


def fails(code: int):
    """A stand-in for an os call that fails with ``code``."""
    def call(*args):
        raise OSError(code, os.strerror(code))
    return call


def run(out, llm=None, reward=None, **options):
    """One run, made to fail the test (not hang it) when it does not end."""
    options = {"config": WIDE, "seed": 3, "concurrency": 8, **options}
    return asyncio.run(asyncio.wait_for(arun_pipeline("open-qa", out, llm=llm or ScriptedChat(vocabulary=40),
                                                      reward=reward, **options), STOP_WITHIN_S))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """The file an uninterrupted run writes."""
    out = tmp_path_factory.mktemp("reference") / "qa.jsonl"
    run(out)
    assert len(read_rows(out)) >= 8
    return out.read_text()


def assert_whole_prefix(out: Path, reference: str) -> int:
    text = out.read_text()
    assert text.endswith("\n") and reference.startswith(text), "the rows on disk are not whole rows of the run"
    return text.count("\n")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EROFS])
def test_a_failed_row_write_stops_the_run_with_whole_rows_and_the_rerun_finishes(tmp_path, monkeypatch, reference,
                                                                                 code):
    out = tmp_path / "qa.jsonl"
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", FailingWrites(out, nth=4, errno=code))
        with pytest.raises(NemoliteError) as failure:
            run(out)
    message = str(failure.value)
    assert str(out) in message and os.strerror(code) in message
    assert "free space" in message and "rerun the same command to resume" in message
    assert assert_whole_prefix(out, reference) == 3  # the half-written fourth row was taken back
    stopped = json.loads(sidecar(out, "summary.json").read_text())
    assert os.strerror(code) in stopped["stopped_by"] and stopped["rows_written"] == 3

    summary = run(out)
    assert out.read_text() == reference
    ids = [row["id"] for row in read_rows(out)]
    assert len(ids) == len(set(ids))
    assert summary.rows_skipped == 3 and summary.rows_written == len(ids) - 3 and summary.stopped_by is None


class HangingChat(ScriptedChat):
    """Every other request never answers (until cancelled): requests are in flight when the run stops."""

    def __init__(self):
        super().__init__(vocabulary=40)
        self.in_flight = self.cancelled = 0

    async def chat(self, messages, sampling, seed):
        self.calls += 1
        if self.calls % 2:
            self.in_flight += 1
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            finally:
                self.in_flight -= 1
        return await super().chat(messages, sampling, seed)


@pytest.mark.parametrize("pipeline", ["open-qa", "preference"])
def test_a_failed_cache_write_cancels_every_task_and_request_in_flight(tmp_path, monkeypatch, pipeline):
    out, complete, llm = tmp_path / "out.jsonl", tmp_path / "complete.jsonl", HangingChat()
    options = {"config": WIDE, "seed": 3, "concurrency": 8}
    run_pipeline(pipeline, complete, llm=ScriptedChat(vocabulary=40), reward=ScriptedReward(), **options)

    async def scenario():
        with pytest.raises(NemoliteError, match="Input/output error"):
            await asyncio.wait_for(arun_pipeline(pipeline, out, llm=llm, reward=ScriptedReward(), **options),
                                   STOP_WITHIN_S)
        return asyncio.all_tasks() - {asyncio.current_task()}

    with monkeypatch.context() as patch:
        # An answer's cache line fails while the request before it hangs: open-qa's top-level list waits
        # on that one first, so only a run that stops at the failure itself gets out; preference's other
        # sample would be left running by a plain gather.
        patch.setattr(os, "write", FailingWrites(sidecar(out, "cache.jsonl"), nth=2, errno=errno.EIO,
                                                 when=lambda: llm.in_flight > 0))
        left = asyncio.run(scenario())
    assert not left, f"tasks still running after the run stopped: {left}"
    assert llm.cancelled > 0 and llm.in_flight == 0
    cache = sidecar(out, "cache.jsonl").read_text()
    assert cache.endswith("\n") and all(json.loads(line) for line in cache.splitlines())

    run_pipeline(pipeline, out, llm=ScriptedChat(vocabulary=40), reward=ScriptedReward(), **options)
    assert out.read_text() == complete.read_text()


def test_a_run_stopped_by_one_sample_cancels_the_other_samples_of_its_row(tmp_path):
    class FailingServer(HangingChat):
        async def chat(self, messages, sampling, seed):
            if self.calls == 1:  # the second request: the first hangs
                self.calls += 1
                raise NemoliteError("http://server/v1/chat/completions failed 6 times")
            return await super().chat(messages, sampling, seed)

    llm = FailingServer()

    async def scenario():
        with pytest.raises(NemoliteError, match="failed 6 times"):
            await asyncio.wait_for(arun_pipeline("preference", tmp_path / "pairs.jsonl", llm=llm,
                                                 reward=ScriptedReward(), config=WIDE), STOP_WITHIN_S)
        return asyncio.all_tasks() - {asyncio.current_task()}

    assert not asyncio.run(scenario()), "a sample's request outlived the run"
    assert llm.cancelled >= 1 and llm.in_flight == 0


def test_a_torn_line_that_cannot_be_taken_back_is_cut_on_resume(tmp_path, monkeypatch, reference, caplog):
    out = tmp_path / "qa.jsonl"
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", FailingWrites(out, nth=4, errno=errno.ENOSPC))
        patch.setattr(os, "ftruncate", fails(errno.EIO))
        with pytest.raises(NemoliteError, match="No space left on device"):
            run(out)
    torn = out.read_text()
    assert not torn.endswith("\n") and torn.count("\n") == 3  # three whole rows, half of the fourth

    with caplog.at_level("WARNING", logger="nemolite.sdg.store"):
        summary = run(out)
    assert out.read_text() == reference
    assert summary.rows_skipped == 3
    assert len(summary.repairs) == 1 and "kept the 3 whole lines" in summary.repairs[0]
    assert "kept the 3 whole lines" in caplog.text and "resumed:" in summary.format()


def test_an_output_moved_away_under_the_run_stops_it(tmp_path, reference):
    out, moved = tmp_path / "qa.jsonl", tmp_path / "qa.moved.jsonl"

    def answer(prompt, seed):
        if not moved.exists() and out.exists() and out.read_text().count("\n") >= 2:
            out.rename(moved)
        return llm.default(prompt, seed)

    llm = ScriptedChat(answer, vocabulary=40)
    with pytest.raises(NemoliteError, match="deleted or replaced while this run was writing it"):
        run(out, llm=llm, concurrency=1)
    kept = assert_whole_prefix(moved, reference)
    assert kept == 2, "a row went to the moved file after it was moved"
    moved.rename(out)
    summary = run(out)
    assert out.read_text() == reference and summary.rows_skipped == 2


def test_the_cli_exits_nonzero_with_the_message_when_the_disk_fills(tmp_path, reference):
    out, config = tmp_path / "qa.jsonl", tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(WIDE))
    script = f"""
import errno, os, sys
import nemolite.sdg.api as api
from tests.sdg.conftest import FailingWrites, ScriptedChat
api.default_llm = lambda model=None: ScriptedChat(vocabulary=40)
api.in_process_reward = lambda config: None
os.write = FailingWrites({str(out)!r}, nth=4, errno=errno.ENOSPC)
from nemolite.cli import main
sys.exit(main(["sdg", "open-qa", "--out", {str(out)!r}, "--config", {str(config)!r}, "--seed", "3",
               "--concurrency", "8"]))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"writing {out} failed: [Errno 28] No space left on device" in done.stderr
    assert "rerun the same command to resume" in done.stderr and "Traceback" not in done.stderr
    assert assert_whole_prefix(out, reference) == 3


def test_open_on_a_read_only_file_system_says_so(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith("rows.jsonl") and flags & os.O_WRONLY:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(NemoliteError, match="cannot open .*rows.jsonl for writing: .*Read-only file system"):
        JsonlLog(tmp_path / "rows.jsonl")


def test_a_failed_fsync_on_close_is_reported_and_the_file_closed(tmp_path, monkeypatch):
    log = JsonlLog(tmp_path / "rows.jsonl")
    log.append({"id": 1})
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fails(errno.EIO))
        with pytest.raises(NemoliteError, match="rows.jsonl failed: .*Input/output error"):
            log.close()
    log.close()  # closed already: nothing to do
    JsonlLog(tmp_path / "rows.jsonl").close()  # the lock went with the descriptor


def test_after_a_failed_write_no_later_line_is_written(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    log = JsonlLog(path)
    log.append({"id": 1})
    monkeypatch.setattr(os, "write", FailingWrites(path, nth=1, errno=errno.ENOSPC))
    with pytest.raises(NemoliteError, match="No space left"):
        log.append({"id": 2, "text": "x" * 100})
    monkeypatch.undo()  # space is free again, but a line now would follow a lost one
    with pytest.raises(NemoliteError, match="No space left"):
        log.append({"id": 3})
    log.close()
    assert read_rows(path) == [{"id": 1}]


def test_rows_holding_unicode_line_separators_resume(tmp_path):
    path = tmp_path / "rows.jsonl"
    log = JsonlLog(path)
    rows = [{"id": 1, "text": "one\u2028two\u2029three\x85four"}, {"id": 2, "text": "\x0b\x0c\x1c"}]
    for row in rows:
        log.append(row)
    log.close()
    again = JsonlLog(path)
    assert again.records == rows
    again.close()


# ---------------------------------------------------------------------------------------------- summary


def test_the_summary_is_replaced_atomically(tmp_path, monkeypatch):
    out = tmp_path / "qa.jsonl"
    summary_path = sidecar(out, "summary.json")
    run_pipeline("open-qa", out, llm=ScriptedChat(), config=TINY, rows=2)
    before = summary_path.read_text()
    assert json.loads(before)["rows_written"] == 2

    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])

    def crash(source, destination):  # the process dies after the temporary file is written, before the rename
        calls.append(("replace", Path(source).parent, Path(destination)))
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(NemoliteError, match="qa.summary.json failed: .*qa.summary.json is left as it was"):
        run_pipeline("open-qa", out, llm=ScriptedChat(), config=TINY, rows=4)
    assert summary_path.read_text() == before  # the old summary, whole
    assert calls[-2:] == ["fsync", ("replace", tmp_path, summary_path)]  # flushed, and in the same directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qa.cache.jsonl", "qa.jsonl", "qa.summary.json"]

    monkeypatch.setattr(os, "replace", real_replace)
    write_atomic(summary_path, '{"new": true}\n')
    assert json.loads(summary_path.read_text()) == {"new": True}
    assert oct(summary_path.stat().st_mode & 0o777) == oct(0o644)


def test_a_failed_summary_does_not_hide_the_failure_that_stopped_the_run(tmp_path, monkeypatch):
    out = tmp_path / "qa.jsonl"
    monkeypatch.setattr(os, "write", FailingWrites(out, nth=2, errno=errno.ENOSPC))
    monkeypatch.setattr(os, "replace", fails(errno.ENOSPC))
    with pytest.raises(NemoliteError, match=re.escape(f"writing {out} failed")):
        run(out)


# ---------------------------------------------------------------------------------------------- reward cache


class OtherReward(ScriptedReward):
    name = "other-reward"

    def __init__(self):
        super().__init__(score=lambda text: 4)


def test_the_reward_cache_misses_when_the_reward_model_changes(tmp_path):
    out = tmp_path / "qa.jsonl"
    first = ScriptedReward()
    run(out, reward=first)
    original = out.read_text()
    assert first.calls > 0

    out.unlink()  # the cache stays: every generation replays, every score is asked of the new model
    llm, other = ScriptedChat(vocabulary=40), OtherReward()
    summary = run(out, llm=llm, reward=other)
    rows = read_rows(out)
    assert llm.calls == 0 and other.calls >= len(rows) and summary.reward_calls == other.calls
    assert {row["reward"]["score"] for row in rows} == {1.0}

    out.unlink()
    again = ScriptedReward()
    run(out, reward=again)
    assert again.calls == 0 and out.read_text() == original  # the first model's scores, replayed


def test_reward_identities_name_the_model_the_server_and_the_weights():
    def http(url="http://localhost:1424", model=None, weights=None):
        return HttpReward(url, model=model, weights=weights).identity

    identities = [http(), http("http://other:1424"), http(model="reward-a"), http(model="reward-b"),
                  http(weights=[0, 0, 0, 0.3, 0.74, 0.46, 0.47, 0, 0]), http(weights={"helpfulness": 1.0}),
                  InProcessReward(None, name="/models/reward").identity,
                  InProcessReward(None, name="/models/other").identity,
                  InProcessReward(None, weights={"helpfulness": 1.0}, name="/models/reward").identity]
    assert len({json.dumps(identity, sort_keys=True) for identity in identities}) == len(identities)
    assert http("http://localhost:1424/v1/") == http()  # one server, however its URL is spelt
