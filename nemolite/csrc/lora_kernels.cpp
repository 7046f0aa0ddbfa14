// LoRA for a batch of rows each with its own adapter slot (decode): y[n] = B_s (A_s x[n]) for s = slots[n],
// the punica "bgmv" shape on the CPU. Each row reads only its own slot's A and B, so the work is one
// adapter's per row; the dense alternative (every slot for every row, the others' columns masked off)
// multiplied S x (S slots) more, and for a fused q/k/v layer P x more again (B block-diagonal over its parts).
// Built with the other kernels (nemolite/model/cpu_kernels.py, -march=native); AVX2 + FMA or nothing.
#include <torch/extension.h>

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // a bf16 is the top half of an fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
#endif

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {  // rounded to nearest even, as a bf16 cast does
  __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

constexpr int TILE = 4;  // rows of one slot sharing each load of A and of B

// x [N, K], slots [N] (0: none, else 1..S), A [S, W, K], BT [S, W, M] (B transposed), parts: the P + 1 row
// boundaries of the fused layer's parts; part p's rows take A's and BT's rows [p R, p R + R), R = W / P.
// Rows are grouped by slot and taken TILE at a time: each A row and each 8 columns of a BT row loaded once
// for the tile. Every row's sums run in the same order whatever else is in the batch.
template <typename T>
void bgmv(const T* X, const int64_t* slots, const T* A, const T* BT, const std::vector<int64_t>& parts,
          int64_t N, int64_t K, int64_t S, int64_t W, int64_t M, T* Y) {
  const int64_t P = static_cast<int64_t>(parts.size()) - 1, R = W / P;
  std::vector<std::vector<int64_t>> tiles;  // rows of one slot, at most TILE
  for (int64_t s = 1; s <= S; ++s) {
    std::vector<int64_t> rows;
    for (int64_t n = 0; n < N; ++n)
      if (slots[n] == s) rows.push_back(n);
    for (size_t i = 0; i < rows.size(); i += TILE)
      tiles.emplace_back(rows.begin() + i, rows.begin() + std::min(rows.size(), i + TILE));
  }
  std::vector<float> shrunk(N * W, 0.f), widened;
  const float* xf = reinterpret_cast<const float*>(X);
  if constexpr (!std::is_same_v<T, float>) {
    widened.resize(N * K);
    for (int64_t i = 0; i < N * K; ++i) widened[i] = static_cast<float>(X[i]);
    xf = widened.data();
  }
  const int64_t T_ = static_cast<int64_t>(tiles.size());
  at::parallel_for(0, T_ * W, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const std::vector<int64_t>& rows = tiles[i / W];
      const int64_t w = i % W, count = static_cast<int64_t>(rows.size());
      const T* a = A + ((slots[rows[0]] - 1) * W + w) * K;
      float sums[TILE] = {};
      int64_t k = 0;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {  // vdpbf16ps: 32 products an instruction, no widening
        __m512 acc[TILE];
        for (int j = 0; j < TILE; ++j) acc[j] = _mm512_setzero_ps();
        for (; k + 32 <= K; k += 32) {
          const __m512bh av = (__m512bh)_mm512_loadu_si512(a + k);
          for (int64_t j = 0; j < count; ++j)
            acc[j] = _mm512_dpbf16_ps(acc[j], av, (__m512bh)_mm512_loadu_si512(X + rows[j] * K + k));
        }
        for (int64_t j = 0; j < count; ++j) sums[j] = _mm512_reduce_add_ps(acc[j]);
      }
#endif
      if (k == 0) {  // fp32, or bf16 without AVX512-BF16: x widened once (xf), A 8 values at a time
        __m256 acc[TILE];
        for (int j = 0; j < TILE; ++j) acc[j] = _mm256_setzero_ps();
        for (; k + 8 <= K; k += 8) {
          const __m256 av = load8(a + k);
          for (int64_t j = 0; j < count; ++j) acc[j] = _mm256_fmadd_ps(av, _mm256_loadu_ps(xf + rows[j] * K + k), acc[j]);
        }
        for (int64_t j = 0; j < count; ++j) sums[j] = hsum(acc[j]);
      }
      for (int64_t j = 0; j < count; ++j) {
        for (int64_t kk = k; kk < K; ++kk) sums[j] += static_cast<float>(a[kk]) * xf[rows[j] * K + kk];
        shrunk[rows[j] * W + w] = sums[j];
      }
    }
  });
  at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = 0; n < N; ++n)
      if (slots[n] == 0) std::fill(Y + n * M + begin, Y + n * M + end, static_cast<T>(0.f));
    for (int64_t p = 0; p < P; ++p) {
      const int64_t lo = std::max(begin, parts[p]), hi = std::min(end, parts[p + 1]);
      for (const std::vector<int64_t>& rows : tiles) {
        const int64_t count = static_cast<int64_t>(rows.size());
        const T* bt = BT + (slots[rows[0]] - 1) * W * M;
        int64_t o = lo;
#ifdef __AVX512F__
        for (; o + 16 <= hi; o += 16) {  // 16 outputs a vector
          __m512 acc[TILE];
          for (int j = 0; j < TILE; ++j) acc[j] = _mm512_setzero_ps();
          for (int64_t w = p * R; w < p * R + R; ++w) {
            const __m512 b = load16(bt + w * M + o);
            for (int64_t j = 0; j < count; ++j)
              acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(shrunk[rows[j] * W + w]), b, acc[j]);
          }
          for (int64_t j = 0; j < count; ++j) {
            store8(Y + rows[j] * M + o, _mm512_castps512_ps256(acc[j]));
            store8(Y + rows[j] * M + o + 8, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[j]), 1)));
          }
        }
#endif
        for (; o + 8 <= hi; o += 8) {
          __m256 acc[TILE];
          for (int j = 0; j < TILE; ++j) acc[j] = _mm256_setzero_ps();
          for (int64_t w = p * R; w < p * R + R; ++w) {
            const __m256 b = load8(bt + w * M + o);
            for (int64_t j = 0; j < count; ++j)
              acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(shrunk[rows[j] * W + w]), b, acc[j]);
          }
          for (int64_t j = 0; j < count; ++j) store8(Y + rows[j] * M + o, acc[j]);
        }
        for (; o < hi; ++o)
          for (int64_t j = 0; j < count; ++j) {
            float sum = 0.f;
            for (int64_t w = p * R; w < p * R + R; ++w)
              sum += shrunk[rows[j] * W + w] * static_cast<float>(bt[w * M + o]);
            Y[rows[j] * M + o] = static_cast<T>(sum);
          }
      }
    }
  });
}

torch::Tensor lora_bgmv(torch::Tensor x, torch::Tensor slots, torch::Tensor lora_a, torch::Tensor lora_bt,
                        std::vector<int64_t> parts) {
  TORCH_CHECK(x.dim() == 2 && lora_a.dim() == 3 && lora_bt.dim() == 3 && slots.dim() == 1, "lora_bgmv: shapes");
  TORCH_CHECK(x.scalar_type() == lora_a.scalar_type() && x.scalar_type() == lora_bt.scalar_type() &&
              (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16), "lora_bgmv: fp32 or bf16");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.size(0) == x.size(0), "lora_bgmv: one slot a row");
  x = x.contiguous();
  lora_a = lora_a.contiguous();
  lora_bt = lora_bt.contiguous();
  slots = slots.contiguous();
  const int64_t N = x.size(0), K = x.size(1), S = lora_a.size(0), W = lora_a.size(1), M = lora_bt.size(2);
  TORCH_CHECK(lora_a.size(2) == K && lora_bt.size(0) == S && lora_bt.size(1) == W, "lora_bgmv: A and B disagree");
  TORCH_CHECK(parts.size() >= 2 && parts.front() == 0 && parts.back() == M && W % (parts.size() - 1) == 0,
              "lora_bgmv: parts must split the output rows, and W the parts");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(slot[n] >= 0 && slot[n] <= S, "lora_bgmv: slot out of range");
  auto y = torch::empty({N, M}, x.options());
  if (x.scalar_type() == torch::kFloat) {
    bgmv(x.data_ptr<float>(), slot, lora_a.data_ptr<float>(), lora_bt.data_ptr<float>(), parts, N, K, S, W, M,
         y.data_ptr<float>());
  } else {
    bgmv(x.data_ptr<c10::BFloat16>(), slot, lora_a.data_ptr<c10::BFloat16>(), lora_bt.data_ptr<c10::BFloat16>(),
         parts, N, K, S, W, M, y.data_ptr<c10::BFloat16>());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nemolite, m) {
  m.def("lora_bgmv(Tensor x, Tensor slots, Tensor lora_a, Tensor lora_bt, int[] parts) -> Tensor");
}
TORCH_LIBRARY_IMPL(nemolite, CPU, m) {
  m.impl("lora_bgmv", &lora_bgmv);
}
#endif  // AVX2 + FMA
