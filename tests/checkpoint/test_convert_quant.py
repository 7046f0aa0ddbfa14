"""`nemolite convert --quantization`: compressed-tensors pack-quantized checkpoints.

The layout is checked against compressed-tensors itself (its decompressor, its config model, and
transformers' compressed-tensors loader), run in a subprocess that imports it: this Python with
NEMOLITE_TEST_CT_PATH on its path (what .ci/run installs with --target), else a separate virtual
environment NEMOLITE_CT_PYTHON (default /work/venvs/ct/bin/python); those tests skip without either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemolite.checkpoint.convert import convert
from nemolite.checkpoint.convert_quant import pack_int32, quantize_for_file, quantize_int4_zero_point
from nemolite.cli import main
from nemolite.errors import NemoliteError
from nemolite.quant.linear import QuantizedLinear, dequantize_reference
from nemolite.quant.spec import parse_quantization
from tests.conftest import make_llama, make_nemotron

CT_PATH = os.environ.get("NEMOLITE_TEST_CT_PATH")
CT_PYTHON = Path(sys.executable if CT_PATH else os.environ.get("NEMOLITE_CT_PYTHON", "/work/venvs/ct/bin/python"))
CT_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [CT_PATH, os.environ.get("PYTHONPATH")]))} \
    if CT_PATH else None
CT_SCRIPT = Path(__file__).with_name("ct_decompress.py")
needs_ct = pytest.mark.skipif(not CT_PYTHON.is_file(), reason=f"no compressed-tensors (NEMOLITE_TEST_CT_PATH or {CT_PYTHON})")
IDS = [2, 17, 33, 90, 5, 41, 7]
LONG_IDS = IDS + [60, 61, 62, 8, 9, 10, 11, 12, 13]  # over GEMV_MAX_ROWS: nemolite's dense path, fp32 activations


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """K = 128 and 256 everywhere, so that every group size (up to 128) divides every layer."""
    return make_nemotron(tmp_path_factory.mktemp("quant_src"), hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def tied_source(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("tied_src"), hidden_size=128, intermediate_size=256,
                      tie_word_embeddings=True)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})
    return out


def _float_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return _tensors(directory)


def _quantized_model(path: Path, spec: str):
    from nemolite.checkpoint import load_checkpoint

    model, _ = load_checkpoint(path, "float32", torch.device("cpu"), quantization=parse_quantization(spec))
    return model


def test_pack_int32_is_compressed_tensors_bit_order():
    values = torch.arange(16).reshape(1, 16) % 16  # 0..15
    packed = pack_int32(values, 4)
    assert packed.shape == (1, 2) and packed.dtype == torch.int32
    expected = [sum(v << (4 * i) for i, v in enumerate(range(8))), sum(v << (4 * i) for i, v in enumerate(range(8, 16)))]
    assert [w & 0xFFFFFFFF for w in packed[0].tolist()] == expected  # element i at bits 4i, low first
    assert packed[0, 1].item() < 0  # 0xFEDCBA98 read as a signed int32
    eight = pack_int32(torch.tensor([[1, 2, 3, 255, 7]]), 8)  # K not a multiple of 4: zero bits pad
    assert [w & 0xFFFFFFFF for w in eight[0].tolist()] == [1 | 2 << 8 | 3 << 16 | 255 << 24, 7]
    zeros = pack_int32(torch.arange(9).reshape(9, 1), 4, dim=0)  # along N, as weight_zero_point
    assert zeros.shape == (2, 1) and zeros[1, 0].item() == 8


def test_asymmetric_file_quantization_has_integer_zero_points():
    torch.manual_seed(0)
    weight = torch.randn(8, 64) + torch.linspace(-2, 2, 8)[:, None]  # rows all-positive and all-negative too
    weight[0] = torch.rand(64) + 1
    values, scales, zeros = quantize_int4_zero_point(weight, 32)
    assert scales.dtype == torch.float16 and zeros.dtype == torch.uint8 and int(zeros.max()) <= 15
    dequantized = scales.float().repeat_interleave(32, 1) * (values.float() - zeros.float().repeat_interleave(32, 1))
    step = scales.float().repeat_interleave(32, 1)
    assert bool(((dequantized - weight).abs() <= step * 0.5 + 1e-6).all())  # within half a step everywhere
    assert bool((zeros[0] == 0).all())  # an all-positive group: the range starts at 0, zero point 0
    layer, tensors = quantize_for_file(weight, parse_quantization("int4-asym"))
    assert torch.equal(dequantize_reference(layer), dequantized)
    assert tensors["weight_zero_point"].shape == (1, 2)  # [ceil(8 * 4 / 32), groups]


@pytest.mark.parametrize("spec", ["int8", "int4", "int4-g128", "int4-g64-asym"])
def test_config_and_tensor_layout(source, tmp_path, spec):
    destination = convert(source, tmp_path / "out", quantization=spec, progress=False)
    config = json.loads((destination / "config.json").read_text())
    quant = config["quantization_config"]
    weights = quant["config_groups"]["group_0"]["weights"]
    method = parse_quantization(spec)
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    assert quant["config_groups"]["group_0"]["targets"] == ["Linear"] and quant["ignore"] == ["lm_head"]
    assert weights["num_bits"] == (8 if method.method == "int8" else 4) and weights["type"] == "int"
    assert weights["symmetric"] == method.symmetric
    assert (weights["strategy"], weights["group_size"]) == (("channel", None) if method.method == "int8"
                                                            else ("group", method.group_size))
    tensors = _tensors(destination)
    prefix = "model.layers.1.mlp.down_proj"  # [128, 256]
    assert f"{prefix}.weight" not in tensors and tensors[f"{prefix}.weight_shape"].tolist() == [128, 256]
    packed, scale = tensors[f"{prefix}.weight_packed"], tensors[f"{prefix}.weight_scale"]
    assert packed.dtype == torch.int32 and packed.shape == (128, 256 // (4 if method.method == "int8" else 8))
    assert scale.shape == (128, 1 if method.method == "int8" else 256 // method.group_size)
    assert (f"{prefix}.weight_zero_point" in tensors) == (not method.symmetric)
    if not method.symmetric:
        assert tensors[f"{prefix}.weight_zero_point"].shape == (128 // 8, 256 // method.group_size)
    source_tensors = _float_tensors(source)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):  # kept as they were
        assert torch.equal(tensors[name], source_tensors[name])


@needs_ct
@pytest.mark.parametrize("spec", ["int8", "int4", "int4-g128", "int4-g64-asym", "int4-head", "int4-head8"])
def test_compressed_tensors_decompressor_reproduces_nemolite_bit_exactly(source, tied_source, tmp_path, spec):
    head = spec.endswith(("-head", "-head8"))
    src = tied_source if head else source  # -head on a tied model: the head gets its own
    destination = convert(src, tmp_path / "out", quantization=spec, progress=False)
    parsed = parse_quantization(spec)
    if parsed.symmetric:  # the model LLM(SRC, quantization=spec) runs
        expected = {name + ".weight": dequantize_reference(module) for name, module
                    in _quantized_model(src, spec).named_modules() if isinstance(module, QuantizedLinear)}
    else:  # integer zero points: the file's own quantization of each source weight
        config = json.loads((destination / "config.json").read_text())
        quantized = {key.removesuffix(".weight_shape") for key in _tensors(destination) if key.endswith("weight_shape")}
        assert config["quantization_config"]["ignore"] == ["lm_head"]
        expected = {name: dequantize_reference(quantize_for_file(tensor.float(), parsed)[0])
                    for name, tensor in _float_tensors(src).items() if name.removesuffix(".weight") in quantized}
    assert len(expected) == (15 if head else 12)  # Llama: 7 linears a layer + the head
    save_file({k: v.contiguous() for k, v in expected.items()}, str(tmp_path / "expected.safetensors"))
    result = subprocess.run([str(CT_PYTHON), str(CT_SCRIPT), str(destination), str(tmp_path / "expected.safetensors")],
                            capture_output=True, text=True, timeout=300, env=CT_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["compressors"] == ["PackedQuantizationCompressor"]
    assert len(report["layers"]) == len(expected)
    bad = {prefix: row for prefix, row in report["layers"].items() if not row.get("equal")}
    assert not bad, bad
    if head:
        config = json.loads((destination / "config.json").read_text())
        assert config["tie_word_embeddings"] is False and config["quantization_config"]["ignore"] == []
        groups = config["quantization_config"]["config_groups"]
        assert report["layers"]["model.layers.0.self_attn.q_proj"]["bits"] == 4
        if spec.endswith("-head8"):  # int4 layers, an int8 head: two config groups, as in memory
            assert groups["group_1"]["targets"] == ["lm_head"] and report["layers"]["lm_head"]["bits"] == 8
        else:  # the head quantized as the other layers: the "Linear" group covers it
            assert list(groups) == ["group_0"] and report["layers"]["lm_head"]["bits"] == 4


@needs_ct
@pytest.mark.parametrize("spec", ["int8", "int4-g128"])
def test_transformers_loads_the_converted_checkpoint(source, tmp_path, spec):
    """transformers' compressed-tensors quantizer (the HF path to the format) gives nemolite's logits (on
    nemolite's dense path: its few-row kernels round activations to int8, transformers does not)."""
    destination = convert(source, tmp_path / "out", quantization=spec, progress=False)
    script = ("import sys, json, torch\nfrom transformers import AutoModelForCausalLM\n"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()\n"
              f"with torch.no_grad(): out = m(torch.tensor([{LONG_IDS}])).logits\n"
              "print(json.dumps(out[0].tolist()))\n")
    result = subprocess.run([str(CT_PYTHON), "-c", script, str(destination)], capture_output=True, text=True,
                            timeout=300, env=CT_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    model = _quantized_model(source, spec)
    with torch.no_grad():
        ours = model(torch.tensor([LONG_IDS]), torch.arange(len(LONG_IDS))[None])[0]
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


@pytest.mark.parametrize("spec", ["int4-g128", "int4-head", "int4-head8"])  # -head8: an int8 head, two config groups
def test_nemolite_loads_the_converted_checkpoint_without_requantising(source, tmp_path, monkeypatch, spec):
    pytest.importorskip("nemolite.checkpoint.hf_quant")  # the compressed-tensors reader
    from nemolite import LLM
    from nemolite.quant import model as quant_model

    destination = tmp_path / "out"
    assert main(["convert", str(source), str(destination), "--quantization", spec]) == 0
    reference = LLM(source, dtype="float32", device="cpu", quantization=spec).engine.model

    def no_quantizing(*args, **kwargs):
        raise AssertionError("a pre-quantized checkpoint was quantized again")

    monkeypatch.setattr(quant_model, "quantize_module", no_quantizing)
    monkeypatch.setattr(quant_model, "quantize_model", no_quantizing)
    loaded = LLM(destination, dtype="float32", device="cpu").engine.model
    ours = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)}
    theirs = {n: m for n, m in reference.named_modules() if isinstance(m, QuantizedLinear)}
    # 12 quantized linears (13 with the head), q/k/v of each layer run as one qkv_proj by the engine
    assert sorted(ours) == sorted(theirs) and len(ours) == (9 if "-head" in spec else 8)
    for name, layer in ours.items():
        assert torch.equal(layer.qweight, theirs[name].qweight) and torch.equal(layer.scales, theirs[name].scales)
        assert layer.scales.dtype == theirs[name].scales.dtype and layer.method == theirs[name].method
        expected = parse_quantization(spec).head if name == "lm_head" else parse_quantization(spec)
        assert layer.group_size == (layer.in_features if expected.method == "int8" else expected.group_size)
    ids, positions = torch.tensor([IDS]), torch.arange(len(IDS))[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids, positions), reference(ids, positions))


def test_reward_head_and_bad_requests(reward_model_dir, source, tmp_path, capsys):
    destination = convert(reward_model_dir, tmp_path / "rm", quantization="int8", progress=False)
    config = json.loads((destination / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["score"]  # the reward head stays float
    assert "score.weight" in _tensors(destination)
    with pytest.raises(NemoliteError, match="quantized already"):
        convert(destination, tmp_path / "again", quantization="int4", progress=False)
    with pytest.raises(NemoliteError, match="quantized already"):
        convert(destination, tmp_path / "again", dtype="bfloat16", progress=False)
    resharded = convert(destination, tmp_path / "copy", max_shard_bytes=50_000, progress=False)  # allowed
    assert _tensors(resharded).keys() == _tensors(destination).keys()
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(source), str(tmp_path / "x"), "--quantization", "int3"])
    assert exit_info.value.code == 2 and "--quantization: quantization 'int3' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_progress_is_logged_when_stderr_is_not_a_terminal(source, tmp_path, caplog):
    with caplog.at_level("INFO", logger="nemolite"):
        convert(source, tmp_path / "out", quantization="int4", progress=None)
    lines = [r.getMessage() for r in caplog.records if r.name == "nemolite.progress"]
    assert len(lines) == 1 and lines[0].startswith("converting (int4): 24/24 tensors, ") and "/s)" in lines[0]
    assert any("quantized 12 linear layers to int4" in r.getMessage() for r in caplog.records)
