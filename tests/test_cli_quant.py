"""`--quantization` on every command that loads a model, `--version`, and INFO-level status lines."""

from __future__ import annotations

import pytest

from nemolite.cli import build_parser, main, package_version
from tests.test_cli import nemolite


def test_version():
    result = nemolite("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"nemolite {package_version()}"
    assert package_version() == __import__("nemolite").__version__  # installed metadata and the package agree


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"], ["bench"],
                                     ["sdg", "open-qa", "--out", "x.jsonl"], ["convert", "a", "b"]])
def test_every_loading_command_takes_quantization(command, capsys):
    args = build_parser().parse_args(command + ["--quantization", "INT4-g128-asym"])
    assert args.quantization == "int4-g128-asym"
    assert build_parser().parse_args(command + ["--quantization", "none"]).quantization is None
    with pytest.raises(SystemExit) as error:
        build_parser().parse_args(command + ["--quantization", "int4-g100"])
    assert error.value.code == 2 and "argument --quantization" in capsys.readouterr().err


def test_help_lists_the_spellings(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "int4-g128" in text and "int4-asym" in text and "-head" in text and "int8" in text


def test_engine_and_bench_options_carry_it(monkeypatch):
    from nemolite import bench as bench_module

    seen = {}
    monkeypatch.setattr(bench_module, "bench", lambda workloads, path, backends, options: seen.update(options) or [])
    assert main(["bench", "--workload", sorted(bench_module.WORKLOADS)[0], "--quantization", "int8"]) == 0
    assert seen["quantization"] == "int8" and "quantization" not in seen["engine"]


def test_sdg_refuses_quantization_with_an_endpoint(tmp_path, capsys):
    assert main(["sdg", "open-qa", "--out", str(tmp_path / "x.jsonl"), "--endpoint", "http://127.0.0.1:9",
                 "--quantization", "int8"]) == 2
    assert "in-process model" in capsys.readouterr().err


def test_generate_quantized_logs_at_info(nemotron_dir):
    args = ["generate", str(nemotron_dir), "the model", "--max-tokens", "4", "--ignore-eos", "--dtype", "float32",
            "--quantization", "int8"]
    result = nemolite(*args)
    assert result.returncode == 0, result.stderr
    assert "INFO nemolite: loading" in result.stderr and "(int8)" in result.stderr
    assert "WARNING" not in result.stderr
    quiet = nemolite("-q", *args)
    assert quiet.returncode == 0 and quiet.stdout == result.stdout and "INFO" not in quiet.stderr
