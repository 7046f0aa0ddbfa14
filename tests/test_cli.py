from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from nemolite import LLM, SamplingParams


def nemolite(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemolite", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_generate_prints_only_the_completion(nemotron_dir):
    result = nemolite("generate", str(nemotron_dir), "the model returns", "--max-tokens", "6", "--ignore-eos",
                      "--dtype", "float32", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    expected = LLM(nemotron_dir, dtype="float32", device="cpu").generate(
        "the model returns", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0].text
    assert result.stdout == expected + "\n"


def test_sampling_flags_and_seed(nemotron_dir):
    args = ["generate", str(nemotron_dir), "the model", "--max-tokens", "8", "--temperature", "1.0", "--top-k", "50",
            "--top-p", "0.9", "--ignore-eos", "--seed"]
    first, again, other = nemolite(*args, "3"), nemolite(*args, "3"), nemolite(*args, "4")
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout != other.stdout


@pytest.mark.parametrize("args, message", [
    (["generate", "/no/such/model", "hi"], "not a local path"),
    (["generate", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "a", "b", "c"], "at most MODEL and PROMPT"),
])
def test_errors_are_one_line_without_traceback(args, message):
    result = nemolite(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_chat_streams_a_reply_and_quits(nemotron_dir):
    result = nemolite("chat", str(nemotron_dir), "--max-tokens", "5", "--dtype", "float32",
                      stdin="hello there\nand again\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_demo_model_answers_in_english():
    result = nemolite("generate", "Return the", "--max-tokens", "24")
    assert result.returncode == 0, result.stderr
    words = re.findall(r"[A-Za-z]+", result.stdout)
    common = {"the", "a", "of", "to", "is", "and", "in", "for", "if", "or", "be", "an", "as", "by", "value",
              "list", "string", "object", "number", "file", "name", "return", "returns", "new", "with", "that"}
    assert len(words) >= 5 and len(common.intersection(w.lower() for w in words)) >= 2, result.stdout


def test_demo_model_chat():
    result = nemolite("chat", "--max-tokens", "40", "--temperature", "0", stdin="What does os.path.join do?\n")
    assert result.returncode == 0, result.stderr
    assert len(re.findall(r"[A-Za-z]{2,}", result.stdout)) >= 3, result.stdout


def test_console_script_is_installed():
    assert shutil.which("nemolite") is not None
    result = subprocess.run(["nemolite", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "generate" in result.stdout and "chat" in result.stdout
