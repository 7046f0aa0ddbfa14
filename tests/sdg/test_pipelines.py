"""Pipelines end to end: scripted backends for exact checks, the demo model for the real path."""

from __future__ import annotations

import pytest

from nemolite.engine.async_llm import AsyncLLM
from nemolite.errors import NemoliteError
from nemolite.sdg import InProcessChat, PIPELINES, merge_shards, run_pipeline
from nemolite.sdg.dedup import normalize
from nemolite.sdg.pipelines import strip_filler
from nemolite.sdg.quality import choose_pair, matches_answer, parse_filter

from tests.sdg.conftest import TINY, ScriptedChat, ScriptedReward, read_rows

WIDE = {**TINY, "open-qa": {"n_macro_topics": 4, "n_subtopics": 3, "n_questions": 3, "n_revisions": 2}}


def test_dedup_between_stages(tmp_path):
    out = tmp_path / "qa.jsonl"
    summary = run_pipeline("open-qa", out, llm=ScriptedChat(vocabulary=5), config=WIDE)
    rows = read_rows(out)
    assert rows and summary.dedup_exact + summary.dedup_pruned > 0
    for field, depth in [("subtopic", 2), ("question", 3), ("prompt", 4)]:
        owner = {}
        for row in rows:  # each normalised item belongs to one branch only
            node = "/".join(row["id"].split("/")[:depth + 1])
            assert owner.setdefault(normalize(row[field]), node) == node
    assert [row["id"] for row in rows] == sorted((row["id"] for row in rows),
                                                 key=lambda i: [int(p[1:]) for p in i.split("/")[1:]])


def test_shards_merge_into_the_unsharded_run(tmp_path):
    whole = tmp_path / "whole.jsonl"
    run_pipeline("open-qa", whole, llm=ScriptedChat(vocabulary=5), config=WIDE, seed=5)
    shards = []
    for shard in range(3):
        shards.append(tmp_path / f"shard{shard}.jsonl")
        run_pipeline("open-qa", shards[-1], llm=ScriptedChat(vocabulary=5), config=WIDE, seed=5, num_shards=3,
                     shard_id=shard)
        assert {row["id"].split("/")[1] for row in read_rows(shards[-1])} <= {f"m{i}" for i in range(shard, 4, 3)}
    merged = tmp_path / "merged.jsonl"
    merge_shards(shards, merged)
    assert merged.read_text() == whole.read_text()


def test_filter_keeps_rows_with_kept_false(tmp_path):
    out = tmp_path / "qa.jsonl"
    config = {**TINY, "filter": {"helpfulness": ">= 2", "score": "> 0.2"}}
    summary = run_pipeline("open-qa", out, llm=ScriptedChat(), reward=ScriptedReward(), config=config)
    rows = read_rows(out)
    for row in rows:
        passes = row["reward"]["attributes"]["helpfulness"] >= 2 and row["reward"]["score"] > 0.2
        assert row["kept"] is passes
        assert passes or row["filtered_by"]
    assert summary.rows_filtered == sum(not row["kept"] for row in rows) > 0
    assert summary.rows_kept == sum(row["kept"] for row in rows) > 0
    assert "helpfulness >= 2" in summary.filtered_by and "#" in summary.format()


def test_filter_and_config_errors(tmp_path):
    assert parse_filter({"helpfulness": 3, "score": "< -0.5"}) == [("helpfulness", ">=", 3.0), ("score", "<", -0.5)]
    with pytest.raises(NemoliteError, match="not a threshold"):
        parse_filter({"helpfulness": "about 3"})
    with pytest.raises(NemoliteError, match="n_questions must be an integer"):
        run_pipeline("open-qa", tmp_path / "a.jsonl", llm=ScriptedChat(),
                     config={"open-qa": {"n_questions": "five"}})
    with pytest.raises(NemoliteError, match="unknown config key 'open-qa.n_question'"):
        run_pipeline("open-qa", tmp_path / "b.jsonl", llm=ScriptedChat(), config={"open-qa": {"n_question": 5}})
    with pytest.raises(NemoliteError, match="ranks samples with a reward model"):
        run_pipeline("preference", tmp_path / "c.jsonl", llm=ScriptedChat(), config=TINY)


def test_rows_cap_counts_kept_rows(tmp_path):
    out = tmp_path / "qa.jsonl"
    summary = run_pipeline("open-qa", out, llm=ScriptedChat(), config=WIDE, rows=5)
    assert summary.rows_kept == 5 and len(read_rows(out)) == 5


def test_ground_truth_decides_over_the_reward(tmp_path):
    answers = {0: "I think it is 5.", 1: "2 + 2 = 4"}

    def answer(prompt, seed):
        return answers[seed % 2] if "2 + 2" in prompt else f"colour {seed % 7}"

    # The reward prefers the wrong answer.
    reward = ScriptedReward(score=lambda text: 4 if "think" in text else int(text[-1]) % 4)
    out = tmp_path / "pairs.jsonl"
    config = {**TINY, "preference": {"k": 6, "prompts": [{"prompt": "What is 2 + 2?", "answer": 4}, "Name a colour."]}}
    run_pipeline("preference", out, llm=ScriptedChat(answer), reward=reward, config=config)
    rows = {row["prompt"]: row for row in read_rows(out)}
    math = rows["What is 2 + 2?"]
    assert math["decided_by"] == "ground_truth" and math["chosen"] == answers[1] and math["rejected"] == answers[0]
    assert math["answer"] == "4" and all("correct" in s for s in math["samples"]) and len(math["samples"]) == 6
    colour = rows["Name a colour."]
    assert colour["decided_by"] == "reward"
    assert colour["reward"]["score"] == max(s["reward"]["score"] for s in colour["samples"])
    assert colour["rejected_reward"]["score"] == min(s["reward"]["score"] for s in colour["samples"])


def test_answer_checks_and_pairs():
    assert matches_answer("so the total is 1,024.", "1024") and not matches_answer("it is 42 or 43", "42")
    assert matches_answer("The capital is Paris.", "paris") and not matches_answer("Lyon", "Paris")
    same = [{"text": "a", "reward": {"score": 1.0}}, {"text": "a", "reward": {"score": 1.0}}]
    assert choose_pair(same, None) is None


def test_polite_filler_is_stripped():
    phrases = ["thank you", "great"]
    assert strip_filler("User: Thank you! Great answer. How long should it rest?",
                        phrases) == "How long should it rest?"
    assert strip_filler("Thanks.", phrases) == "Thanks."  # nothing else to keep
    assert strip_filler("Greatest hits? Which ones.", phrases) == "Greatest hits? Which ones."


@pytest.fixture(scope="module")
def demo_chat():
    engine = AsyncLLM(None, dtype="float32", kv_cache_gb=0.2)
    yield InProcessChat(engine, name="demo")
    engine.shutdown()


@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_every_pipeline_runs_on_the_demo_model(pipeline, demo_chat, tmp_path):
    out = tmp_path / f"{pipeline}.jsonl"
    summary = run_pipeline(pipeline, out, llm=demo_chat, reward=ScriptedReward(), config=TINY, rows=3, concurrency=8)
    rows = read_rows(out)
    assert 1 <= len(rows) <= 3 and summary.rows_written == len(rows) and summary.llm_calls > 0
    for row in rows:
        assert row["id"].startswith(f"{pipeline}/") and row["reward"]["score"] is not None
        messages = row["messages"]
        assert messages[0]["role"] == "user" and all(m["content"] for m in messages)
        if pipeline == "dialogue":
            assert [m["role"] for m in messages] == ["user", "assistant"] * 3
        elif pipeline == "two-turn":
            assert [m["role"] for m in messages] == ["user", "assistant"] * 2
        elif pipeline == "preference":
            assert row["chosen"] != row["rejected"]
        else:
            assert [m["role"] for m in messages] == ["user", "assistant"]


@pytest.mark.parametrize("rows", [None, 7])
def test_output_does_not_depend_on_concurrency(tmp_path, rows):
    """One request in flight runs nodes in pipeline order, several run the shallowest first: the
    rows written, capped or not, are the same."""
    files = []
    for concurrency in (1, 8):
        files.append(tmp_path / f"c{concurrency}.jsonl")
        run_pipeline("open-qa", files[-1], llm=ScriptedChat(vocabulary=50), config=WIDE, seed=2, rows=rows,
                     concurrency=concurrency)
    assert files[0].read_text() == files[1].read_text() and read_rows(files[0])
    assert rows is None or len(read_rows(files[0])) == rows
