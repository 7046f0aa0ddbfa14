"""The quantized linear kernels of the project's C++ extension (nemolite/csrc/quant_kernels.cpp)."""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time

import torch

from nemolite.model import cpu_kernels

log = logging.getLogger(__name__)

# Up to a number of activation rows a quantized linear runs the integer kernel (each weight byte read once
# for all rows); above it, the weight is dequantized and a dense GEMM runs (compute-bound there). Where
# that crossover lies depends on the CPU and the method: on one without native bf16 GEMMs (AVX2) the kernel
# won at every batch measured (4096 x 1024 int8, bf16 activations, 2 cores: 2.2 vs 11 ms at 16 rows, 12.5
# vs 24 ms at 128), while a CPU with AVX512-BF16/AMX runs the dense bf16 GEMM far faster; int4's kernel
# costs less per row than int8's (1.3 against 3.5 ms at 32 rows on the AVX2 machine), so its crossover
# lies higher. So it is measured once per process, activation dtype and method (``max_kernel_rows``);
# NEMOLITE_QUANT_KERNEL_ROWS=N fixes it instead.
GEMV_MAX_ROWS = 8  # the floor: decode at batch <= 8 always takes the kernel
CANDIDATE_ROWS = (16, 32, 64, 128, 256)
_max_rows: dict[tuple[torch.dtype, str], int] = {}
_calibration_lock = threading.Lock()


def max_kernel_rows(dtype: torch.dtype, method: str = "int8") -> int:
    """The most activation rows for which ``method``'s integer kernel beats dequantize + GEMM here
    (>= GEMV_MAX_ROWS)."""
    key = (dtype, method)
    rows = _max_rows.get(key)
    if rows is None:
        with _calibration_lock:
            rows = _max_rows.get(key)
            if rows is None:
                rows = _max_rows[key] = _calibrate(dtype, method)
    return rows


def _calibrate(dtype: torch.dtype, method: str) -> int:
    fixed = os.environ.get("NEMOLITE_QUANT_KERNEL_ROWS")
    if fixed:
        return max(1, int(fixed))
    if not available(method):
        return GEMV_MAX_ROWS
    from nemolite.quant.linear import quantize_weight

    generator = torch.Generator().manual_seed(0)
    # several distinct layers, timed in one pass: a model's weights come from memory, not a warm cache
    # (one warm 2048 x 1024 layer favoured dequantize + GEMM, which writes and rereads a float copy)
    layers = [quantize_weight(torch.randn(2048, 2048, generator=generator), method) for _ in range(4)]
    for layer in layers:
        layer.interleave_rows()  # as the engine's int4 layers are

    def medians(*functions) -> list[float]:
        """Median seconds of each, timed in turn (a noisy machine's drift hits both alike)."""
        times = [[] for _ in functions]
        for repeat in range(6):
            for function, record in zip(functions, times):
                begin = time.perf_counter()
                function()
                if repeat:  # the first round warms up
                    record.append(time.perf_counter() - begin)
        return [statistics.median(record) for record in times]

    chosen = GEMV_MAX_ROWS
    for rows in CANDIDATE_ROWS:
        x = torch.randn(rows, 2048, generator=generator).to(dtype)
        kernel, dense = medians(lambda: [linear(layer, x) for layer in layers],
                                lambda: [torch.nn.functional.linear(x, layer.dequantize(dtype)) for layer in layers])
        # near a tie the kernel is kept: it allocates no float copy of the weight, and in the model
        # its lead was larger than here (bench model int4-head, 32-token prefill: 56 ms through the
        # kernel against 72-133 ms dequantized, where this comparison came out even)
        if kernel > 1.1 * dense:
            break
        chosen = rows
    log.info("%s linears: the integer kernel up to %d rows of %s activations, dequantize + GEMM above",
             method, chosen, str(dtype).removeprefix("torch."))
    return chosen


def available(op: str) -> bool:
    """True when the extension has ``op`` ("int8", "int4" or "dequantize") on this CPU."""
    return cpu_kernels.has({"int8": "linear_int8", "int4": "linear_int4", "int4_rows8": "linear_int4_rows8",
                            "int8_rows8": "linear_int8_rows8"}.get(op, op))


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] (fp32/bf16/fp16) times the layer's quantized weight: [M, N] in x's dtype."""
    dtype = x.dtype
    x = x.contiguous() if dtype in (torch.float32, torch.bfloat16) else x.float().contiguous()
    if layer.method == "int8" and layer.rows8:
        out = torch.ops.nemolite.linear_int8_rows8(x, layer.qweight, layer.scales, layer.group_size)
    elif layer.method == "int8":
        out = torch.ops.nemolite.linear_int8(x, layer.qweight, layer.scales, layer.group_size)
    elif layer.rows8:
        out = torch.ops.nemolite.linear_int4_rows8(x, layer.qweight, layer.scales, layer.mins, layer.group_size)
    else:
        out = torch.ops.nemolite.linear_int4(x, layer.qweight, layer.scales, layer.mins, layer.group_size)
    return out if out.dtype == dtype else out.to(dtype)


@torch.library.custom_op("nemolite::dequantize_layer", mutates_args=())
def dequantize_layer(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, group_size: int,
                     int4: bool, rows8: bool, dtype: str, cpu_kernel: bool) -> torch.Tensor:
    """The weight [N, K] in ``dtype`` (a torch dtype's name) of a layer's storage, in whatever row layout it
    has: by the C++ kernel (``cpu_kernel``: fp32/bf16 on the CPU) or in plain torch. One opaque op, so that a
    compiled graph with frozen weights (inductor's freezing) runs it each call instead of folding its result
    into a float copy of the weight kept beside the quantized one (it did: the int8 bench model's RSS went
    0.94 -> 1.50 GB once a batch bucket took the dense path)."""
    from nemolite.quant.linear import dequantize_storage, rows8_to_row_major

    if rows8:
        in_features = qweight.shape[1] * (2 if int4 else 1)
        qweight, scales, mins = rows8_to_row_major(qweight, scales, mins, in_features, 4 if int4 else 8)
    if cpu_kernel:
        return torch.ops.nemolite.dequantize(qweight, scales, mins, group_size, int4, dtype == "bfloat16")
    return dequantize_storage(qweight, scales, mins, group_size, int4).to(getattr(torch, dtype))


@dequantize_layer.register_fake
def _(qweight, scales, mins, group_size, int4, rows8, dtype, cpu_kernel):
    return qweight.new_empty(qweight.shape[0], qweight.shape[1] * (2 if int4 else 1), dtype=getattr(torch, dtype))


def keep_dequantize_unfolded() -> None:
    """Tell inductor's constant folding (freezing) never to fold ``dequantize_layer``."""
    from torch._inductor.constant_folding import add_dont_constant_fold

    add_dont_constant_fold(torch.ops.nemolite.dequantize_layer.default)
