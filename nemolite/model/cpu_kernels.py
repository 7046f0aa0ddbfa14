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
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

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

static inline float to_float(float x) { return x; }
static inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }

// Decode attention straight from the paged cache: one query per sequence over its first lengths[b]
// cached positions (slots[b, :lengths[b]] of k_cache/v_cache [num_slots, G, D]) plus its own new
// key/value. One task per (sequence, KV head): each cached row is read once for the group's query
// heads, nothing is gathered or copied. q [B, H, D], new_k/new_v [B, G, D] -> [B, H, D].
template <typename T>
void decode_attention_impl(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& slots, const torch::Tensor& lengths, const torch::Tensor& new_k,
                           const torch::Tensor& new_v, double scale, torch::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), G = k_cache.size(1), S = slots.size(1);
  const int64_t per_group = H / G;
  const T* Q = q.data_ptr<T>();
  const T* KC = k_cache.data_ptr<T>();
  const T* VC = v_cache.data_ptr<T>();
  const T* NK = new_k.data_ptr<T>();
  const T* NV = new_v.data_ptr<T>();
  const int64_t* SL = slots.data_ptr<int64_t>();
  const int64_t* LEN = lengths.data_ptr<int64_t>();
  T* O = out.data_ptr<T>();
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(per_group * D), row(D), acc(per_group * D), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / G, g = task % G;
      const int64_t length = std::min<int64_t>(std::max<int64_t>(LEN[b], 0), S);
      const int64_t n = length + 1;  // cached positions, then the new token
      scores.assign(per_group * n, 0.f);
      for (int64_t i = 0; i < per_group; ++i)
        for (int64_t d = 0; d < D; ++d) qf[i * D + d] = to_float(Q[(b * H + g * per_group + i) * D + d]) * (float)scale;
      for (int64_t j = 0; j < n; ++j) {
        const T* k = j < length ? KC + (SL[b * S + j] * G + g) * D : NK + (b * G + g) * D;
        for (int64_t d = 0; d < D; ++d) row[d] = to_float(k[d]);
        for (int64_t i = 0; i < per_group; ++i) {
          float dot = 0.f;
          const float* qi = qf.data() + i * D;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qi[d] * row[d];
          scores[i * n + j] = dot;
        }
      }
      for (int64_t i = 0; i < per_group; ++i) {
        float* s = scores.data() + i * n;
        float top = s[0];
        for (int64_t j = 1; j < n; ++j) top = std::max(top, s[j]);
        float total = 0.f;
        for (int64_t j = 0; j < n; ++j) { s[j] = std::exp(s[j] - top); total += s[j]; }
        for (int64_t j = 0; j < n; ++j) s[j] /= total;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const T* v = j < length ? VC + (SL[b * S + j] * G + g) * D : NV + (b * G + g) * D;
        for (int64_t d = 0; d < D; ++d) row[d] = to_float(v[d]);
        for (int64_t i = 0; i < per_group; ++i) {
          const float p = scores[i * n + j];
          float* a = acc.data() + i * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * row[d];
        }
      }
      for (int64_t i = 0; i < per_group; ++i)
        for (int64_t d = 0; d < D; ++d) O[(b * H + g * per_group + i) * D + d] = static_cast<T>(acc[i * D + d]);
    }
  });
}

static inline __m512 bf16x16_to_float(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// The bf16 case with AVX512-BF16, for head_dim % 32 == 0: q.k with vdpbf16ps (32 products per
// instruction, fp32 sums), p.v with fp32 FMAs over rows widened 16 at a time.
void decode_attention_bf16(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& slots, const torch::Tensor& lengths, const torch::Tensor& new_k,
                           const torch::Tensor& new_v, double scale, torch::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), G = k_cache.size(1), S = slots.size(1);
  const int64_t per_group = H / G;
  const uint16_t* Q = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const uint16_t* KC = reinterpret_cast<const uint16_t*>(k_cache.data_ptr());
  const uint16_t* VC = reinterpret_cast<const uint16_t*>(v_cache.data_ptr());
  const uint16_t* NK = reinterpret_cast<const uint16_t*>(new_k.data_ptr());
  const uint16_t* NV = reinterpret_cast<const uint16_t*>(new_v.data_ptr());
  const int64_t* SL = slots.data_ptr<int64_t>();
  const int64_t* LEN = lengths.data_ptr<int64_t>();
  uint16_t* O = reinterpret_cast<uint16_t*>(out.data_ptr());
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(per_group * D), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / G, g = task % G;
      const int64_t length = std::min<int64_t>(std::max<int64_t>(LEN[b], 0), S);
      const int64_t n = length + 1;
      scores.resize(per_group * n);
      const uint16_t* q0 = Q + (b * H + g * per_group) * D;
      for (int64_t j = 0; j < n; ++j) {
        const uint16_t* k = j < length ? KC + (SL[b * S + j] * G + g) * D : NK + (b * G + g) * D;
        for (int64_t i = 0; i < per_group; ++i) {
          const uint16_t* qi = q0 + i * D;
          __m512 sum = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; d += 32)
            sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512(qi + d), (__m512bh)_mm512_loadu_si512(k + d));
          scores[i * n + j] = _mm512_reduce_add_ps(sum) * fscale;
        }
      }
      for (int64_t i = 0; i < per_group; ++i) {
        float* s = scores.data() + i * n;
        float top = s[0];
        for (int64_t j = 1; j < n; ++j) top = std::max(top, s[j]);
        float total = 0.f;
        for (int64_t j = 0; j < n; ++j) { s[j] = std::exp(s[j] - top); total += s[j]; }
        const float inverse = 1.f / total;
        for (int64_t j = 0; j < n; ++j) s[j] *= inverse;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const uint16_t* v = j < length ? VC + (SL[b * S + j] * G + g) * D : NV + (b * G + g) * D;
        for (int64_t d = 0; d < D; d += 16) {
          const __m512 row = bf16x16_to_float(v + d);
          for (int64_t i = 0; i < per_group; ++i) {
            float* a = acc.data() + i * D + d;
            _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(scores[i * n + j]), row, _mm512_loadu_ps(a)));
          }
        }
      }
      for (int64_t i = 0; i < per_group; ++i)
        for (int64_t d = 0; d < D; d += 16)
          _mm256_storeu_si256((__m256i*)(O + (b * H + g * per_group + i) * D + d),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(acc.data() + i * D + d)));
    }
  });
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                               torch::Tensor lengths, torch::Tensor new_k, torch::Tensor new_v, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && new_k.dim() == 3, "decode_attention: q [B,H,D], cache [N,G,D]");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "decode_attention: heads must be a multiple of KV heads");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_attention: caches must be contiguous");
  q = q.contiguous(); new_k = new_k.contiguous(); new_v = new_v.contiguous();
  slots = slots.to(torch::kLong).contiguous(); lengths = lengths.to(torch::kLong).contiguous();
  auto out = torch::empty_like(q);
  if (q.scalar_type() == torch::kBFloat16 && q.size(2) % 32 == 0)
    decode_attention_bf16(q, k_cache, v_cache, slots, lengths, new_k, new_v, scale, out);
  else if (q.scalar_type() == torch::kBFloat16)
    decode_attention_impl<at::BFloat16>(q, k_cache, v_cache, slots, lengths, new_k, new_v, scale, out);
  else {
    TORCH_CHECK(q.scalar_type() == torch::kFloat, "decode_attention: bf16 or fp32");
    decode_attention_impl<float>(q, k_cache, v_cache, slots, lengths, new_k, new_v, scale, out);
  }
  return out;
}

// Real operators (not Python functions), so compiled graphs call them without the interpreter.
TORCH_LIBRARY(nemolite, m) {
  m.def("gemv_bf16(Tensor x, Tensor weight) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor lengths, Tensor new_k, "
        "Tensor new_v, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(nemolite, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("decode_attention", &decode_attention);
}
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

        load_inline("nemolite_cpu_kernels_v3", cpp_sources=_SOURCE, is_python_module=False,
                    extra_cflags=["-O3", "-mavx512f", "-mavx512bf16", "-fopenmp"], extra_ldflags=["-fopenmp"],
                    verbose=False)
    except Exception as error:  # noqa: BLE001 - no compiler, no headers: fall back to oneDNN
        log.warning("bf16 GEMV kernel unavailable (%s); using oneDNN", error)
        return False
    torch.library.register_fake("nemolite::gemv_bf16")(lambda x, weight: x.new_empty(weight.shape[0]))
    torch.library.register_fake("nemolite::decode_attention")(
        lambda q, k_cache, v_cache, slots, lengths, new_k, new_v, scale: torch.empty_like(q))
    _enabled = True
    return True


def enabled() -> bool:
    return _enabled


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, through the GEMV kernel for one bf16 row on the CPU when enabled."""
    if (_enabled and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.shape[:-1].numel() == 1 and weight.shape[1] % 32 == 0 and weight.is_contiguous()):
        out = torch.ops.nemolite.gemv_bf16(x.reshape(-1).contiguous(), weight).reshape(*x.shape[:-1], weight.shape[0])
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)
