"""nemolite.progress: one INFO line per stage off a terminal, a tqdm bar on one."""

from __future__ import annotations

import logging

from nemolite import progress as progress_module
from nemolite.progress import Progress, format_bytes, format_seconds


def test_one_line_per_stage_with_count_bytes_rate(caplog, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: now[0])
    with caplog.at_level(logging.INFO, logger="nemolite.progress"):
        with Progress("loading", total=3, total_bytes=3_000_000, bar=False, interval=0) as progress:
            for _ in range(3):
                progress.update(1, 1_000_000)
            now[0] = 2.0
    assert [r.getMessage() for r in caplog.records] == ["loading: 3/3 tensors, 3.0 MB in 2.0 s (1.5 MB/s)"]


def test_long_stages_log_while_running_with_an_eta(caplog, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: now[0])
    with caplog.at_level(logging.INFO, logger="nemolite.progress"):
        progress = Progress("converting", total=4, total_bytes=400, bar=False, interval=60)
        now[0] = 61.0
        progress.update(1, 100)
        now[0] = 70.0
        progress.update(1, 100)  # within the interval: no line
        progress.close(failed=True)  # a failure says nothing more: the error does
    assert [r.getMessage() for r in caplog.records] == [
        "converting: 1/4 tensors, 100 B in 1 min 01 s (1 B/s), about 3 min 03 s left"]


def test_a_bar_on_a_terminal(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="nemolite.progress"):
        with Progress("quantizing", total=2, unit="layer", bar=True) as progress:
            progress.update()
            progress.update()
    assert "quantizing" in capsys.readouterr().err  # tqdm draws on stderr
    assert caplog.records[-1].getMessage().startswith("quantizing: 2/2 layers in ")


def test_units():
    assert format_bytes(512) == "512 B" and format_bytes(8.1e9) == "8.1 GB" and format_bytes(1500) == "1.5 kB"
    assert format_seconds(12.34) == "12.3 s" and format_seconds(3725) == "1 h 02 min"
