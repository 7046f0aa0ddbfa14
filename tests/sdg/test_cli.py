import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def sdg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemolite", "sdg", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)


def test_in_process_run_scores_prints_a_summary_and_writes_its_json(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"sampling": {"max_tokens": 24},
                                      "closed-qa": {"n_instructions": 2, "documents": ["A deque has two ends."]}}))
    out = tmp_path / "qa.jsonl"
    result = sdg("closed-qa", "--out", str(out), "--config", str(config), "--rows", "2", "--concurrency", "4")
    assert result.returncode == 0, result.stderr
    assert "2 rows written" in result.stderr and "tokens:" in result.stderr
    assert "scored by nemolite-demo-reward" in result.stderr  # no endpoint: the demo reward model, in-process
    summary = json.loads((tmp_path / "qa.summary.json").read_text())
    assert summary["rows_written"] == 2 and summary["llm_calls"] > 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["closed-qa/d0/q0", "closed-qa/d0/q1"]
    assert all(len(row["reward"]["attributes"]) == 9 for row in rows)


def test_user_errors_exit_2_with_a_message(tmp_path):
    result = sdg("open-qa", "--out", str(tmp_path / "x.jsonl"), "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "config file" in result.stderr and "Traceback" not in result.stderr
    result = sdg("open-qa", "--out", str(tmp_path / "x.jsonl"), "--num-shards", "2", "--shard-id", "2")
    assert result.returncode == 2 and "--shard-id must be in" in result.stderr
