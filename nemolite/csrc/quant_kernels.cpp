// Quantized linear layers on the CPU: y = x W^T with W stored as int8 or int4 values plus scales
// (the storage of nemolite/quant/linear.py).
//
// Decode (a few activation rows) is bound by reading the weight, so every weight byte is read once
// for all rows, in one sequential pass: the activation rows are first quantized to int8 in blocks
// of 32 (scale d = amax / 127, as llama.cpp's Q8_0 activations), then each block of 32 weights is
// multiplied with integer dot products - AVX512-VNNI / AVX-VNNI `vpdpbusd` where the CPU has it,
// AVX2 `vpmaddubsw` + `vpmaddwd` otherwise - and one float multiply-add per block applies
// weight scale x activation scale. int4 values are unsigned (0..15), so they are the unsigned
// operand as they are; int8 values go through the sign trick (|w| times x with w's sign) that
// keeps every int16 partial sum below 2^15. An offset term (-8 s or the group's min, times the
// block's activation sum) handles the int4 zero point.
//
// Each op also has a portable scalar path (`reference=True`, and the only path on CPUs without
// AVX2): the same arithmetic one element at a time, the reference the SIMD path is tested against.
// `dequantize` writes the float weight for the GEMM path (prefill, large batches).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define NEMOLITE_AVX2 1
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define NEMOLITE_VNNI 1  // vpdpbusd on 256-bit registers
#endif
#endif

namespace {

// The per-row kernels are inlined into their callers' row loops: called once a weight row, their setup
// (constants, pointers) and the call itself cost ~17 ns a row, 40 % of a 1024-column int4 row (2-core
// AVX2 machine, bench model shapes from L3: 1024x1024 int4 27 -> 20 us on one thread).
#if defined(__GNUC__)
#define NEMOLITE_INLINE __attribute__((always_inline)) inline
#else
#define NEMOLITE_INLINE inline
#endif

constexpr int64_t QK = 32;        // columns per block
constexpr int64_t MAX_ROWS = 8;   // activation rows per pass over the weight
// Software prefetch distance in the weight stream (into the following rows near a row's end): on the
// 2-core AVX2 machine hardware prefetch alone lags these loops; 2 KB ahead took the bench model's 72
// int8 linears plus its head from 18.3 to 14.4 ms, its int4 ones 5-10 % (medians, interleaved runs).
constexpr int64_t PREFETCH_BYTES = 2048;

inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// Activation rows quantized to int8 blocks, block-major so that the rows of one block sit together:
// q [K/32, M, 32], d [K/32, M] (scale), s [K/32, M] (d * sum q), and gs [M, groups]: s summed over
// each weight group (the int4 zero point's term is one multiply-add per group and row).
struct QuantizedRows {
  int64_t M = 0, K = 0, KB = 0;
  std::vector<int8_t> q;
  std::vector<float> d, s, gs;
  const int8_t* block_q(int64_t b, int64_t m) const { return q.data() + (b * M + m) * QK; }
  float block_d(int64_t b, int64_t m) const { return d[b * M + m]; }
  float block_s(int64_t b, int64_t m) const { return s[b * M + m]; }
  void sum_groups(int64_t group_blocks) {
    const int64_t groups = KB / group_blocks;
    gs.assign(groups * M, 0.f);
    for (int64_t b = 0; b < KB; ++b)
      for (int64_t m = 0; m < M; ++m) gs[m * groups + b / group_blocks] += s[b * M + m];
  }
  // The int4 SIMD path reads two blocks (2p, 2p + 1) at a time: one 32-byte load of their packed
  // weights holds both blocks' columns 0-15 in its low nibbles and columns 16-31 in its high ones,
  // so each row's pair is laid out to match, as 64 bytes: columns 0-15 of both blocks, then 16-31
  // of both (pairs [ceil(KB/2), M, 64]; an odd last block leaves its partner's bytes zero). Its
  // scales and block sums row-major too (dr, sr [M, KB]), read eight blocks at a time.
  std::vector<int8_t> pairs;
  std::vector<float> dr, sr;
  const int8_t* pair_q(int64_t p, int64_t m) const { return pairs.data() + (p * M + m) * 2 * QK; }
  void pair_blocks() {
    pairs.assign(((KB + 1) / 2) * M * 2 * QK, 0);
    dr.resize(M * KB);
    sr.resize(M * KB);
    for (int64_t b = 0; b < KB; ++b)
      for (int64_t m = 0; m < M; ++m) {
        int8_t* slot = pairs.data() + ((b / 2) * M + m) * 2 * QK + (b % 2) * (QK / 2);
        std::memcpy(slot, block_q(b, m), QK / 2);
        std::memcpy(slot + QK, block_q(b, m) + QK / 2, QK / 2);
        dr[m * KB + b] = block_d(b, m);
        sr[m * KB + b] = block_s(b, m);
      }
  }
};

template <typename T>
void quantize_block_scalar(const T* x, int8_t* q, float* d, float* s) {
  float amax = 0.f;
  for (int64_t i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(to_float(x[i])));
  const float scale = amax / 127.f, inverse = amax > 0.f ? 127.f / amax : 0.f;
  int32_t sum = 0;
  for (int64_t i = 0; i < QK; ++i) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(to_float(x[i]) * inverse));
    q[i] = static_cast<int8_t>(v);
    sum += v;
  }
  *d = scale;
  *s = scale * static_cast<float>(sum);
}

#ifdef NEMOLITE_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

inline int32_t hsum(__m128i r) {
  r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0x4E));
  r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0xB1));
  return _mm_cvtsi128_si32(r);
}

inline int32_t hsum(__m256i v) {
  return hsum(_mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
}

// The same block quantization, 8 lanes at a time (round to nearest even both ways).
template <typename T>
void quantize_block_avx2(const T* x, int8_t* q, float* d, float* s) {
  __m256 v0 = load8(x), v1 = load8(x + 8), v2 = load8(x + 16), v3 = load8(x + 24);
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                           _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  r = _mm_max_ss(r, _mm_movehdup_ps(r));
  const float amax = _mm_cvtss_f32(r);
  const float scale = amax / 127.f, inverse = amax > 0.f ? 127.f / amax : 0.f;
  const __m256 mul = _mm256_set1_ps(inverse);
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), kRound));
  __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), kRound));
  __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), kRound));
  __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), kRound));
  const int32_t sum = hsum(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
  // packs work per 128-bit lane: pack, then restore the element order with one permute
  __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
  packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), packed);
  *d = scale;
  *s = scale * static_cast<float>(sum);
}

#ifdef NEMOLITE_VNNI
// sum + the u8 x s8 products of each group of four bytes, in 8 int32 lanes (no int16 saturation).
inline __m256i dpbusd(__m256i sum, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(sum, u, s);
#else
  return _mm256_dpbusd_avx_epi32(sum, u, s);
#endif
}
#endif

// Sum of u8 x s8 products of each group of four bytes: 8 int32 lanes (lane i = bytes 4i .. 4i + 3).
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// Sums over each group of four bytes of u0 x s0 + u1 x s1 (u unsigned, s signed), 8 int32 lanes. The
// int16 sum of the two vpmaddubsw results stays below 2^15 when u <= 15 and |s| <= 127 (int4 x int8).
inline __m256i dot2_u4s8(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u0, s0), u1, s1);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u0, s0), u1, s1);
#else
  const __m256i sum = _mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1));
  return _mm256_madd_epi16(sum, _mm256_set1_epi16(1));
#endif
}

inline __m128i dot2_u4s8(__m128i u0, __m128i s0, __m128i u1, __m128i s1) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm_dpbusd_epi32(_mm_dpbusd_epi32(_mm_setzero_si128(), u0, s0), u1, s1);
#elif defined(__AVXVNNI__)
  return _mm_dpbusd_avx_epi32(_mm_dpbusd_avx_epi32(_mm_setzero_si128(), u0, s0), u1, s1);
#else
  return _mm_madd_epi16(_mm_add_epi16(_mm_maddubs_epi16(u0, s0), _mm_maddubs_epi16(u1, s1)), _mm_set1_epi16(1));
#endif
}

#endif  // NEMOLITE_AVX2

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t M, int64_t K, bool reference) {
  QuantizedRows rows;
  rows.M = M; rows.K = K; rows.KB = K / QK;
  rows.q.resize(M * K); rows.d.resize(M * rows.KB); rows.s.resize(M * rows.KB);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < rows.KB; ++b) {
      const T* block = x + m * K + b * QK;
      int8_t* q = rows.q.data() + (b * M + m) * QK;
      float* d = rows.d.data() + b * M + m;
      float* s = rows.s.data() + b * M + m;
#ifdef NEMOLITE_AVX2
      if (!reference) { quantize_block_avx2(block, q, d, s); continue; }
#endif
      quantize_block_scalar(block, q, d, s);
    }
  }
  return rows;
}

inline int32_t dot_scalar(const uint8_t* nibbles, const int8_t* x, int64_t half_begin, int64_t count) {
  // int4 block: column j < 16 is the low nibble of byte j, column j >= 16 the high nibble of byte j - 16
  int32_t sum = 0;
  for (int64_t j = half_begin; j < half_begin + count; ++j) {
    const int32_t v = j < 16 ? (nibbles[j] & 0x0F) : (nibbles[j - 16] >> 4);
    sum += v * x[j];
  }
  return sum;
}

// Scales of one weight row as floats (F16C converts eight fp16 at a time), once per row.
template <typename S>
inline void row_scales(const S* in, int64_t count, float* out) {
  int64_t i = 0;
#ifdef NEMOLITE_AVX2
  for (; i + 8 <= count; i += 8) _mm256_storeu_ps(out + i, load8(in + i));
#endif
  for (; i < count; ++i) out[i] = to_float(in[i]);
}

// ---- int4: w = s (q - 8) without mins, w = s q + min with them ---------------------------------
// sf / zf: the row's scales and zero terms (-8 s, or the min) as floats, one per group.

// The scalar path (reference, and CPUs without AVX2).
template <int R>
void int4_row(const uint8_t* w, const float* sf, const float* zf, int64_t KB, int64_t group_blocks,
              const QuantizedRows& x, int64_t m0, float* out) {
  float total[R] = {};
  for (int64_t b = 0; b < KB; ++b) {
    const float scale = sf[b / group_blocks];
    for (int r = 0; r < R; ++r) {
      const int32_t dot = dot_scalar(w + b * (QK / 2), x.block_q(b, m0 + r), 0, QK);
      total[r] += static_cast<float>(dot) * (scale * x.block_d(b, m0 + r));
    }
  }
  const int64_t groups = KB / group_blocks;
  for (int r = 0; r < R; ++r) {
    float offset = 0.f;
    for (int64_t g = 0; g < groups; ++g) offset += zf[g] * x.gs[(m0 + r) * groups + g];
    out[r] = total[r] + offset;
  }
}

#ifdef NEMOLITE_AVX2
inline __m128 load4_values(const float* v) { return _mm_loadu_ps(v); }
inline __m128 load4_values(const c10::Half* v) {
  return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(v)));
}

// The per-group values (scales or mins) of blocks b0 .. b0 + 7 of a row, one lane a block; b0 is a
// multiple of 8 and the row has at least b0 + 8 blocks.
template <typename S>
inline __m256 block_values8(const S* v, int64_t b0, int64_t group_blocks) {
  if (group_blocks == 1) return load8(v + b0);
  if (group_blocks % 8 == 0) return _mm256_set1_ps(to_float(v[b0 / group_blocks]));  // one group holds all 8
  if (group_blocks == 4) return _mm256_set_m128(_mm_set1_ps(to_float(v[b0 / 4 + 1])), _mm_set1_ps(to_float(v[b0 / 4])));
  if (group_blocks == 2)
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(load4_values(v + b0 / 2)),
                                    _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  alignas(32) float lanes[8];
  for (int i = 0; i < 8; ++i) lanes[i] = to_float(v[(b0 + i) / group_blocks]);
  return _mm256_load_ps(lanes);
}

// The SIMD int4 path, for each weight row in one pass with nothing computed per row beforehand:
// eight blocks (four pairs, QuantizedRows::pair_blocks) a step. Each pair is one 32-byte load of
// the packed weights: lanes 0-3 of its int32 sums belong to block 2p, 4-7 to block 2p + 1, scaled by
// weight scale x activation scale (one multiply per eight blocks, then a lane permute per pair). The
// zero point's term, zero value x activation block sum (zero = -8 s, or the min), is one more FMA
// per eight blocks into the same accumulators, which alternate so that one FMA does not wait for the last.
template <int R, typename S>
NEMOLITE_INLINE void int4_row_simd(const uint8_t* w, const S* scales, const S* mins, int64_t KB, int64_t group_blocks,
                   const QuantizedRows& x, int64_t m0, float* out) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const int64_t stride = x.M * 2 * QK;  // bytes from one pair of an activation row to its next
  const int8_t* xq0 = x.pairs.data() + m0 * 2 * QK;
  __m256 acc[2][R];
  for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
  auto step = [&](int64_t p, const __m256* c, __m256i lanes, __m256* sums) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p * QK));
    const __m256i lo = _mm256_and_si256(raw, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
    const int8_t* xq = xq0 + p * stride;
    for (int r = 0; r < R; ++r) {
      const __m256i* xr = reinterpret_cast<const __m256i*>(xq + r * 2 * QK);
      const __m256i dot = dot2_u4s8(lo, _mm256_loadu_si256(xr), hi, _mm256_loadu_si256(xr + 1));
      sums[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_permutevar8x32_ps(c[r], lanes), sums[r]);
    }
  };
  const __m256i lanes[4] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                            _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7)};
  const __m256 minus8 = _mm256_set1_ps(-8.f);
  __m256 c[R];
  int64_t b = 0;
  for (; b + 8 <= KB; b += 8) {
    _mm_prefetch(reinterpret_cast<const char*>(w + b * (QK / 2) + PREFETCH_BYTES), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + b * (QK / 2) + PREFETCH_BYTES + 64), _MM_HINT_T0);
    const __m256 s = block_values8(scales, b, group_blocks);
    const __m256 z = mins ? block_values8(mins, b, group_blocks) : _mm256_mul_ps(s, minus8);
    for (int r = 0; r < R; ++r) {
      const int64_t row = (m0 + r) * KB + b;
      c[r] = _mm256_mul_ps(s, _mm256_loadu_ps(x.dr.data() + row));
      acc[1][r] = _mm256_fmadd_ps(z, _mm256_loadu_ps(x.sr.data() + row), acc[1][r]);
    }
    step(b / 2, c, lanes[0], acc[0]);
    step(b / 2 + 1, c, lanes[1], acc[1]);
    step(b / 2 + 2, c, lanes[2], acc[0]);
    step(b / 2 + 3, c, lanes[3], acc[1]);
  }
  float tail[R] = {};
  if (b < KB) {  // 1 to 7 blocks left: their values in zero-padded lanes
    alignas(32) float sv[8] = {}, zv[8] = {}, dv[8] = {}, bv[8] = {};
    for (int64_t i = b; i < KB; ++i) {
      sv[i - b] = to_float(scales[i / group_blocks]);
      zv[i - b] = mins ? to_float(mins[i / group_blocks]) : -8.f * sv[i - b];
    }
    const int64_t pairs = (KB - b) / 2;
    for (int r = 0; r < R; ++r) {
      const int64_t row = (m0 + r) * KB;
      for (int64_t i = b; i < KB; ++i) { dv[i - b] = x.dr[row + i]; bv[i - b] = x.sr[row + i]; }
      c[r] = _mm256_mul_ps(_mm256_load_ps(sv), _mm256_load_ps(dv));
      acc[1][r] = _mm256_fmadd_ps(_mm256_load_ps(zv), _mm256_load_ps(bv), acc[1][r]);
      if ((KB - b) % 2) tail[r] = sv[KB - 1 - b] * dv[KB - 1 - b];  // the odd last block's scale product
    }
    for (int64_t i = 0; i < pairs; ++i) step(b / 2 + i, c, lanes[i], acc[i % 2]);
    if ((KB - b) % 2) {  // the odd last block alone, 16 bytes
      const int64_t last = KB - 1;
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + last * (QK / 2)));
      const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
      for (int r = 0; r < R; ++r) {
        const int8_t* xq = x.pair_q(last / 2, m0 + r);
        const __m128i dot = dot2_u4s8(lo, _mm_loadu_si128(reinterpret_cast<const __m128i*>(xq)), hi,
                                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + QK)));
        tail[r] *= static_cast<float>(hsum(dot));
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(acc[0][r], acc[1][r])) + tail[r];
}
#endif

// ---- int8: w = s q, one scale per `group` columns (16, a multiple of 32, or the whole row) -----
// sf: the row's scales as floats.

#ifdef NEMOLITE_AVX2
// The SIMD int8 row. Scales: one per row (kPerRow), per 16 columns (kGroup16, GGUF Q6_K's) or per
// 32 << block_shift columns; a template argument, so that a block does no test of the layout (with the
// tests the per-channel kernel ran at 18 GB/s where llama.cpp's Q8_0 streams 21).
enum Int8Scales { kPerRow, kGroup16, kGroup32 };

template <int R, Int8Scales Layout>
NEMOLITE_INLINE void int8_row_simd(const int8_t* w, const float* sf, int64_t KB, int block_shift,
                                   const QuantizedRows& x, int64_t m0, float* out) {
  // A accumulators per row taken in turn, so that a block's FMA need not wait for the last one's
  // (at one row the FMA latency, not the weight stream, bounded this loop)
  constexpr int A = R == 1 ? 4 : (R == 2 ? 2 : 1);
  __m256 acc[A][R];
  for (int a = 0; a < A; ++a)
    for (int r = 0; r < R; ++r) acc[a][r] = _mm256_setzero_ps();
  auto block = [&](int64_t b, __m256* sums) {
    if ((b & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + b * QK + PREFETCH_BYTES), _MM_HINT_T0);
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * QK));
    const __m256i magnitude = _mm256_sign_epi8(q, q);
    __m256 scale = _mm256_setzero_ps();
    if constexpr (Layout == kGroup16) {  // lanes 0-3 hold columns 0-15, lanes 4-7 columns 16-31
      scale = _mm256_set_m128(_mm_set1_ps(sf[2 * b + 1]), _mm_set1_ps(sf[2 * b]));
    } else if constexpr (Layout == kGroup32) {
      scale = _mm256_set1_ps(sf[b >> block_shift]);  // group = 32 << block_shift
    }
    for (int r = 0; r < R; ++r) {
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.block_q(b, m0 + r)));
      const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(magnitude, _mm256_sign_epi8(xq, q)));
      const __m256 d = _mm256_set1_ps(x.block_d(b, m0 + r));
      if constexpr (Layout == kPerRow) {
        sums[r] = _mm256_fmadd_ps(p, d, sums[r]);
      } else {
        sums[r] = _mm256_fmadd_ps(p, _mm256_mul_ps(scale, d), sums[r]);
      }
    }
  };
  int64_t b = 0;
  for (; b + A <= KB; b += A)
    for (int a = 0; a < A; ++a) block(b + a, acc[a]);
  for (; b < KB; ++b) block(b, acc[0]);
  for (int r = 0; r < R; ++r) {
    __m256 sum = acc[0][r];
    for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[a][r]);
    out[r] = Layout == kPerRow ? hsum(sum) * sf[0] : hsum(sum);
  }
}
#endif

template <int R>
void int8_row(const int8_t* w, const float* sf, int64_t K, int64_t group, const QuantizedRows& x,
              int64_t m0, bool reference, float* out) {
  const int64_t KB = K / QK;
  const bool per_row = group == K;
#ifdef NEMOLITE_AVX2
  int block_shift = 0;  // an int8 group of 32 << k columns (GGUF Q8_0: k = 0); others take the scalar path
  while ((QK << block_shift) < group) ++block_shift;
  if (!reference) {
    if (per_row) return int8_row_simd<R, kPerRow>(w, sf, KB, 0, x, m0, out);
    if (group == 16) return int8_row_simd<R, kGroup16>(w, sf, KB, 0, x, m0, out);
    if ((QK << block_shift) == group) return int8_row_simd<R, kGroup32>(w, sf, KB, block_shift, x, m0, out);
  }
#endif
  float total[R] = {};
  const int64_t step = group < QK ? group : QK;
  for (int64_t b = 0; b < KB; ++b) {
    for (int64_t begin = 0; begin < QK; begin += step) {
      const int64_t column = b * QK + begin;
      const float scale = per_row ? 1.f : sf[column / group];
      for (int r = 0; r < R; ++r) {
        const int8_t* xq = x.block_q(b, m0 + r) + begin;
        int32_t dot = 0;
        for (int64_t j = 0; j < step; ++j) dot += static_cast<int32_t>(w[column + j]) * xq[j];
        total[r] += static_cast<float>(dot) * (scale * x.block_d(b, m0 + r));
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = per_row ? total[r] * sf[0] : total[r];
}

// One weight row against R activation rows; R is a template argument so that accumulators stay in
// registers. scales / mins: the row's own (S: fp16 or fp32); sf / zf: the same as floats, filled by
// the caller for the paths that read them (int8, and the scalar int4 path: zf = -8 s or the min).
template <int R, typename S>
NEMOLITE_INLINE void weight_row(bool int4, const uint8_t* w, const S* scales, const S* mins, const float* sf, const float* zf,
                int64_t K, int64_t group, const QuantizedRows& x, int64_t m0, bool reference, float* out) {
  if (!int4) return int8_row<R>(reinterpret_cast<const int8_t*>(w), sf, K, group, x, m0, reference, out);
#ifdef NEMOLITE_AVX2
  if (!reference) return int4_row_simd<R>(w, scales, mins, K / QK, group / QK, x, m0, out);
#endif
  int4_row<R>(w, sf, zf, K / QK, group / QK, x, m0, out);
}

// True when the int4 SIMD path runs: it reads the scales as stored, with no float copy per row.
inline bool int4_simd(bool reference) {
#ifdef NEMOLITE_AVX2
  return !reference;
#else
  return false;
#endif
}

// Y [M, N] in the activations' dtype (fp32 sums rounded once, as a cast of the fp32 result would). Up to
// MAX_ROWS activation rows are one tile, chosen once per call: each thread's loop over its weight rows
// then runs one instantiation of the row kernel. More rows take the tiles in turn for each weight row
// (the row is read from memory once, then from cache).
template <typename S, typename T>
void quantized_matmul(bool int4, const uint8_t* W, int64_t row_bytes, const S* scales, const S* mins,
                      int64_t N, int64_t K, int64_t group, const QuantizedRows& x, bool reference, T* Y) {
  const int64_t groups = K / group;
  const bool float_scales = !int4 || !int4_simd(reference);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> sf(float_scales ? groups : 0), zf(float_scales && int4 ? groups : 0);
    auto prepare = [&](int64_t n) {  // the row's scales (and zero terms) as floats, for the paths that read them
      const S* s = scales + n * groups;
      row_scales(s, groups, sf.data());
      if (int4 && mins) {
        row_scales(mins + n * groups, groups, zf.data());
      } else if (int4) {
        for (int64_t g = 0; g < groups; ++g) zf[g] = -8.f * sf[g];
      }
    };
    // rows m0 .. m0 + R - 1 of x against weight rows [first, last)
    auto tile = [&](auto size, int64_t m0, int64_t first, int64_t last) {
      constexpr int R = decltype(size)::value;
      float out[R];
      for (int64_t n = first; n < last; ++n) {
        if (float_scales && m0 == 0) prepare(n);
        weight_row<R>(int4, W + n * row_bytes, scales + n * groups, mins ? mins + n * groups : nullptr, sf.data(),
                      zf.data(), K, group, x, m0, reference, out);
        for (int r = 0; r < R; ++r) Y[(m0 + r) * N + n] = static_cast<T>(out[r]);
      }
    };
    auto run_tile = [&](int64_t rows, int64_t m0, int64_t first, int64_t last) {
      switch (rows) {
        case 1: tile(std::integral_constant<int, 1>{}, m0, first, last); break;
        case 2: tile(std::integral_constant<int, 2>{}, m0, first, last); break;
        case 3: tile(std::integral_constant<int, 3>{}, m0, first, last); break;
        case 4: tile(std::integral_constant<int, 4>{}, m0, first, last); break;
        case 5: tile(std::integral_constant<int, 5>{}, m0, first, last); break;
        case 6: tile(std::integral_constant<int, 6>{}, m0, first, last); break;
        case 7: tile(std::integral_constant<int, 7>{}, m0, first, last); break;
        default: tile(std::integral_constant<int, 8>{}, m0, first, last); break;
      }
    };
    if (x.M <= MAX_ROWS) {
      run_tile(x.M, 0, begin, end);
      return;
    }
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m0 = 0; m0 < x.M; m0 += MAX_ROWS) run_tile(std::min<int64_t>(MAX_ROWS, x.M - m0), m0, n, n + 1);
  });
}

void check_layer(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                 const c10::optional<torch::Tensor>& mins, int64_t group, bool int4) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, "x must be fp32 or bf16");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous(), "qweight must be a contiguous 2-D tensor");
  const int64_t K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(K % QK == 0, "K must be a multiple of 32");
  TORCH_CHECK(qweight.size(1) == (int4 ? K / 2 : K), "qweight does not match K");
  TORCH_CHECK(group > 0 && K % group == 0, "group size must divide K");
  TORCH_CHECK(int4 ? group % QK == 0 : (group == 16 || group % QK == 0), "unsupported group size");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == K / group && scales.is_contiguous(),
              "scales must be [N, K / group]");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat || scales.scalar_type() == torch::kHalf, "scales must be fp32 or fp16");
  if (mins) {
    TORCH_CHECK(int4, "only int4 has mins");
    TORCH_CHECK(mins->sizes() == scales.sizes() && mins->scalar_type() == scales.scalar_type() && mins->is_contiguous(),
                "mins must match scales");
  }
}

// fn(scales, mins) with typed pointers: fp16 or fp32 scales, mins null when absent.
template <typename F>
void with_scales(const torch::Tensor& scales, const c10::optional<torch::Tensor>& mins, F&& fn) {
  if (scales.scalar_type() == torch::kHalf) {
    fn(scales.data_ptr<c10::Half>(), mins ? mins->data_ptr<c10::Half>() : static_cast<c10::Half*>(nullptr));
  } else {
    fn(scales.data_ptr<float>(), mins ? mins->data_ptr<float>() : static_cast<float*>(nullptr));
  }
}

torch::Tensor quantized_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                               c10::optional<torch::Tensor> mins, int64_t group, bool int4, bool reference) {
  check_layer(x, qweight, scales, mins, group, int4);
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  QuantizedRows rows = x.scalar_type() == torch::kFloat
      ? quantize_rows(x.data_ptr<float>(), M, K, reference)
      : quantize_rows(x.data_ptr<c10::BFloat16>(), M, K, reference);
  if (int4 && int4_simd(reference)) {
    rows.pair_blocks();
  } else if (int4) {
    rows.sum_groups(group / QK);
  }
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* W = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  const int64_t row_bytes = qweight.size(1);
  auto run = [&](auto* typed_scales, auto* typed_mins) {
    if (x.scalar_type() == torch::kFloat) {
      quantized_matmul(int4, W, row_bytes, typed_scales, typed_mins, N, K, group, rows, reference, y.data_ptr<float>());
    } else {
      quantized_matmul(int4, W, row_bytes, typed_scales, typed_mins, N, K, group, rows, reference,
                       y.data_ptr<c10::BFloat16>());
    }
  };
  with_scales(scales, mins, run);
  return y;
}

torch::Tensor linear_int8(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, int64_t group_size,
                          bool reference) {
  TORCH_CHECK(qweight.scalar_type() == torch::kChar, "int8 qweight must be int8");
  return quantized_linear(x, qweight, scales, c10::nullopt, group_size, false, reference);
}

torch::Tensor linear_int4(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                          c10::optional<torch::Tensor> mins, int64_t group_size, bool reference) {
  TORCH_CHECK(qweight.scalar_type() == torch::kByte, "int4 qweight must be uint8 (two values a byte)");
  return quantized_linear(x, qweight, scales, mins, group_size, true, reference);
}

// ---- dequantize: the float weight [N, K] ------------------------------------------------------

#ifdef NEMOLITE_AVX2
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {
  // round to nearest even, as c10::BFloat16's constructor does (the values here are finite)
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
#endif

// One int4 block (16 bytes: columns 0-15 in the low nibbles, 16-31 in the high ones) as 32 values
// q * scale + zero (zero = -8 scale or the min), each one rounding: q * scale is exact for fp16 scales
// and, with zero = -8 scale, the fused sum is (q - 8) * scale rounded once, as the torch dequantiser computes.
template <typename T>
inline void dequantize_block_int4(const uint8_t* nibbles, float scale, float zero, T* dst) {
#ifdef NEMOLITE_AVX2  // eight values a store
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(nibbles));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  const __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps(zero);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int i = 0; i < 4; ++i)
    store8(dst + 8 * i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), s, z));
#else
  for (int64_t j = 0; j < QK / 2; ++j) {
    dst[j] = static_cast<T>(static_cast<float>(nibbles[j] & 0x0F) * scale + zero);
    dst[j + QK / 2] = static_cast<T>(static_cast<float>(nibbles[j] >> 4) * scale + zero);
  }
#endif
}

template <typename S, typename T>
void dequantize_rows(bool int4, const uint8_t* W, int64_t row_bytes, const S* scales, const S* mins, int64_t N,
                     int64_t K, int64_t group, T* out) {
  const int64_t groups = K / group;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(int4 ? 0 : K);
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* w = W + n * row_bytes;
      const S* s = scales + n * groups;
      if (int4) {  // straight into the output row
        const S* z = mins ? mins + n * groups : nullptr;
        for (int64_t b = 0, per_group = group / QK; b < K / QK; ++b) {
          const float scale = to_float(s[b / per_group]);
          dequantize_block_int4(w + b * (QK / 2), scale, z ? to_float(z[b / per_group]) : -8.f * scale,
                                out + n * K + b * QK);
        }
        continue;
      }
      const int8_t* q = reinterpret_cast<const int8_t*>(w);
      for (int64_t g = 0; g < groups; ++g) {
        const float scale = to_float(s[g]);
        for (int64_t k = g * group; k < (g + 1) * group; ++k) row[k] = static_cast<float>(q[k]) * scale;
      }
      T* dst = out + n * K;
      for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<T>(row[k]);
    }
  });
}

torch::Tensor dequantize(torch::Tensor qweight, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                         int64_t group_size, bool int4, bool to_bf16) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && scales.is_contiguous(), "contiguous 2-D tensors only");
  TORCH_CHECK(qweight.scalar_type() == (int4 ? torch::kByte : torch::kChar), "qweight dtype does not match");
  const int64_t N = qweight.size(0), K = int4 ? qweight.size(1) * 2 : qweight.size(1);
  TORCH_CHECK(group_size > 0 && K % group_size == 0 && scales.size(0) == N && scales.size(1) == K / group_size,
              "scales must be [N, K / group]");
  TORCH_CHECK(!int4 || (K % QK == 0 && group_size % QK == 0), "int4 needs K and the group a multiple of 32");
  TORCH_CHECK(!mins || (mins->sizes() == scales.sizes() && mins->scalar_type() == scales.scalar_type()),
              "mins must match scales");
  auto out = torch::empty({N, K}, qweight.options().dtype(to_bf16 ? torch::kBFloat16 : torch::kFloat));
  const uint8_t* W = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  auto run = [&](auto* typed_scales, auto* typed_mins) {
    if (to_bf16) {
      dequantize_rows(int4, W, qweight.size(1), typed_scales, typed_mins, N, K, group_size,
                      out.data_ptr<c10::BFloat16>());
    } else {
      dequantize_rows(int4, W, qweight.size(1), typed_scales, typed_mins, N, K, group_size, out.data_ptr<float>());
    }
  };
  with_scales(scales, mins, run);
  return out;
}

// ---- int4, weight rows interleaved by eights (QuantizedLinear.interleave_rows) --------------------
// The row-major int4 kernel above spends most of its instructions per row and block (a convert, a lane
// permute and an FMA for every 32 bytes of weights): at one activation row it was bound by them, not by
// memory (the bench model's int4 layers at 22 GB/s where Tensor.sum reads 38). Eight rows side by side
// let one instruction serve all eight: per block of 32 columns of rows 8g .. 8g + 7 the 128 bytes are
// four 32-byte chunks, chunk c holding bytes 4c .. 4c + 3 of each row's 16 (lane i = row 8g + i: columns
// 4c .. 4c + 3 in the low nibbles, 16 + 4c .. 16 + 4c + 3 in the high ones). Each chunk is unpacked once
// for every activation row, multiplied with that row's four activation bytes broadcast to all lanes, and
// the chunks' int16 sums add up in int16 (4 chunks x 2 x 2 x 15 x 127 = 30480 < 2^15); one multiply-add
// then gives the eight rows' int32 dot products of the block, and one convert and two FMAs scale them.
// qweight [N / 8, K / 32, 4, 8, 4] bytes, scales and mins [N / 8, groups, 8] (as [N, K / 2], [N, groups]).
#ifdef NEMOLITE_AVX2
inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// sum += lo x xl + hi x xh over each group of four bytes (u4 x s8). With VNNI the sums are int32 lanes
// (vpdpbusd); with AVX2 they are int16 pairs (vpmaddubsw), made int32 by ``rows8_dot`` once per block.
inline __m256i rows8_accumulate(__m256i sum, __m256i lo, __m256i xl, __m256i hi, __m256i xh) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(sum, lo, xl), hi, xh);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(sum, lo, xl), hi, xh);
#else
  return _mm256_add_epi16(sum, _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)));
#endif
}

inline __m256 rows8_dot(__m256i sum) {
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
  return _mm256_cvtepi32_ps(sum);
#else
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(sum, _mm256_set1_epi16(1)));
#endif
}

constexpr int ROWS8_TILE = 4;  // activation rows a pass: their int16 and float sums stay in registers

// out[r] (lane i: weight row 8g + i) for activation rows m0 .. m0 + R - 1 against one group of 8 rows.
template <int R, bool Mins, typename S>
NEMOLITE_INLINE void int4_rows8(const uint8_t* w, const S* scales, const S* mins, int64_t KB, int64_t group_blocks,
                                const QuantizedRows& x, int64_t m0, __m256* out) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  constexpr int A = R == 1 ? 2 : 1;  // at one row two accumulators, so that a block's FMAs need not wait
  __m256 acc[A][R];
  for (int a = 0; a < A; ++a)
    for (int r = 0; r < R; ++r) acc[a][r] = _mm256_setzero_ps();
  int64_t group = 0, left = group_blocks;
  for (int64_t b = 0; b < KB; ++b) {
    const uint8_t* block = w + b * 128;
    _mm_prefetch(reinterpret_cast<const char*>(block + PREFETCH_BYTES), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(block + PREFETCH_BYTES + 64), _MM_HINT_T0);
    __m256i sums[R];
    for (int r = 0; r < R; ++r) sums[r] = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * c));
      const __m256i lo = _mm256_and_si256(raw, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
      for (int r = 0; r < R; ++r) {
        const int8_t* xq = x.block_q(b, m0 + r);
        sums[r] = rows8_accumulate(sums[r], lo, broadcast4(xq + 4 * c), hi, broadcast4(xq + 16 + 4 * c));
      }
    }
    const __m256 scale = load8(scales + group * 8);
    const __m256 zero = Mins ? load8(mins + group * 8) : _mm256_setzero_ps();
    __m256* sum = acc[A == 2 ? (b & 1) : 0];
    for (int r = 0; r < R; ++r) {
      const __m256 dot = rows8_dot(sums[r]);
      const float d = x.block_d(b, m0 + r), block_sum = x.block_s(b, m0 + r);
      if constexpr (Mins) {  // s q d + min d sum(q)
        sum[r] = _mm256_fmadd_ps(_mm256_mul_ps(dot, _mm256_set1_ps(d)), scale, sum[r]);
        sum[r] = _mm256_fmadd_ps(zero, _mm256_set1_ps(block_sum), sum[r]);
      } else {  // s (q d - 8 d sum(q))
        sum[r] = _mm256_fmadd_ps(_mm256_fmadd_ps(dot, _mm256_set1_ps(d), _mm256_set1_ps(-8.f * block_sum)), scale, sum[r]);
      }
    }
    if (--left == 0) { ++group; left = group_blocks; }
  }
  for (int r = 0; r < R; ++r) out[r] = A == 2 ? _mm256_add_ps(acc[0][r], acc[A - 1][r]) : acc[0][r];
}

#ifdef NEMOLITE_VNNI
// int8 rows interleaved by eights, the int4 layout's twin: per block of 32 columns of rows 8g .. 8g + 7 the
// 256 bytes are eight 32-byte chunks, chunk c holding bytes 4c .. 4c + 3 of each row (lane i = row 8g + i).
// vpdpbusd takes an unsigned operand: each chunk is flipped to w + 128 once (xor 0x80) for every activation
// row, whose four bytes are broadcast to all lanes; one instruction then adds 32 products for eight rows.
// The + 128 adds 128 x the block's activation sum, taken off with the activation scale: a block costs one
// convert and one or two FMAs for all eight rows (the row-major kernel paid a sign, a convert and an FMA
// per row). Scales: one per row (PerRow: applied once at the end) or per group of 32 << k columns,
// [N / 8, groups, 8] like int4's. qweight [N / 8, K / 32, 8, 8, 4] bytes (as [N, K]).
template <int R, bool PerRow, typename S>
NEMOLITE_INLINE void int8_rows8(const int8_t* w, const S* scales, int64_t KB, int64_t group_blocks,
                                const QuantizedRows& x, int64_t m0, __m256* out) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t group = 0, left = group_blocks;
  for (int64_t b = 0; b < KB; ++b) {
    const int8_t* block = w + b * 256;
    for (int line = 0; line < 256; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(block + PREFETCH_BYTES + line), _MM_HINT_T0);
    // at one activation row two int32 chains (even and odd chunks): eight dependent vpdpbusd bound that loop
    constexpr int C = R == 1 ? 2 : 1;
    __m256i sums[C][R];
    for (int k = 0; k < C; ++k)
      for (int r = 0; r < R; ++r) sums[k][r] = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i u = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * c)), flip);
      for (int r = 0; r < R; ++r)
        sums[c % C][r] = dpbusd(sums[c % C][r], u, broadcast4(x.block_q(b, m0 + r) + 4 * c));
    }
    if constexpr (C == 2) sums[0][0] = _mm256_add_epi32(sums[0][0], sums[1][0]);
    if constexpr (PerRow) {  // sum over blocks of d q x; the 128 d sum(q) terms come off at the end
      for (int r = 0; r < R; ++r)
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[0][r]), _mm256_set1_ps(x.block_d(b, m0 + r)), acc[r]);
    } else {  // s (q d - 128 d sum(q))
      const __m256 scale = load8(scales + group * 8);
      for (int r = 0; r < R; ++r) {
        const __m256 dot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[0][r]), _mm256_set1_ps(x.block_d(b, m0 + r)),
                                           _mm256_set1_ps(-128.f * x.block_s(b, m0 + r)));
        acc[r] = _mm256_fmadd_ps(dot, scale, acc[r]);
      }
      if (--left == 0) { ++group; left = group_blocks; }
    }
  }
  if constexpr (PerRow) {
    const __m256 scale = load8(scales);
    for (int r = 0; r < R; ++r)
      out[r] = _mm256_mul_ps(_mm256_sub_ps(acc[r], _mm256_set1_ps(128.f * x.gs[m0 + r])), scale);
  } else {
    for (int r = 0; r < R; ++r) out[r] = acc[r];
  }
}
#endif

// Y [M, N] for rows interleaved by eights (int4, or int8 where the CPU has VNNI): each thread takes groups
// of eight weight rows and runs every tile of activation rows against a group while it is in cache.
template <bool Int8, typename S, typename T>
void rows8_matmul(const uint8_t* W, const S* scales, const S* mins, int64_t N, int64_t K, int64_t group,
                  const QuantizedRows& x, T* Y) {
  const int64_t KB = K / QK, groups = K / group, group_blocks = group / QK;
  const int64_t group_bytes = KB * (Int8 ? 256 : 128);
  at::parallel_for(0, N / 8, 2, [&](int64_t begin, int64_t end) {
    auto tile = [&](auto size, int64_t g, int64_t m0) {
      constexpr int R = decltype(size)::value;
      __m256 out[R];
      const S* z = mins ? mins + g * groups * 8 : nullptr;
      const S* s = scales + g * groups * 8;
#ifdef NEMOLITE_VNNI
      if constexpr (Int8) {
        const int8_t* w = reinterpret_cast<const int8_t*>(W + g * group_bytes);
        if (groups == 1) int8_rows8<R, true>(w, s, KB, group_blocks, x, m0, out);
        else int8_rows8<R, false>(w, s, KB, group_blocks, x, m0, out);
      } else
#endif
      if (z) int4_rows8<R, true>(W + g * group_bytes, s, z, KB, group_blocks, x, m0, out);
      else int4_rows8<R, false>(W + g * group_bytes, s, z, KB, group_blocks, x, m0, out);
      for (int r = 0; r < R; ++r) store8(Y + (m0 + r) * N + g * 8, out[r]);
    };
    for (int64_t g = begin; g < end; ++g)  // the group's weights stay in cache for every tile of rows
      for (int64_t m0 = 0; m0 < x.M; m0 += ROWS8_TILE) {
        switch (std::min<int64_t>(ROWS8_TILE, x.M - m0)) {
          case 1: tile(std::integral_constant<int, 1>{}, g, m0); break;
          case 2: tile(std::integral_constant<int, 2>{}, g, m0); break;
          case 3: tile(std::integral_constant<int, 3>{}, g, m0); break;
          default: tile(std::integral_constant<int, 4>{}, g, m0); break;
        }
      }
  });
}

torch::Tensor linear_int4_rows8(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                                c10::optional<torch::Tensor> mins, int64_t group_size) {
  TORCH_CHECK(qweight.scalar_type() == torch::kByte, "int4 qweight must be uint8 (two values a byte)");
  check_layer(x, qweight, scales, mins, group_size, true);
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(N % 8 == 0, "rows interleaved by eights need a multiple of 8 rows");
  QuantizedRows rows = x.scalar_type() == torch::kFloat ? quantize_rows(x.data_ptr<float>(), M, K, false)
                                                         : quantize_rows(x.data_ptr<c10::BFloat16>(), M, K, false);
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* W = qweight.data_ptr<uint8_t>();
  with_scales(scales, mins, [&](auto* typed_scales, auto* typed_mins) {
    if (x.scalar_type() == torch::kFloat) {
      rows8_matmul<false>(W, typed_scales, typed_mins, N, K, group_size, rows, y.data_ptr<float>());
    } else {
      rows8_matmul<false>(W, typed_scales, typed_mins, N, K, group_size, rows, y.data_ptr<c10::BFloat16>());
    }
  });
  return y;
}
#endif

#ifdef NEMOLITE_VNNI
torch::Tensor linear_int8_rows8(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, int64_t group_size) {
  TORCH_CHECK(qweight.scalar_type() == torch::kChar, "int8 qweight must be int8");
  check_layer(x, qweight, scales, c10::nullopt, group_size, false);
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(N % 8 == 0 && group_size % QK == 0, "int8 rows interleaved by eights need a multiple of 8 rows "
              "and groups of whole blocks");
  QuantizedRows rows = x.scalar_type() == torch::kFloat ? quantize_rows(x.data_ptr<float>(), M, K, false)
                                                         : quantize_rows(x.data_ptr<c10::BFloat16>(), M, K, false);
  if (group_size == K) rows.sum_groups(K / QK);  // the per-row kernel takes each row's 128 d sum(q) at the end
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* W = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  with_scales(scales, c10::nullopt, [&](auto* typed_scales, auto* typed_mins) {
    if (x.scalar_type() == torch::kFloat) {
      rows8_matmul<true>(W, typed_scales, typed_mins, N, K, group_size, rows, y.data_ptr<float>());
    } else {
      rows8_matmul<true>(W, typed_scales, typed_mins, N, K, group_size, rows, y.data_ptr<c10::BFloat16>());
    }
  });
  return y;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(nemolite, m) {
  m.def("linear_int8(Tensor x, Tensor qweight, Tensor scales, int group_size, bool reference=False) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, int group_size, bool reference=False) "
        "-> Tensor");
  m.def("dequantize(Tensor qweight, Tensor scales, Tensor? mins, int group_size, bool int4, bool to_bf16) -> Tensor");
#ifdef NEMOLITE_AVX2
  m.def("linear_int4_rows8(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, int group_size) -> Tensor");
#endif
#ifdef NEMOLITE_VNNI
  m.def("linear_int8_rows8(Tensor x, Tensor qweight, Tensor scales, int group_size) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(nemolite, CPU, m) {
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("dequantize", &dequantize);
#ifdef NEMOLITE_AVX2
  m.impl("linear_int4_rows8", &linear_int4_rows8);
#endif
#ifdef NEMOLITE_VNNI
  m.impl("linear_int8_rows8", &linear_int8_rows8);
#endif
}
