"""A bf16 matrix-vector kernel for batch-1 decode on CPUs with AVX512-BF16.

At batch 1 a linear layer is a GEMV bound by reading the weight. oneDNN's bf16 GEMV streams
weights at ~16-20 GB/s on the 2-core machine we test on; this loop (one sequential pass
per row, four independent ``vdpbf16ps`` accumulators) streams them at ~27-29 GB/s, about
what ``Tensor.sum`` reaches there. Built on first use with the system compiler (cached by
torch in ~/.cache/torch_extensions), registered as a torch custom op so compiled graphs can
call it, and enabled only by ``enable()`` (the engine's ``compile`` mode), so no start-up
ever waits on a C++ build unless it asked for speed.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <cstring>

// y[n] = sum_k w[n, k] * x[k]: w bf16 [N, K] row-major, x bf16 [K], K % 32 == 0; fp32 accumulation.
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
  const int64_t N = w.size(0), K = w.size(1);
  auto y = torch::empty({N}, x.options());
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const uint16_t* X = reinterpret_cast<const uint16_t*>(x.data_ptr());
  uint16_t* Y = reinterpret_cast<uint16_t*>(y.data_ptr());
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint16_t* row = W + n * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 128 <= K; k += 128) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(row + k), (__m512bh)_mm512_loadu_si512(X + k));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(row + k + 32), (__m512bh)_mm512_loadu_si512(X + k + 32));
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(row + k + 64), (__m512bh)_mm512_loadu_si512(X + k + 64));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(row + k + 96), (__m512bh)_mm512_loadu_si512(X + k + 96));
      }
      for (; k < K; k += 32)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(row + k), (__m512bh)_mm512_loadu_si512(X + k));
      float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
      uint32_t bits;
      std::memcpy(&bits, &sum, 4);
      bits += 0x7FFF + ((bits >> 16) & 1);  // round to nearest even, as a bf16 cast does
      Y[n] = static_cast<uint16_t>(bits >> 16);
    }
  });
  return y;
}

// A real operator (not a Python function), so compiled graphs call it without the interpreter.
TORCH_LIBRARY(nemolite, m) { m.def("gemv_bf16(Tensor x, Tensor weight) -> Tensor"); }
TORCH_LIBRARY_IMPL(nemolite, CPU, m) { m.impl("gemv_bf16", &gemv_bf16); }
"""

_enabled = False


def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any("avx512_bf16" in line for line in cpuinfo if line.startswith("flags"))
    except OSError:
        return False


def enable() -> bool:
    """Build (or load the cached build of) the kernel; True when batch-1 bf16 linears now use it."""
    global _enabled
    if _enabled:
        return True
    if os.environ.get("NEMOLITE_CPU_KERNELS", "1") == "0" or not _cpu_has_avx512_bf16():
        return False
    try:
        from torch.utils.cpp_extension import load_inline

        load_inline("nemolite_cpu_kernels", cpp_sources=_SOURCE, is_python_module=False,
                    extra_cflags=["-O3", "-mavx512f", "-mavx512bf16", "-fopenmp"], extra_ldflags=["-fopenmp"],
                    verbose=False)
    except Exception as error:  # noqa: BLE001 - no compiler, no headers: fall back to oneDNN
        log.warning("bf16 GEMV kernel unavailable (%s); using oneDNN", error)
        return False
    torch.library.register_fake("nemolite::gemv_bf16")(lambda x, weight: x.new_empty(weight.shape[0]))
    _enabled = True
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, through the GEMV kernel for one bf16 row on the CPU when enabled."""
    if (_enabled and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.shape[:-1].numel() == 1 and weight.shape[1] % 32 == 0 and weight.is_contiguous()):
        out = torch.ops.nemolite.gemv_bf16(x.reshape(-1).contiguous(), weight).reshape(*x.shape[:-1], weight.shape[0])
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)
