// Decode kernels for x86 CPUs with AVX2 and FMA: a bf16 GEMV, paged decode attention, a row sampler.
// Built by nemolite/model/cpu_kernels.py with -march=native. Each kernel has an AVX512 form (16 lanes;
// vdpbf16ps where the CPU has AVX512-BF16) and an AVX2 form (8 lanes; bf16 widened to fp32 by a
// shift, as a bf16 is the top half of an fp32); without AVX2 + FMA this file compiles to nothing and
// the Python side falls back (nemolite.model.cpu_kernels.has).
#include <torch/extension.h>

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define NEMOLITE_AVX512_BF16 1
#endif

// fp32 -> bf16 bits, rounded to nearest even as a bf16 cast does (no NaN inputs here).
static inline uint16_t bf16_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

// 8 bf16 -> 8 fp32.
static inline __m256 bf16x8_to_float(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// n bf16 (n % 8 == 0) widened to fp32: the activations the AVX2 kernels read from L1 for every weight row.
static inline std::vector<float> widen_bf16(const uint16_t* p, int64_t n) {
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(out.data() + i, bf16x8_to_float(p + i));
  return out;
}

static inline float reduce_add8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float reduce_max8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// y[n] = sum_k w[n, k] * x[k]: w bf16 [N, K] row-major, x bf16 [K], K % 32 == 0; fp32 accumulation,
// one sequential pass per row with four independent accumulators. AVX512-BF16: vdpbf16ps, 32
// products an instruction. AVX2: x widened to fp32 once (L1-resident), each row widened 8 at a time.
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
  const int64_t N = w.size(0), K = w.size(1);
  auto y = torch::empty({N}, x.options());
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const uint16_t* X = reinterpret_cast<const uint16_t*>(x.data_ptr());
  uint16_t* Y = reinterpret_cast<uint16_t*>(y.data_ptr());
#ifndef NEMOLITE_AVX512_BF16
  const std::vector<float> xf = widen_bf16(X, K);
  const float* XF = xf.data();
#endif
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint16_t* row = W + n * K;
#ifdef NEMOLITE_AVX512_BF16
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
      const float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      for (int64_t k = 0; k < K; k += 32) {
        a0 = _mm256_fmadd_ps(bf16x8_to_float(row + k), _mm256_loadu_ps(XF + k), a0);
        a1 = _mm256_fmadd_ps(bf16x8_to_float(row + k + 8), _mm256_loadu_ps(XF + k + 8), a1);
        a2 = _mm256_fmadd_ps(bf16x8_to_float(row + k + 16), _mm256_loadu_ps(XF + k + 16), a2);
        a3 = _mm256_fmadd_ps(bf16x8_to_float(row + k + 24), _mm256_loadu_ps(XF + k + 24), a3);
      }
      const float sum = reduce_add8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
      Y[n] = bf16_bits(sum);
    }
  });
  return y;
}

#ifndef NEMOLITE_AVX512_BF16
// Y = X W^T for a few rows of bf16 activations on CPUs without native bf16 GEMMs (AVX2), where
// oneDNN's bf16 path is emulated and slow (a 32-row prefill of the 204 M bench model: ~490 ms of
// linears). X [M, K] is widened to fp32 once; each weight row is then read from memory once and from
// L1 for every pair of activation rows. Every output is summed in the order of gemv_bf16 (four
// accumulators, k in steps of 32, (a0 + a1) + (a2 + a3)), so a row gets the same bits here as alone
// through the GEMV: decode output does not depend on the batch.
template <int XR>
static inline void bf16_row_times_rows(const uint16_t* row, const float* xf, int64_t K, float* sums) {
  __m256 acc[XR][4];
  for (int r = 0; r < XR; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __m256 w0 = bf16x8_to_float(row + k), w1 = bf16x8_to_float(row + k + 8);
    const __m256 w2 = bf16x8_to_float(row + k + 16), w3 = bf16x8_to_float(row + k + 24);
    for (int r = 0; r < XR; ++r) {
      const float* x = xf + r * K + k;
      acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8), acc[r][1]);
      acc[r][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + 16), acc[r][2]);
      acc[r][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + 24), acc[r][3]);
    }
  }
  for (int r = 0; r < XR; ++r)
    sums[r] = reduce_add8(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])));
}

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_bf16: x [M, K], weight [N, K]");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16, "linear_bf16: bf16 only");
  TORCH_CHECK(w.size(1) % 32 == 0, "linear_bf16: K must be a multiple of 32");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  auto y = torch::empty({M, N}, x.options());
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const uint16_t* X = reinterpret_cast<const uint16_t*>(x.data_ptr());
  uint16_t* Y = reinterpret_cast<uint16_t*>(y.data_ptr());
  const std::vector<float> xf = widen_bf16(X, M * K);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    float sums[2];
    for (int64_t n = begin; n < end; ++n) {
      const uint16_t* row = W + n * K;
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) {
        bf16_row_times_rows<2>(row, xf.data() + m * K, K, sums);
        Y[m * N + n] = bf16_bits(sums[0]);
        Y[(m + 1) * N + n] = bf16_bits(sums[1]);
      }
      if (m < M) {
        bf16_row_times_rows<1>(row, xf.data() + m * K, K, sums);
        Y[m * N + n] = bf16_bits(sums[0]);
      }
    }
  });
  return y;
}
#endif

// e^x for x <= 0 (Cephes' expf: n = round(x log2 e), r = x - n ln 2 in two parts, a degree-6
// polynomial, scaled by 2^n built in the exponent bits): within 2 ulp of expf; below -87.3 it gives
// ~1e-38. 8 lanes.
static inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));  // n >= -126: 2^n is a normal float
}

// The first count (at most 8) lanes of p, the others -inf.
static inline __m256 load_or_minus_inf(const float* p, int64_t count) {
  if (count >= 8) return _mm256_loadu_ps(p);
  alignas(32) float buffer[8];
  for (int64_t i = 0; i < 8; ++i) buffer[i] = i < count ? p[i] : -INFINITY;
  return _mm256_load_ps(buffer);
}

static inline void store_first(float* p, __m256 v, int64_t count) {
  if (count >= 8) return _mm256_storeu_ps(p, v);
  alignas(32) float buffer[8];
  _mm256_store_ps(buffer, v);
  std::copy(buffer, buffer + count, p);
}

// e[i] = exp(x[i] - highest) for the n values of x (-inf -> 0), 8 at a time; returns their sum.
static float exp_shifted(const float* x, int64_t n, float highest, float* e) {
  const __m256 top = _mm256_set1_ps(highest);
  __m256 total = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 v = load_or_minus_inf(x + j, n - j);
    const __m256 live = _mm256_cmp_ps(v, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    const __m256 ex = _mm256_and_ps(live, exp_nonpositive(_mm256_sub_ps(v, top)));
    store_first(e + j, ex, n - j);
    total = _mm256_add_ps(total, ex);
  }
  return reduce_add8(total);
}

static float max_of(const float* x, int64_t n) {
  __m256 top = _mm256_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 8) top = _mm256_max_ps(top, load_or_minus_inf(x + j, n - j));
  return reduce_max8(top);
}

// Each of the rows scores[i * n : (i + 1) * n] replaced by its softmax (fp32).
static void softmax_rows(float* scores, int64_t rows, int64_t n) {
  for (int64_t i = 0; i < rows; ++i) {
    float* s = scores + i * n;
    const float total = exp_shifted(s, n, max_of(s, n), s);
    for (int64_t j = 0; j < n; ++j) s[j] /= total;
  }
}

static inline float to_float(float x) { return x; }
static inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }

#ifdef __AVX512F__
// The fp32 case for head_dim = 16 * C (64, 128): one task per sequence, every cached row (all G
// KV heads, contiguous in the cache) read once, in slot order, for all H query heads. Reading whole
// rows instead of one KV head's slice per task took the demo model's layer (B=16, 325 positions,
// cache in DRAM) from 730 to 430 us. Scores in place, their softmax, then each head's output summed
// in acc (L1-resident). qs [H, D] already scaled; new_k/new_v [G, D]; out [H, D].
template <int C>
static void attend_f32(const float* qs, int64_t H, int64_t G, int64_t n, int64_t length, const float* KC,
                       const float* VC, const int64_t* slots, const float* new_k, const float* new_v,
                       float* scores, float* acc, float* out) {
  constexpr int64_t D = 16 * C;
  const int64_t per_group = H / G;
  for (int64_t j = 0; j < n; ++j) {
    const float* row = j < length ? KC + slots[j] * G * D : new_k;
    for (int64_t h = 0; h < H; ++h) {
      const float* k = row + (h / per_group) * D;
      const float* q = qs + h * D;
      __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
      for (int c = 1; c < C; ++c) sum = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * c), _mm512_loadu_ps(k + 16 * c), sum);
      scores[h * n + j] = _mm512_reduce_add_ps(sum);
    }
  }
  softmax_rows(scores, H, n);
  std::fill(acc, acc + H * D, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const float* row = j < length ? VC + slots[j] * G * D : new_v;
    for (int64_t h = 0; h < H; ++h) {
      const float* v = row + (h / per_group) * D;
      const __m512 p = _mm512_set1_ps(scores[h * n + j]);
      float* a = acc + h * D;
      for (int c = 0; c < C; ++c)
        _mm512_storeu_ps(a + 16 * c, _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 16 * c), _mm512_loadu_ps(a + 16 * c)));
    }
  }
  std::copy(acc, acc + H * D, out);
}

#endif

// Decode attention straight from the paged cache: one query per sequence over its first lengths[b]
// cached positions (slots[b, :lengths[b]] of k_cache/v_cache [num_slots, G, D]) plus its own new
// key/value, nothing gathered or copied. q [B, H, D], new_k/new_v [B, G, D] -> [B, H, D]. The fp32
// head_dim 64/128 case takes one task per sequence under AVX512 (attend_f32); the others one per (sequence, KV
// head), each cached row slice read once for the group's query heads.
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
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>) {
    if (D == 64 || D == 128) {
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> qf(H * D), acc(H * D), scores;
        for (int64_t b = begin; b < end; ++b) {
          const int64_t length = std::min<int64_t>(std::max<int64_t>(LEN[b], 0), S);
          scores.resize(H * (length + 1));
          for (int64_t x = 0; x < H * D; ++x) qf[x] = Q[b * H * D + x] * (float)scale;
          (D == 64 ? attend_f32<4> : attend_f32<8>)(qf.data(), H, G, length + 1, length, KC, VC, SL + b * S,
                                                    NK + b * G * D, NV + b * G * D, scores.data(), acc.data(),
                                                    O + b * H * D);
        }
      });
      return;
    }
  }
#endif
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
      softmax_rows(scores.data(), per_group, n);
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

// The bf16 case's inner loops, one query head at a time over the positions' key / value rows, for
// head_dim % BF16_HEAD_DIM == 0: head_scores (q.k, scaled) and head_values (the p-weighted sum of the
// value rows, fp32). AVX512-BF16 takes the bf16 query as it is (vdpbf16ps, 32 products an
// instruction); AVX2 its fp32 copy against rows widened 8 at a time, with the query's and the sum's
// vectors held in registers across all positions where head_dim is 64 or 128 (a template on it).
#ifdef NEMOLITE_AVX512_BF16
constexpr int64_t BF16_HEAD_DIM = 32;
static inline __m512 bf16x16_to_float(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

static void head_scores(const uint16_t* q, const float*, const uint16_t* const* rows, int64_t n, int64_t D,
                        float scale, float* scores) {
  for (int64_t j = 0; j < n; ++j) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32)
      sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512(q + d), (__m512bh)_mm512_loadu_si512(rows[j] + d));
    scores[j] = _mm512_reduce_add_ps(sum) * scale;
  }
}

static void head_values(const float* p, const uint16_t* const* rows, int64_t n, int64_t D, float* out) {
  for (int64_t d = 0; d < D; d += 16) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) sum = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), bf16x16_to_float(rows[j] + d), sum);
    _mm512_storeu_ps(out + d, sum);
  }
}
#else
constexpr int64_t BF16_HEAD_DIM = 8;

template <int C>  // head_dim = 8 C
static void head_scores_fixed(const float* q, const uint16_t* const* rows, int64_t n, float scale, float* scores) {
  __m256 query[C];
  for (int c = 0; c < C; ++c) query[c] = _mm256_loadu_ps(q + 8 * c);
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* k = rows[j];
    __m256 even = _mm256_mul_ps(query[0], bf16x8_to_float(k)), odd = _mm256_mul_ps(query[1], bf16x8_to_float(k + 8));
    for (int c = 2; c < C; c += 2) {
      even = _mm256_fmadd_ps(query[c], bf16x8_to_float(k + 8 * c), even);
      odd = _mm256_fmadd_ps(query[c + 1], bf16x8_to_float(k + 8 * c + 8), odd);
    }
    scores[j] = reduce_add8(_mm256_add_ps(even, odd)) * scale;
  }
}

template <int C>
static void head_values_fixed(const float* p, const uint16_t* const* rows, int64_t n, float* out) {
  __m256 sum[C];
  for (int c = 0; c < C; ++c) sum[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 weight = _mm256_set1_ps(p[j]);
    for (int c = 0; c < C; ++c) sum[c] = _mm256_fmadd_ps(weight, bf16x8_to_float(rows[j] + 8 * c), sum[c]);
  }
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(out + 8 * c, sum[c]);
}

static void head_scores(const uint16_t*, const float* q, const uint16_t* const* rows, int64_t n, int64_t D,
                        float scale, float* scores) {
  if (D == 64) return head_scores_fixed<8>(q, rows, n, scale, scores);
  if (D == 128) return head_scores_fixed<16>(q, rows, n, scale, scores);
  for (int64_t j = 0; j < n; ++j) {
    __m256 sum = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) sum = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), bf16x8_to_float(rows[j] + d), sum);
    scores[j] = reduce_add8(sum) * scale;
  }
}

static void head_values(const float* p, const uint16_t* const* rows, int64_t n, int64_t D, float* out) {
  if (D == 64) return head_values_fixed<8>(p, rows, n, out);
  if (D == 128) return head_values_fixed<16>(p, rows, n, out);
  for (int64_t d = 0; d < D; d += 8) {
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) sum = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), bf16x8_to_float(rows[j] + d), sum);
    _mm256_storeu_ps(out + d, sum);
  }
}
#endif

// The bf16 case: one task per (sequence, KV head); the group's query heads one after the other over
// the task's rows (L1-resident after the first), fp32 scores, softmax and sums.
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
    std::vector<float> acc(per_group * D), qf(per_group * D), scores;
    std::vector<const uint16_t*> keys, values;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / G, g = task % G;
      const int64_t length = std::min<int64_t>(std::max<int64_t>(LEN[b], 0), S);
      const int64_t n = length + 1;  // the cached positions, then the new token
      scores.resize(per_group * n);
      keys.resize(n);
      values.resize(n);
      for (int64_t j = 0; j < length; ++j) {
        keys[j] = KC + (SL[b * S + j] * G + g) * D;
        values[j] = VC + (SL[b * S + j] * G + g) * D;
      }
      keys[length] = NK + (b * G + g) * D;
      values[length] = NV + (b * G + g) * D;
      const uint16_t* q0 = Q + (b * H + g * per_group) * D;
      for (int64_t x = 0; x < per_group * D; x += 8) _mm256_storeu_ps(qf.data() + x, bf16x8_to_float(q0 + x));
      for (int64_t i = 0; i < per_group; ++i)
        head_scores(q0 + i * D, qf.data() + i * D, keys.data(), n, D, fscale, scores.data() + i * n);
      softmax_rows(scores.data(), per_group, n);
      for (int64_t i = 0; i < per_group; ++i)
        head_values(scores.data() + i * n, values.data(), n, D, acc.data() + i * D);
      uint16_t* o = O + (b * H + g * per_group) * D;
      for (int64_t x = 0; x < per_group * D; ++x) o[x] = bf16_bits(acc[x]);
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
  if (q.scalar_type() == torch::kBFloat16 && q.size(2) % BF16_HEAD_DIM == 0)
    decode_attention_bf16(q, k_cache, v_cache, slots, lengths, new_k, new_v, scale, out);
  else if (q.scalar_type() == torch::kBFloat16)
    decode_attention_impl<at::BFloat16>(q, k_cache, v_cache, slots, lengths, new_k, new_v, scale, out);
  else {
    TORCH_CHECK(q.scalar_type() == torch::kFloat, "decode_attention: bf16 or fp32");
    decode_attention_impl<float>(q, k_cache, v_cache, slots, lengths, new_k, new_v, scale, out);
  }
  return out;
}

// The CPU sampler's filters and draw for fp32 logits [R, V], one row at a time with its own
// temperature, top_k (V: off), top_p (1: off), min_p (0: off) and uniform u in [0, 1): the rules of
// nemolite/engine/sampler.py (which the torch path follows too) without ranking the vocabulary.
// e = exp(logits / T - max) (0 for -inf logits); top-k keeps the k largest (ties in token order);
// top-p keeps, in descending order, each token whose predecessors' mass is below top_p of the
// top-k mass, found with a histogram of e's float bits and a sort of the one boundary bucket; min-p
// keeps e >= min_p * max e; then the token where the cumulative kept mass, in token order, first
// exceeds u * total. Returns the token ids [R].
// Histogram buckets of e in [0, 1]: its float bits / 2^19, monotonic in e (1.0 is bucket 2032; a NaN
// logit lands in the top one).
constexpr int64_t SAMPLER_BUCKETS = 2048;
static inline int64_t bucket_of(float e) {
  uint32_t bits;
  std::memcpy(&bits, &e, 4);
  return std::min<uint32_t>(bits >> 19, SAMPLER_BUCKETS - 1);
}

// Zero every e below the boundary bucket; the boundary bucket's (e, token) into pool, largest first
// (ties: lower token first).
static void take_boundary(float* e, int64_t V, int64_t boundary, std::vector<std::pair<float, int32_t>>& pool) {
  pool.clear();
  for (int64_t i = 0; i < V; ++i) {
    const int64_t bucket = bucket_of(e[i]);
    if (bucket < boundary) e[i] = 0.f;
    else if (bucket == boundary) pool.emplace_back(e[i], (int32_t)i);
  }
  std::sort(pool.begin(), pool.end(),
            [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
}

static void sample_row(const float* logits, int64_t V, float temperature, int64_t top_k, float top_p, float min_p,
                       float u, float* e, std::vector<float>& mass, std::vector<int64_t>& count,
                       std::vector<std::pair<float, int32_t>>& pool, int64_t* token) {
  float highest = -INFINITY;
#pragma omp simd reduction(max : highest)
  for (int64_t i = 0; i < V; ++i) {
    e[i] = logits[i] / temperature;
    highest = std::max(highest, e[i]);
  }
  exp_shifted(e, V, highest, e);
  if (top_k < V) {  // the buckets from the top until k tokens, then the k - above largest of the last
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < V; ++i) ++count[bucket_of(e[i])];
    int64_t above = 0, boundary = (int64_t)count.size() - 1;
    for (; boundary > 0 && above + count[boundary] < top_k; --boundary) above += count[boundary];
    take_boundary(e, V, boundary, pool);
    for (int64_t n = 0; n < (int64_t)pool.size(); ++n)
      if (above + n >= top_k) e[pool[n].second] = 0.f;
  }
  if (top_p < 1.f) {
    // Buckets of 2^19 float bit patterns: monotonic in e >= 0, 2033 of them up to 1.0.
    std::fill(mass.begin(), mass.end(), 0.f);
    float total = 0.f;
    for (int64_t i = 0; i < V; ++i) {
      mass[bucket_of(e[i])] += e[i];
      total += e[i];
    }
    const float target = top_p * total;
    float before = 0.f;
    int64_t boundary = (int64_t)mass.size() - 1;
    for (; boundary > 0 && before + mass[boundary] < target; --boundary) before += mass[boundary];
    take_boundary(e, V, boundary, pool);
    for (const auto& [value, i] : pool) {
      if (before >= target) e[i] = 0.f;
      before += value;
    }
  }
  if (min_p > 0.f) {  // the largest e is exactly 1 (exp(0)) and always survives the filters above
    for (int64_t i = 0; i < V; ++i)
      if (e[i] < min_p) e[i] = 0.f;
  }
  float total = 0.f;
  for (int64_t i = 0; i < V; ++i) total += e[i];
  const float target = u * total;
  float cumulative = 0.f;
  int64_t last = 0;
  for (int64_t i = 0; i < V; ++i) {
    if (e[i] <= 0.f) continue;
    cumulative += e[i];
    last = i;
    if (cumulative > target) break;
  }
  *token = last;
}

torch::Tensor sample_rows(torch::Tensor logits, torch::Tensor temperature, torch::Tensor top_k, torch::Tensor top_p,
                          torch::Tensor min_p, torch::Tensor uniforms) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat, "sample_rows: fp32 logits [R, V]");
  logits = logits.contiguous();
  temperature = temperature.to(torch::kFloat).contiguous(); top_p = top_p.to(torch::kFloat).contiguous();
  min_p = min_p.to(torch::kFloat).contiguous(); uniforms = uniforms.to(torch::kFloat).contiguous();
  top_k = top_k.to(torch::kLong).contiguous();
  const int64_t R = logits.size(0), V = logits.size(1);
  auto tokens = torch::empty({R}, logits.options().dtype(torch::kLong));
  const float* L = logits.data_ptr<float>();
  const float *T = temperature.data_ptr<float>(), *P = top_p.data_ptr<float>(), *M = min_p.data_ptr<float>();
  const float* U = uniforms.data_ptr<float>();
  const int64_t* K = top_k.data_ptr<int64_t>();
  int64_t* out = tokens.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> e(V), mass(SAMPLER_BUCKETS);
    std::vector<int64_t> count(SAMPLER_BUCKETS);
    std::vector<std::pair<float, int32_t>> pool;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t k = K[r] <= 0 ? V : std::min(K[r], V);
      sample_row(L + r * V, V, T[r], k, P[r], M[r], U[r], e.data(), mass, count, pool, out + r);
    }
  });
  return tokens;
}

// Each row's argmax (the first largest value, as torch.argmax; a NaN counts as the largest) and its
// logsumexp, max + log sum exp(x - max), on one thread (passes for the maximum, its first index and the
// exponentials): at V = 32000 a step's torch argmax + logsumexp (several kernels, each split between
// threads) cost ~0.2 ms of a 5 ms batch-1 step on the 2-core machine, this ~15 us. One row's figures never depend on the others'.
static void greedy_row(const float* x, int64_t V, int64_t* token, float* lse) {
  __m256 top = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= V; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    top = _mm256_max_ps(top, v);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  float highest = reduce_max8(top);
  bool nan = _mm256_movemask_ps(unordered) != 0;
  for (; j < V; ++j) {
    highest = std::max(highest, x[j]);
    nan = nan || std::isnan(x[j]);
  }
  int64_t best = 0;
  if (nan) {
    while (!std::isnan(x[best])) ++best;
    *token = best;
    *lse = NAN;
    return;
  }
  const __m256 wanted = _mm256_set1_ps(highest);
  for (j = 0; j + 8 <= V; j += 8) {  // the first index holding the maximum (-inf when all are: index 0)
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), wanted, _CMP_EQ_OQ));
    if (mask) break;
  }
  for (best = j; best < V && x[best] != highest; ++best) {}
  *token = best < V ? best : 0;
  if (highest == INFINITY || highest == -INFINITY) {
    *lse = highest;
    return;
  }
  const __m256 shift = _mm256_set1_ps(highest);
  __m256 total = _mm256_setzero_ps();
  for (j = 0; j + 8 <= V; j += 8)
    total = _mm256_add_ps(total, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + j), shift)));
  float sum = reduce_add8(total);
  for (; j < V; ++j) sum += std::exp(x[j] - highest);
  *lse = highest + std::log(sum);
}

std::tuple<torch::Tensor, torch::Tensor> greedy_rows(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat && logits.size(1) > 0,
              "greedy_rows: fp32 logits [R, V]");
  logits = logits.contiguous();
  const int64_t R = logits.size(0), V = logits.size(1);
  auto tokens = torch::empty({R}, logits.options().dtype(torch::kLong));
  auto lse = torch::empty({R}, logits.options());
  const float* L = logits.data_ptr<float>();
  int64_t* T = tokens.data_ptr<int64_t>();
  float* S = lse.data_ptr<float>();
  at::parallel_for(0, R, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) greedy_row(L + r * V, V, T + r, S + r);
  });
  return {tokens, lse};
}

// The compiled decode step's new keys and values into the paged caches: caches[i][slots[b]] = rows[i][b]
// for every layer in one call (24 index_copy_ calls from Python cost ~80 us a step on the 2-core machine).
void store_rows(std::vector<torch::Tensor> caches, torch::Tensor slots, std::vector<torch::Tensor> rows) {
  TORCH_CHECK(caches.size() == rows.size(), "store_rows: one row tensor per cache");
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == torch::kLong, "store_rows: slots must be int64 [B]");
  slots = slots.contiguous();
  const int64_t B = slots.size(0);
  const int64_t* S = slots.data_ptr<int64_t>();
  for (size_t i = 0; i < caches.size(); ++i) {
    const torch::Tensor& cache = caches[i];
    TORCH_CHECK(cache.is_contiguous() && cache.dim() >= 1, "store_rows: caches must be contiguous");
    torch::Tensor row = rows[i].contiguous();
    TORCH_CHECK(row.scalar_type() == cache.scalar_type() && row.dim() == cache.dim() && row.size(0) == B &&
                row.numel() == B * cache.stride(0), "store_rows: rows must be [B, ...] of the cache's dtype and row shape");
    const int64_t bytes = cache.stride(0) * cache.element_size();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(S[b] >= 0 && S[b] < cache.size(0), "store_rows: slot out of range");
      std::memcpy(static_cast<char*>(cache.data_ptr()) + S[b] * bytes,
                  static_cast<const char*>(row.data_ptr()) + b * bytes, bytes);
    }
  }
}

// Structured output (nemolite.engine.structured): logits[rows[i], t] = -inf for every token t whose bit
// (bit t % 32 of bitmask[i][t / 32], llguidance's layout) is 0, and for tokens past the bitmask's 32 * W.
// One pass over the forbidden tokens; the torch path (unpack the bits, index, masked_fill, index_put) took
// ~0.3 ms at [16, 4096] on the 2-core machine.
template <typename T>
void mask_rows(T* logits, int64_t V, const int32_t* bitmask, int64_t W, const int64_t* rows, int64_t k) {
  const T lowest = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < k; ++i) {
    T* row = logits + rows[i] * V;
    const int32_t* bits = bitmask + i * W;
    for (int64_t word = 0; word * 32 < V; ++word) {
      uint32_t forbidden = word < W ? ~static_cast<uint32_t>(bits[word]) : 0xffffffffu;
      while (forbidden) {
        int64_t t = word * 32 + __builtin_ctz(forbidden);
        forbidden &= forbidden - 1;
        if (t < V) row[t] = lowest;
      }
    }
  }
}

void apply_token_bitmask(torch::Tensor logits, torch::Tensor bitmask, torch::Tensor rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() &&
              (logits.scalar_type() == torch::kFloat || logits.scalar_type() == torch::kBFloat16),
              "apply_token_bitmask: contiguous fp32 or bf16 logits [R, V]");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.is_contiguous() && bitmask.scalar_type() == torch::kInt,
              "apply_token_bitmask: contiguous int32 bitmask [k, W]");
  TORCH_CHECK(rows.dim() == 1 && rows.is_contiguous() && rows.scalar_type() == torch::kLong &&
              rows.size(0) == bitmask.size(0), "apply_token_bitmask: int64 rows [k], one per bitmask row");
  const int64_t k = rows.size(0), V = logits.size(1), W = bitmask.size(1);
  const int64_t* R = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i) TORCH_CHECK(R[i] >= 0 && R[i] < logits.size(0), "apply_token_bitmask: row out of range");
  if (logits.scalar_type() == torch::kFloat)
    mask_rows(logits.data_ptr<float>(), V, bitmask.data_ptr<int32_t>(), W, R, k);
  else
    mask_rows(logits.data_ptr<at::BFloat16>(), V, bitmask.data_ptr<int32_t>(), W, R, k);
}

// Real operators (not Python functions), so compiled graphs call them without the interpreter.
TORCH_LIBRARY_FRAGMENT(nemolite, m) {
  m.def("gemv_bf16(Tensor x, Tensor weight) -> Tensor");
#ifndef NEMOLITE_AVX512_BF16
  m.def("linear_bf16(Tensor x, Tensor weight) -> Tensor");
#endif
  m.def("sample_rows(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor uniforms) "
        "-> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor lengths, Tensor new_k, "
        "Tensor new_v, float scale) -> Tensor");
  m.def("store_rows(Tensor(a!)[] caches, Tensor slots, Tensor[] rows) -> ()");
  m.def("greedy_rows(Tensor logits) -> (Tensor, Tensor)");
  m.def("apply_token_bitmask(Tensor(a!) logits, Tensor bitmask, Tensor rows) -> ()");
}
TORCH_LIBRARY_IMPL(nemolite, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
#ifndef NEMOLITE_AVX512_BF16
  m.impl("linear_bf16", &linear_bf16);
#endif
  m.impl("decode_attention", &decode_attention);
  m.impl("sample_rows", &sample_rows);
  m.impl("store_rows", &store_rows);
  m.impl("greedy_rows", &greedy_rows);
  m.impl("apply_token_bitmask", &apply_token_bitmask);
}
#endif  // AVX2 + FMA
