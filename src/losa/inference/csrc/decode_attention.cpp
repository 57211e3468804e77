// Decode attention for CPU: one query token per head over a KV cache, grouped-query heads as rows, only the
// attended cache positions. Part of the losa_sparse_kernels extension (built with sparse_linear.cpp), exposed
// as the dispatcher op <extension>::decode_attn; its fake (shape) function is registered from Python
// (losa/inference/kernel.py) and losa/inference/attention.py calls it.
//
// For batch b, KV head h and query row g (one of the G query heads that share KV head h):
//   s_j = scale · q[b,h,g,:] · K[b,h,j,:]           for every cache position j with mask[b,j] (all j without a mask)
//   out[b,h,g,:] = Σ_j softmax(s)_j · V[b,h,j,:]     (0 when no position is attended, as sdpa's nan_to_num)
// (Vaswani et al. 2017, eq. 1; GQA as Ainslie et al. 2023). float32 or bfloat16 q, k, v (all the same);
// scores, probabilities and sums in float32, bf16 values widened exactly; the output rounded once to the
// inputs' dtype (torch's SDPA rounds the exponentiated scores to bf16 before P·V: this is at least as accurate).
//
// Why not two torch matmuls: a decode step's products are tiny (G x D times D x S per KV head) and the BLAS
// call per product costs more than its arithmetic; a static cache also multiplies every unused slot. Here a
// masked position costs a byte test. Measurements: benchmarks/bench_decode.py, results/decode.md.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

#include "losa_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOSA_ATTN_X86 1
#else
#define LOSA_ATTN_X86 0
#endif

namespace {

// bf16 values are stored as their upper 16 bits (uint16_t); widening is exact
inline float widen(float x) { return x; }
inline float widen(uint16_t h) { return losa::bf16_to_float(h); }

template <typename T>
inline float dot_scalar(const float* a, const T* b, int64_t d) {
  float s = 0.f;
  for (int64_t i = 0; i < d; ++i) s += a[i] * widen(b[i]);
  return s;
}

template <typename T>
inline void axpy_scalar(float a, const T* x, float* y, int64_t d) {
  for (int64_t i = 0; i < d; ++i) y[i] += a * widen(x[i]);
}

#if LOSA_ATTN_X86
#define LOSA_ATTN_AVX2 __attribute__((target("avx2,fma")))

// 8 float32 lanes from 8 float32 or 8 bf16 values (bf16: zero-extend to 32 bits, shift into the upper half)
LOSA_ATTN_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
LOSA_ATTN_AVX2 inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

template <typename T>
LOSA_ATTN_AVX2 float dot_avx2(const float* a, const T* b, int64_t d) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), s1);
  }
  for (; i + 8 <= d; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), s0);
  s0 = _mm256_add_ps(s0, s1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float s = _mm_cvtss_f32(h);
  for (; i < d; ++i) s += a[i] * widen(b[i]);
  return s;
}

template <typename T>
LOSA_ATTN_AVX2 void axpy_avx2(float a, const T* x, float* y, int64_t d) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, load8(x + i), _mm256_loadu_ps(y + i)));
  for (; i < d; ++i) y[i] += a * widen(x[i]);
}
#endif

// The dot product / axpy of the chosen ISA (AVX2 = true: AVX2+FMA; the scalar loops elsewhere).
template <bool AVX2, typename T>
inline float dot(const float* a, const T* b, int64_t d) {
#if LOSA_ATTN_X86
  if constexpr (AVX2) return dot_avx2(a, b, d);
#endif
  return dot_scalar(a, b, d);
}

template <bool AVX2, typename T>
inline void axpy(float a, const T* x, float* y, int64_t d) {
#if LOSA_ATTN_X86
  if constexpr (AVX2) return axpy_avx2(a, x, y, d);
#endif
  axpy_scalar(a, x, y, d);
}

// One (batch, KV head): G query rows [G, D] against keys [S, D] and values [S, Dv]; out [G, Dv] (zeroed).
// keep: S bytes (nonzero = attend) or nullptr. sc: scratch of S floats.
template <bool AVX2, typename T>
void attend(const float* q, const T* k, const T* v, const bool* keep, int64_t G, int64_t S, int64_t D,
            int64_t Dv, float scale, float* out, float* sc) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    float* og = out + g * Dv;
    float mx = kNegInf;
    for (int64_t j = 0; j < S; ++j) {
      if (keep && !keep[j]) {
        sc[j] = kNegInf;
        continue;
      }
      const float s = dot<AVX2>(qg, k + j * D, D) * scale;
      sc[j] = s;
      mx = s > mx ? s : mx;
    }
    if (mx == kNegInf) continue;  // nothing attended (or every score -inf): the row stays 0
    float sum = 0.f;
    for (int64_t j = 0; j < S; ++j) {
      if (sc[j] == kNegInf) continue;
      const float e = std::exp(sc[j] - mx);
      sum += e;
      axpy<AVX2>(e, v + j * Dv, og, Dv);
    }
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < Dv; ++i) og[i] *= inv;
  }
}

// q [B, H, G, D], k [B, H, S, D], v [B, H, S, Dv], all float32 or all bfloat16; mask None or bool [B, S];
// isa 0 scalar, >= 1 AVX2+FMA. Returns [B, H, G, Dv] in the dtype of q.
torch::Tensor decode_attn(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                          const c10::optional<torch::Tensor>& mask, double scale, int64_t isa) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attn: q, k, v must be 4-D");
  const auto dt = q.scalar_type();
  TORCH_CHECK((dt == torch::kFloat || dt == torch::kBFloat16) && k.scalar_type() == dt && v.scalar_type() == dt,
              "decode_attn: q, k, v must all be float32 or all bfloat16");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_attn: CPU tensors only");
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), S = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(1) == H && v.size(1) == H && k.size(3) == D &&
                  v.size(2) == S, "decode_attn: shapes of q, k, v do not match");
  const auto qc = q.to(torch::kFloat).contiguous(), kc = k.contiguous(), vc = v.contiguous();
  torch::Tensor mc;
  const bool* keep = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->dim() == 2 && mask->size(0) == B && mask->size(1) == S,
                "decode_attn: the mask must be bool [B, S]");
    mc = mask->contiguous();
    keep = mc.data_ptr<bool>();
  }
  auto out = torch::zeros({B, H, G, Dv}, q.options().dtype(torch::kFloat));
  const bool avx2 = losa::attention_avx2(isa);
  const float* qp = qc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto all_heads = [&](auto* kp, auto* vp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
    const auto run = avx2 ? attend<true, T> : attend<false, T>;
    // (batch, KV head) pairs over torch's threads, each chunk at least 1 << 18 multiply-adds (counted over all
    // S slots, attended or not), so that a small model's few heads stay on one thread
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, G * S * (D + Dv)));
    at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> sc(static_cast<size_t>(S));
      for (int64_t bh = begin; bh < end; ++bh)
        run(qp + bh * G * D, kp + bh * S * D, vp + bh * S * Dv, keep ? keep + (bh / H) * S : nullptr, G, S, D, Dv,
            float(scale), op + bh * G * Dv, sc.data());
    });
  };
  if (dt == torch::kFloat) {
    all_heads(kc.data_ptr<float>(), vc.data_ptr<float>());
    return out;
  }
  all_heads(reinterpret_cast<const uint16_t*>(kc.data_ptr<at::BFloat16>()),
            reinterpret_cast<const uint16_t*>(vc.data_ptr<at::BFloat16>()));
  return out.to(dt);  // one rounding, to nearest even
}

}  // namespace

namespace losa {

void attend_f32(const float* q, const float* k, const float* v, int64_t G, int64_t S, int64_t D, float scale,
                float* out, float* scratch, bool avx2) {
  std::fill(out, out + G * D, 0.f);
  if (avx2) attend<true, float>(q, k, v, nullptr, G, S, D, D, scale, out, scratch);
  else attend<false, float>(q, k, v, nullptr, G, S, D, D, scale, out, scratch);
}

void attend_bf16(const float* q, const uint16_t* k, const uint16_t* v, int64_t G, int64_t S, int64_t D, float scale,
                 float* out, float* scratch, bool avx2) {
  std::fill(out, out + G * D, 0.f);
  if (avx2) attend<true, uint16_t>(q, k, v, nullptr, G, S, D, D, scale, out, scratch);
  else attend<false, uint16_t>(q, k, v, nullptr, G, S, D, D, scale, out, scratch);
}

bool attention_avx2(int64_t isa) {
#if LOSA_ATTN_X86
  return isa >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  (void)isa;
  return false;
#endif
}

}  // namespace losa

TORCH_LIBRARY_FRAGMENT(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attn(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, int isa) -> Tensor");
}
TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) { m.impl("decode_attn", &decode_attn); }
