"""``nemolite convert --quantization``: weight-only int8/int4 layers in the compressed-tensors format.

The files are what vLLM's compressed-tensors scheme ``CompressedTensorsWNA16`` loads (the only
weight-only integer scheme it has: ``format: "pack-quantized"`` with 4 or 8 bits; a
``naive-quantized``/``int-quantized`` int8 layer without activation quantization finds no scheme
there), and what llm-compressor writes for its W4A16 / W4A16_ASYM / W8A16 presets. Per quantized
layer ``P`` (the float ``P.weight`` [N, K] is not written):

- ``P.weight_packed`` int32 [N, ceil(K·b/32)]: the values q + 2^(b−1) (b = 4 or 8 bits, q signed in
  −2^(b−1)..2^(b−1)−1) packed along K, element i of each word at bits [b·i, b·(i+1)), low bits first;
- ``P.weight_scale`` [N, K / group] (int4, ``strategy: "group"``) or [N, 1] (int8, ``"channel"``);
- ``P.weight_zero_point`` int32 [ceil(N·b/32), K / group] (asymmetric only): signed zero points
  packed the same way along N;
- ``P.weight_shape`` int64 [2]: [N, K];

and w = (q − zero_point) · weight_scale (zero_point 0 when symmetric), computed in the scale's dtype.

Sources (compressed-tensors 0.20, github.com/vllm-project/compressed-tensors):
src/compressed_tensors/compressors/pack_quantized/base.py (``PackedQuantizationCompressor``: the
tensor names, zero points packed with ``packed_dim=0``), .../pack_quantized/helpers.py
(``pack_to_int32``/``unpack_from_int32``: the offset and bit order), .../naive_quantized/base.py,
src/compressed_tensors/quantization/lifecycle/forward.py and forward_helpers.py (``_dequantize``:
``(x_q - zero_point) * scale``, group scales per ``group_size`` columns), .../quantization/utils/helpers.py
(``calculate_range``: int4 is −8..7; ``calculate_qparams``: asymmetric ranges include 0) and
.../compressors/model_compressors/model_compressor.py (``update_config``: the config.json keys). vLLM:
vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py
(``_get_scheme_from_parts``: weight-only ints need pack-quantized), github.com/vllm-project/vllm.

The values are nemolite's own (``nemolite.quant.linear.quantize_weight``), so a converted checkpoint
is the model ``LLM(SRC, quantization=...)`` runs: int8 q = round(w / s), s = amax / 127 per row
(ct: q − 0); symmetric int4 values v in 0..15 with w = s·(v − 8) (ct: q = v − 8, stored nibble v).
nemolite's in-memory asymmetric int4 uses w = s·v + min, whose min is not a whole number of scales,
so the file's asymmetric layers are quantized here with integer zero points instead (range widened to
hold 0, as compressed-tensors' own ``calculate_qparams``): they are not ``int4-asym`` in memory.

An LM head quantized too ("-head") is quantized as the other layers; with "-head8" (int4 layers) it is
int8 per channel, as nemolite quantizes it in memory (nemolite.quant.model.quantize_module), in a second
config group, ``targets: ["lm_head"]``, which compressed-tensors and vLLM match before the ``"Linear"``
class target.

Scales are written in the dtype nemolite quantized with (fp16 where exact, else fp32). vLLM casts
scales to the model's dtype when it loads them: exact for fp16, a rounding of each scale (not of
the values) to 8 mantissa bits for bf16.
"""

from __future__ import annotations

import math

import torch

from nemolite.errors import NemoliteError
from nemolite.quant.linear import BLOCK, FP16_MAX, FP16_NORMAL_MIN, QuantizedLinear, quantize_weight, unpack_int4
from nemolite.quant.spec import QuantSpec

COMPRESSED_TENSORS_VERSION = "0.20.1"  # the release whose layout and config keys this follows
FORMAT = "pack-quantized"
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def quantized_layers(hf_config: dict, spec: QuantSpec) -> tuple[set[str], list[str]]:
    """(checkpoint weight names to quantize, names of the Linear layers left float) for ``spec``: the
    layers ``LLM(..., quantization=spec)`` quantizes (``nemolite.quant.model.quantizable_linears`` on a
    meta-device model of this config), so that the file and the in-memory model agree."""
    from torch import nn

    from nemolite.config import config_from_hf
    from nemolite.model import CausalLM
    from nemolite.quant.model import quantizable_linears

    config = config_from_hf(hf_config)
    with torch.device("meta"):
        model = CausalLM(config)
    chosen = {name for name, _ in quantizable_linears(model, spec)}
    left = sorted(name for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and name not in chosen)
    return {name + ".weight" for name in chosen}, left


def layer_spec(name: str, spec: QuantSpec) -> QuantSpec:
    """The spec the layer ``name`` (a checkpoint weight or module name) is quantized with."""
    from nemolite.quant.model import is_head

    return spec.head if is_head(name.removesuffix(".weight")) else spec


def _weights_args(spec: QuantSpec) -> dict:
    return {"num_bits": 8 if spec.method == "int8" else 4, "type": "int", "symmetric": spec.symmetric,
            "strategy": "channel" if spec.method == "int8" else "group",
            "group_size": None if spec.method == "int8" else spec.group_size,
            "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}}


def _group(targets: list[str], spec: QuantSpec) -> dict:
    return {"targets": targets, "weights": _weights_args(spec), "input_activations": None,
            "output_activations": None, "format": FORMAT}


def quantization_config(spec: QuantSpec, ignore: list[str]) -> dict:
    """config.json's ``quantization_config``, with the keys compressed-tensors' ``update_config`` writes."""
    groups = {"group_0": _group(["Linear"], spec)}
    if spec.lm_head and spec.head != spec:
        groups["group_1"] = _group(["lm_head"], spec.head)
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "version": COMPRESSED_TENSORS_VERSION, "config_groups": groups,
            "ignore": list(ignore), "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {}}


def quantize_for_file(weight: torch.Tensor, spec: QuantSpec) -> tuple[QuantizedLinear, dict[str, torch.Tensor]]:
    """One layer's float weight [N, K] → (nemolite's QuantizedLinear of it, the compressed-tensors
    tensors by suffix). Both dequantize to the same weight."""
    if weight.dim() != 2:
        raise NemoliteError(f"only 2-D weights are quantized, got {list(weight.shape)}")
    n, k = weight.shape
    shape = torch.tensor([n, k], dtype=torch.int64)
    if spec.method == "int8":
        layer = quantize_weight(weight, "int8")
        unsigned = layer.qweight.to(torch.int64) + 128
        return layer, {"weight_packed": pack_int32(unsigned, 8), "weight_scale": layer.scales.clone(),
                       "weight_shape": shape}
    if spec.symmetric:
        layer = quantize_weight(weight, "int4", spec.group_size, True)
        values = unpack_int4(layer.qweight).to(torch.int64)  # 0..15 = q + 8
        return layer, {"weight_packed": pack_int32(values, 4), "weight_scale": layer.scales.clone(),
                       "weight_shape": shape}
    values, scales, zeros = quantize_int4_zero_point(weight, spec.group_size)
    mins = -(scales.float() * zeros.float())  # w = s·(v − z) = s·v + mins, exactly in fp32
    layer = QuantizedLinear.from_int4(values, scales, mins)
    return layer, {"weight_packed": pack_int32(values.to(torch.int64), 4), "weight_scale": scales.contiguous(),
                   "weight_zero_point": pack_int32(zeros.to(torch.int64), 4, dim=0), "weight_shape": shape}


def quantize_int4_zero_point(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 with integer zero points: per group of ``group_size`` columns, lo = min(w, 0),
    hi = max(w, 0), s = (hi − lo) / 15 (fp16 when every scale is in its normal range, else fp32),
    z = round(−lo / s) in 0..15, v = clamp(round(w / s) + z, 0, 15), so w ≈ s·(v − z) and 0 is exact.
    Returns values uint8 [N, K], scales [N, G], zeros uint8 [N, G] (unsigned: compressed-tensors'
    zero point is z − 8)."""
    w = weight.detach().float()
    n, k = w.shape
    if k % group_size or group_size % BLOCK:
        raise NemoliteError(f"int4 group size {group_size} must divide the {k} input columns and be a multiple of 32")
    groups = w.reshape(n, k // group_size, group_size)
    low = groups.amin(dim=2, keepdim=True).clamp(max=0)
    high = groups.amax(dim=2, keepdim=True).clamp(min=0)
    scale = (high - low) / 15
    magnitude = scale.abs()
    if bool(((magnitude == 0) | ((magnitude >= FP16_NORMAL_MIN) & (magnitude <= FP16_MAX))).all()):
        scale = scale.half()  # the values are computed against the rounded scale
    inverse = torch.where(scale != 0, 1 / scale.float(), torch.zeros_like(scale.float()))
    zeros = (-low * inverse + 0.5).floor_().clamp_(0, 15)
    values = (groups * inverse + zeros + 0.5).floor_().clamp_(0, 15)
    return (values.reshape(n, k).to(torch.uint8), scale.squeeze(2).contiguous(),
            zeros.squeeze(2).to(torch.uint8).contiguous())


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Unsigned ``bits``-bit values [R, C] → int32 words along ``dim`` (1: [R, ceil(C·bits/32)];
    0: [ceil(R·bits/32), C]), element i of each group of 32/bits at bits [bits·i, bits·(i+1)), padded
    with zero bits: compressed-tensors' ``pack_to_int32`` after its offset of 2^(bits−1)."""
    if bits not in (4, 8):
        raise NemoliteError(f"packing supports 4 and 8 bits, got {bits}")
    if dim == 0:
        return pack_int32(values.t(), bits, 1).t().contiguous()
    per = 32 // bits
    rows, columns = values.shape
    words = math.ceil(columns / per)
    v = values.to(torch.int64)
    if words * per != columns:
        v = torch.nn.functional.pad(v, (0, words * per - columns))
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    packed = (v.reshape(rows, words, per) << shifts).sum(dim=2)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # the same 32 bits, as a signed int32
    return packed.to(torch.int32).contiguous()
