import json

import pytest

from nemolite.errors import NemoliteError
from nemolite.sdg import run_pipeline
from nemolite.sdg.store import JsonlLog, RequestCache, sidecar

from tests.sdg.conftest import TINY, ScriptedChat, read_rows


def test_torn_last_line_is_cut_and_appends_continue(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "tex')
    log = JsonlLog(path)
    assert log.records == [{"id": 1}, {"id": 2}]
    log.append({"id": 3})
    log.close()
    assert read_rows(path) == [{"id": 1}, {"id": 2}, {"id": 3}]


def test_a_corrupt_line_in_the_middle_is_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 3}\n')
    with pytest.raises(NemoliteError, match="rows.jsonl:2 is not valid JSON"):
        JsonlLog(path)


def test_cache_replays_and_refuses_another_job(tmp_path):
    cache = RequestCache(tmp_path / "c.jsonl", job="job A")
    key = RequestCache.key("chat", [{"role": "user", "content": "hi"}], 7)
    cache.put(key, {"text": "hello"})
    cache.close()
    again = RequestCache(tmp_path / "c.jsonl", job="job A")
    assert again.get(key) == {"text": "hello"} and again.replayed == 1
    again.close()
    with pytest.raises(NemoliteError, match="other settings"):
        RequestCache(tmp_path / "c.jsonl", job="job B")


def test_rerun_skips_finished_rows_and_replays_every_call(tmp_path):
    out = tmp_path / "qa.jsonl"
    first = ScriptedChat()
    summary = run_pipeline("open-qa", out, llm=first, config=TINY, seed=3)
    complete = out.read_text()
    assert summary.rows_written >= 4 and first.calls > 0

    # A run killed after three rows (and mid-way through a fourth line): the rerun must finish the same file.
    lines = complete.splitlines(True)
    out.write_text("".join(lines[:3]) + lines[3][:20])
    again = ScriptedChat()
    summary = run_pipeline("open-qa", out, llm=again, config=TINY, seed=3)
    assert out.read_text() == complete
    assert again.calls == 0 and summary.rows_skipped == 3 and summary.calls_replayed > 0
    assert json.loads(sidecar(out, "summary.json").read_text())["rows_written"] == len(lines) - 3

    with pytest.raises(NemoliteError, match="other settings"):
        run_pipeline("open-qa", out, llm=ScriptedChat(), config=TINY, seed=4)


def test_a_larger_rows_cap_extends_a_finished_run(tmp_path):
    out, reference = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    run_pipeline("open-qa", reference, llm=ScriptedChat(), config=TINY, rows=6)
    run_pipeline("open-qa", out, llm=ScriptedChat(), config=TINY, rows=2)
    assert len(read_rows(out)) == 2
    run_pipeline("open-qa", out, llm=ScriptedChat(), config=TINY, rows=6)
    assert out.read_text() == reference.read_text()


def test_one_writer_per_file(tmp_path):
    first = JsonlLog(tmp_path / "rows.jsonl")
    with pytest.raises(NemoliteError, match="another process is writing"):
        JsonlLog(tmp_path / "rows.jsonl")
    first.close()
    JsonlLog(tmp_path / "rows.jsonl").close()
