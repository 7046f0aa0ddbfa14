// LoRA for a batch of rows each with its own adapter slot (decode): y[n] = B_s (A_s x[n]) for s = slots[n],
// the punica "bgmv" shape on the CPU. Each row reads only its own slot's A and B, so the work is one
// adapter's per row; the dense alternative (every slot for every row, the others' columns masked off)
// multiplied S x (S slots) more, and for a fused q/k/v layer P x more again (B block-diagonal over its parts).
// Built with the other kernels (nemolite/model/cpu_kernels.py, -march=native); AVX2 + FMA or nothing.
#include <torch/extension.h>

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <vector>

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // a bf16 is the top half of an fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// sum_k a[k] b[k] in fp32, two accumulators, any n.
template <typename T>
inline float dot(const T* a, const T* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    s0 = _mm256_fmadd_ps(load8(a + k), load8(b + k), s0);
    s1 = _mm256_fmadd_ps(load8(a + k + 8), load8(b + k + 8), s1);
  }
  for (; k + 8 <= n; k += 8) s0 = _mm256_fmadd_ps(load8(a + k), load8(b + k), s0);
  float sum = hsum(_mm256_add_ps(s0, s1));
  for (; k < n; ++k) sum += static_cast<float>(a[k]) * static_cast<float>(b[k]);
  return sum;
}

// y[0:n] += u * b[0:n] (b in T, y fp32)
template <typename T>
inline void axpy(float u, const T* b, float* y, int64_t n) {
  const __m256 scale = _mm256_set1_ps(u);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(scale, load8(b + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += u * static_cast<float>(b[i]);
}

// x [N, K], slots [N] (0: none, else 1..S), A [S, W, K], BT [S, W, M] (B transposed), parts: the P + 1 row
// boundaries of the fused layer's parts; part p's rows take A's and BT's rows [p R, p R + R), R = W / P.
template <typename T>
void bgmv(const T* X, const int64_t* slots, const T* A, const T* BT, const std::vector<int64_t>& parts,
          int64_t N, int64_t K, int64_t S, int64_t W, int64_t M, T* Y) {
  const int64_t P = static_cast<int64_t>(parts.size()) - 1, R = W / P;
  std::vector<float> shrunk(N * W, 0.f);
  at::parallel_for(0, N * W, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / W, w = i % W, s = slots[n];
      if (s > 0) shrunk[i] = dot(A + ((s - 1) * W + w) * K, X + n * K, K);
    }
  });
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(M);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(row.begin(), row.end(), 0.f);
      const int64_t s = slots[n];
      if (s > 0) {
        for (int64_t p = 0; p < P; ++p)
          for (int64_t w = p * R; w < p * R + R; ++w)
            axpy(shrunk[n * W + w], BT + ((s - 1) * W + w) * M + parts[p], row.data() + parts[p],
                 parts[p + 1] - parts[p]);
      }
      for (int64_t m = 0; m < M; ++m) Y[n * M + m] = static_cast<T>(row[m]);
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
