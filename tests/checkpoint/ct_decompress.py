"""Run by test_convert_quant.py in a separate virtual environment that has compressed-tensors (not
nemolite): decompress every quantized layer of a converted checkpoint with compressed-tensors' own
compressor and compare it with the weights nemolite dequantised, bit for bit.

    python ct_decompress.py CHECKPOINT_DIR EXPECTED.safetensors  → one JSON object on stdout

EXPECTED holds, per layer prefix P, ``P.weight``: nemolite's fp32 dequantised weight. compressed-tensors
computes (q − zero_point) · scale in the scale's dtype, which rounds nemolite's exact fp32 product once,
so the comparison is against the expected weight cast to the decompressed dtype.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def main(directory: str, expected_file: str) -> dict:
    import compressed_tensors
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)  # the config is one compressed-tensors accepts
    groups = list(config["config_groups"].values())

    def scheme_of(prefix: str):
        """The group whose targets name the layer exactly, else the "Linear" one (the order
        compressed-tensors' match_targets gives them)."""
        group = next((g for g in groups if prefix in g["targets"]), None) or \
            next(g for g in groups if "Linear" in g["targets"])
        return QuantizationScheme.model_validate(group), BaseCompressor.get_value_from_registry(group["format"])
    files = sorted(directory.glob("*.safetensors"))
    stored = {}
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                stored[key] = handle.get_tensor(key)
    report = {"version": compressed_tensors.__version__, "format": str(parsed.format), "ignore": parsed.ignore,
              "compressors": [], "layers": {}}
    with safe_open(expected_file, "pt") as handle:
        for key in handle.keys():
            prefix = key.removesuffix(".weight")
            scheme, compressor = scheme_of(prefix)
            if compressor.__name__ not in report["compressors"]:
                report["compressors"].append(compressor.__name__)
            names = compressor.compression_param_names(scheme)
            state = {name: stored[f"{prefix}.{name}"] for name in names if f"{prefix}.{name}" in stored}
            missing = [name for name in names if name not in state]
            if missing:
                report["layers"][prefix] = {"missing": missing}
                continue
            weight = compressor.decompress(state, scheme)["weight"]
            expected = handle.get_tensor(key)
            report["layers"][prefix] = {
                "dtype": str(weight.dtype), "shape": list(weight.shape), "bits": scheme.weights.num_bits,
                "equal": bool(weight.shape == expected.shape and torch.equal(weight, expected.to(weight.dtype))),
                "max_diff": float((weight.float() - expected).abs().max()) if weight.shape == expected.shape else None,
            }
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
