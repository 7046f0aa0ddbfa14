"""Pre-quantized Hugging Face checkpoints: which format a directory holds, and its layers' tensors.

A format is named by ``quantization_config`` in config.json (``quant_method``) or, for NVIDIA
ModelOpt exports, by ``hf_quant_config.json``. Each layer it stores quantized is read by that
format's own dequantisation rule into the one internal form, ``QuantizedLinear`` (int8 or int4):

- int4 formats (compressed-tensors ``pack-quantized``, GPTQ, AWQ, ModelOpt ``INT4_AWQ``) map exactly:
  w = s·(q − z) becomes ``from_int4(q, s, mins=−s·z)`` (``mins=None`` when z = 8, the symmetric case).
- FP8 formats (compressed-tensors ``float-quantized``, ModelOpt ``FP8``, vLLM ``fp8``) are
  dequantised (fp8 · scale in fp32) and requantized to int8 per output channel at load: the CPU has
  no FP8 arithmetic and int8 streams as few bytes. Activation scales (``input_scale``) and KV-cache
  scales are ignored: the CPU path is weight-only and keeps activations and the KV cache in bf16/fp32.
- int8 formats (compressed-tensors ``int-quantized``/``naive-quantized``, symmetric) map exactly.

Anything else fails with a NemoliteError that names the method and lists what is supported, never a
float load of packed bytes. The per-format rules live in nemolite.checkpoint.hf_formats.
"""

from __future__ import annotations

import json
from pathlib import Path

from nemolite.errors import NemoliteError

SUPPORTED = ("compressed-tensors (float-quantized FP8, pack-quantized W4A16/W4A16_ASYM, int-quantized/"
             "naive-quantized int8)", "modelopt (FP8, FP8 per channel, INT4_AWQ/W4A16_AWQ)",
             "fp8 (vLLM: per tensor, or block-wise weight_scale_inv)", "gptq (4 or 8 bits, sym/asym, act-order)",
             "awq (GEMM, 4 bits)")
HF_QUANT_CONFIG = "hf_quant_config.json"


def supported_text() -> str:
    return "nemolite loads: " + "; ".join(SUPPORTED)


def read_quantization_config(path: Path) -> dict | None:
    """config.json's ``quantization_config`` or ModelOpt's hf_quant_config.json (as the ``modelopt``
    method), or None for a float checkpoint."""
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except (OSError, ValueError) as error:
        raise NemoliteError(f"{config_file} is not readable JSON ({error})") from None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    modelopt_file = path / HF_QUANT_CONFIG
    if modelopt_file.is_file() and (quant is None or str(quant.get("quant_method", "")).lower() == "modelopt"):
        try:
            exported = json.loads(modelopt_file.read_text())
        except (OSError, ValueError) as error:
            raise NemoliteError(f"{modelopt_file} is not readable JSON ({error})") from None
        inner = exported.get("quantization", exported) if isinstance(exported, dict) else None
        if not isinstance(inner, dict):
            raise NemoliteError(f"{modelopt_file} has no 'quantization' object")
        return {"quant_method": "modelopt", **(quant or {}), **inner}
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise NemoliteError(f"{config_file}: quantization_config is a {type(quant).__name__}, not an object")
    return quant


def detect_prequantized(path: Path):
    """The format object (see nemolite.checkpoint.hf_formats) for a pre-quantized checkpoint, or None."""
    quant = read_quantization_config(Path(path))
    if quant is None:
        return None
    from nemolite.checkpoint import hf_formats

    method = str(quant.get("quant_method", "")).lower()
    builders = {"compressed-tensors": hf_formats.CompressedTensors, "modelopt": hf_formats.ModelOpt,
                "fp8": hf_formats.VllmFp8, "gptq": hf_formats.Gptq, "awq": hf_formats.Awq}
    if method not in builders:
        raise NemoliteError(f"checkpoint {path} is quantized with quant_method {method or '(none)'!r}, which "
                            f"nemolite cannot load; {supported_text()}")
    return builders[method](quant, path)
