"""The quantized linear kernels of the project's C++ extension (nemolite/csrc/quant_kernels.cpp)."""

from __future__ import annotations

import torch

from nemolite.model import cpu_kernels

# Up to this many activation rows a quantized linear runs the integer kernel (each weight byte read once
# for all rows); above it, the weight is dequantized once and a dense GEMM runs (compute-bound there).
GEMV_MAX_ROWS = 8


def available(op: str) -> bool:
    """True when the extension has ``op`` ("int8", "int4" or "dequantize") on this CPU."""
    return cpu_kernels.has({"int8": "linear_int8", "int4": "linear_int4"}.get(op, op))


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] (fp32/bf16/fp16) times the layer's quantized weight: [M, N] in x's dtype."""
    dtype = x.dtype
    x = x.contiguous() if dtype in (torch.float32, torch.bfloat16) else x.float().contiguous()
    if layer.method == "int8":
        out = torch.ops.nemolite.linear_int8(x, layer.qweight, layer.scales, layer.group_size)
    else:
        out = torch.ops.nemolite.linear_int4(x, layer.qweight, layer.scales, layer.mins, layer.group_size)
    return out if out.dtype == dtype else out.to(dtype)


def dequantize(layer, dtype: torch.dtype) -> torch.Tensor:
    return torch.ops.nemolite.dequantize(layer.qweight, layer.scales, layer.mins, layer.group_size,
                                         layer.method == "int4", dtype == torch.bfloat16)
