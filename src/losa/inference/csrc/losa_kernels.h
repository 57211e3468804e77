// Entry points shared between the sources of the losa_sparse_kernels extension (sparse_linear.cpp,
// decode_attention.cpp, decode_engine.cpp): the decode engine calls the sparse row loop and the decode
// attention directly, without a tensor round trip or a dispatcher call per layer.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOSA_SIMD_X86 1
#define LOSA_SIMD_AVX2 __attribute__((target("avx2,fma")))
#else
#define LOSA_SIMD_X86 0
#endif

namespace losa {

// A bf16 value (its 16 bits: the upper half of a float32) widened to float32, exactly.
inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// y[o0:o1] = W[o0:o1] · x (+ bias) for one input row: x is float32 [K32] (K rounded up to 32, zero padded), y
// float32 [N]; only output rows o0 <= o < o1 are computed, on the calling thread (callers split rows over
// threads, e.g. inside at::parallel_for). The callable keeps the packed tensors alive.
using GemvCall = std::function<void(const float* x, float* y, int64_t o0, int64_t o1)>;

// The row loop of the packed weight (layout: sparse_linear.cpp) at ISA level `isa` (0 scalar, 1 AVX2,
// 2 AVX-512); checks the layout like spmm does.
GemvCall prepare_gemv(const torch::Tensor& meta, const torch::Tensor& values, const torch::Tensor& row_ptr,
                      const c10::optional<torch::Tensor>& bias, int64_t n, int64_t k, int64_t fmt, int64_t isa);

// The same with bf16 inputs (raw bf16 bits, [K32], zero padded): the AVX512-BF16 loop (bf16 products, float32
// sums). An empty callable where it does not run (float32 values, another ISA, no AVX512-BF16).
using GemvCallBf16 = std::function<void(const uint16_t* x, float* y, int64_t o0, int64_t o1)>;
GemvCallBf16 prepare_gemv_bf16(const torch::Tensor& meta, const torch::Tensor& values, const torch::Tensor& row_ptr,
                               const c10::optional<torch::Tensor>& bias, int64_t n, int64_t k, int64_t fmt,
                               int64_t isa);

// A dense bf16 weight [N, K] (contiguous, read in place) times bf16 inputs x [>= K] (raw bits): the AVX512-BF16
// loop (bf16 products, float32 sums). An empty callable where it does not run (another ISA, no AVX512-BF16).
GemvCallBf16 prepare_dense_gemv_bf16(const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                                     int64_t isa);

// A dense bf16 weight [N, K] (contiguous, read in place) times float32 inputs x [>= K]: each weight widened
// exactly, float32 products and sums, at ISA level `isa` (AVX-512, AVX2 or the scalar loop; never empty).
GemvCall prepare_dense_gemv_f32x(const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias, int64_t isa);

// Decode attention of one KV head, float32: G query rows q [G, D] over the first S cached positions of
// k [S, D] and v [S, D]; out [G, D] is overwritten. scratch holds attend_scratch(S, G) floats. level: the loops of
// attention_level (0 scalar, 1 AVX2+FMA, 2 AVX-512F).
inline int64_t attend_scratch(int64_t S, int64_t G) { return std::max<int64_t>(G, 2) * S; }
void attend_f32(const float* q, const float* k, const float* v, int64_t G, int64_t S, int64_t D, float scale,
                float* out, float* scratch, int level);

// The same over a bf16 cache (raw bf16 bits k [S, D], v [S, D]; widened exactly, float32 arithmetic).
void attend_bf16(const float* q, const uint16_t* k, const uint16_t* v, int64_t G, int64_t S, int64_t D, float scale,
                 float* out, float* scratch, int level);

// The attention loops that run at the kernel's ISA level `isa` on this CPU: 2 the AVX-512F loops (head sizes that
// are multiples of 16), 1 the AVX2+FMA loops, 0 the scalar ones.
int attention_level(int64_t isa);
// Whether the AVX2+FMA loops (SiLU's) may run at ISA level `isa` on this CPU (attention_level >= 1).
bool attention_avx2(int64_t isa);

// A zero-filled CPU tensor in transparent-huge-page memory where the OS gives it (Linux, >= 2 MiB; see
// hugepage_copy in sparse_linear.cpp), else torch::zeros: for buffers read like weights, e.g. the KV cache.
torch::Tensor hugepage_zeros(at::IntArrayRef sizes, at::ScalarType dtype);

// SiLU of one value in torch's form, x / (1 + exp(-x)): the scalar path and the vector path's tail.
inline float silu1(float x) { return x / (1.f + std::exp(-x)); }

#if LOSA_SIMD_X86
// exp(x) for 8 lanes of x <= 0: Cody-Waite reduction x = n ln2 + r and Cephes' degree-6 polynomial for exp(r)
// (Moshier, Cephes expf; within 2 ulp of the exact value), times 2^n built in the exponent bits. Lanes below -80
// (exp < 1.9e-35, and -inf) are exactly 0, so no result is subnormal and 2^n stays in range. A NaN lane gives
// exp(-80) (callers that must pass NaN on do so themselves). Used by the decode attention's softmax and SiLU.
LOSA_SIMD_AVX2 inline __m256 exp8_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-80.f);
  const __m256 dead = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(dead, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

// SiLU of 8 lanes: x · sigmoid(x) (Elfwing et al. 2018) with t = exp(-|x|) <= 1, sigmoid(x) = 1 / (1 + t) for
// x >= 0 and t / (1 + t) below (no overflow for any x; one IEEE division). A NaN lane stays NaN; +inf gives
// +inf and -inf NaN, as x / (1 + exp(-x)) does in torch.
LOSA_SIMD_AVX2 inline __m256 silu8(__m256 x) {
  const __m256 t = exp8_nonpositive(_mm256_or_ps(x, _mm256_set1_ps(-0.f)));  // -|x|
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 num = _mm256_blendv_ps(t, one, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ));
  return _mm256_mul_ps(x, _mm256_div_ps(num, _mm256_add_ps(one, t)));
}

LOSA_SIMD_AVX2 inline void silu_avx2(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, silu8(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) x[i] = silu1(x[i]);
}
#endif

// x[0:n] <- SiLU(x) = x / (1 + exp(-x)) in place; avx2: 8 lanes at a time (silu8: within 4 ulp of the exact
// value, except that x < -80, whose SiLU is below 1e-33 in magnitude, gives -0), else the scalar form with
// std::exp.
inline void silu_inplace(float* x, int64_t n, bool avx2) {
#if LOSA_SIMD_X86
  if (avx2) return silu_avx2(x, n);
#endif
  (void)avx2;
  for (int64_t i = 0; i < n; ++i) x[i] = silu1(x[i]);
}

// Registers the DecodeEngine class (decode_engine.cpp) on the extension's Python module.
void register_decode_engine(pybind11::module& m);

}  // namespace losa
