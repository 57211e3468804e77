// Decode attention for CPU: one query token per head over a KV cache, grouped-query heads as rows, only the
// attended cache positions. Part of the losa_sparse_kernels extension (built with sparse_linear.cpp), exposed
// as the dispatcher op <extension>::decode_attn; its fake (shape) function is registered from Python
// (losa/inference/kernel.py) and losa/inference/attention.py calls it.
//
// For batch b, KV head h and query row g (one of the G query heads that share KV head h):
//   s_j = scale · q[b,h,g,:] · K[b,h,j,:]           for every cache position j with mask[b,j] (all j without a mask)
//   out[b,h,g,:] = Σ_j softmax(s)_j · V[b,h,j,:]     (0 when no position is attended, as sdpa; NaN when a score
//                                                      is NaN, as sdpa)
// (Vaswani et al. 2017, eq. 1; GQA as Ainslie et al. 2023). float32 or bfloat16 q, k, v (all the same);
// scores, probabilities and sums in float32, bf16 values widened exactly; the output rounded once to the
// inputs' dtype (torch's SDPA rounds the exponentiated scores to bf16 before P·V: this is at least as accurate).
//
// Why not two torch matmuls: a decode step's products are tiny (G x D times D x S per KV head) and the BLAS
// call per product costs more than its arithmetic; a static cache also multiplies every unused slot. Here a
// masked position costs a byte test. Measurements: benchmarks/bench_decode.py, results/decode.md.
//
// The vector paths (head sizes that are multiples of 8 for AVX2; of 16 for AVX-512F, where other multiples of 8
// take the AVX2 loop: decode_attention_blocked.h, compiled once per width) are blocked: the attended positions are
// listed once, scores are computed four positions at a time for two query rows (each key load widened once, feeding
// both rows), the softmax numerators by a vectorised exp, and P·V keeps four vectors of outputs of two rows in
// registers. Both products go over the positions a block at a time (at most 16 KiB of key or value rows) with every
// query row pair and output chunk inside the block, so a KV head's cache streams from memory once per call. It
// replaced a loop of one dot product and one axpy per (row, position) (results/engine_regression.md, the rows with
// cached positions; the 16-lane loop: the rows of 2026-12-04). Splitting bf16 loads into even / odd elements (one
// load and two integer operations per 16 values) gained little in an uncommitted lab run and was not kept.
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

// The sum of a's 8 lanes.
LOSA_ATTN_AVX2 inline float hsum8(__m256 a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
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
  float s = hsum8(_mm256_add_ps(s0, s1));
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

// exp of the scores minus their maximum: losa::exp8_nonpositive (losa_kernels.h; 16 lanes as two halves); the few
// scores past the last whole vector use std::exp. (NaN lanes are not passed on: softmax_numerators sends rows with
// any NaN elsewhere.)
using losa::exp8_nonpositive;

// Positions ahead whose key / value rows are prefetched: the cache streams from memory (each position is read
// once per step), and with the hardware prefetcher alone a one-query-row lab copy of this loop read it at
// 0.62-0.79x the speed of a plain vector read of the same bytes; 16 positions of software prefetch: 1.16-1.48x
// (results/attention_lab.md), 8: 1.12-1.31x; in the engine, results/engine_regression.md.
constexpr int64_t kPrefetch = 16;

template <typename T>
inline void prefetch_row(const T* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < d * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

template <bool AVX2, typename T>
void attend_rows(const float* q, const T* k, const T* v, const bool* keep, int64_t G, int64_t S, int64_t D,
                 int64_t Dv, float scale, float* out, float* sc);

// Positions per block of the blocked loop: a block's key (or value) rows, at most kBlockBytes, come from memory
// once, for the first query row pair (and, in P·V, its first column chunk), and from L1 for the others; a multiple
// of 4 (the scores' pass), at least 4.
constexpr int64_t kBlockBytes = 16 << 10;
inline int64_t block_positions(int64_t row_bytes) {
  return std::max<int64_t>(4, kBlockBytes / std::max<int64_t>(1, row_bytes) / 4 * 4);
}


// The lane operations the blocked loop (decode_attention_blocked.h) is written against, for each vector width.
// AVX2: 8 float32 lanes, AVX2+FMA only.
struct Vec8 {
  using V = __m256;
  using Flag = __m256;
  static constexpr int W = 8;
  LOSA_ATTN_AVX2 static V zero() { return _mm256_setzero_ps(); }
  LOSA_ATTN_AVX2 static V set1(float f) { return _mm256_set1_ps(f); }
  LOSA_ATTN_AVX2 static V load(const float* p) { return _mm256_loadu_ps(p); }
  LOSA_ATTN_AVX2 static V load(const uint16_t* p) { return load8(p); }
  LOSA_ATTN_AVX2 static void storef(float* p, V a) { _mm256_storeu_ps(p, a); }
  LOSA_ATTN_AVX2 static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  LOSA_ATTN_AVX2 static V add(V a, V b) { return _mm256_add_ps(a, b); }
  LOSA_ATTN_AVX2 static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  LOSA_ATTN_AVX2 static V max(V a, V b) { return _mm256_max_ps(a, b); }
  LOSA_ATTN_AVX2 static V exp_nonpositive(V x) { return exp8_nonpositive(x); }
  LOSA_ATTN_AVX2 static Flag no_nan() { return _mm256_setzero_ps(); }
  LOSA_ATTN_AVX2 static Flag nan_seen(Flag f, V x) { return _mm256_or_ps(f, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)); }
  LOSA_ATTN_AVX2 static bool any(Flag f) { return _mm256_movemask_ps(f) != 0; }
  LOSA_ATTN_AVX2 static float hsum(V a) { return hsum8(a); }
  LOSA_ATTN_AVX2 static float hmax(V a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  LOSA_ATTN_AVX2 static __m128 sums4(V a0, V a1, V a2, V a3) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  }
};

#define LOSA_ATTN_AVX512 __attribute__((target("avx512f,avx2,fma")))

// AVX-512F: 16 float32 lanes (the same arithmetic per lane; sums reduced in another order than Vec8's).
struct Vec16 {
  using V = __m512;
  using Flag = __mmask16;
  static constexpr int W = 16;
  LOSA_ATTN_AVX512 static V zero() { return _mm512_setzero_ps(); }
  LOSA_ATTN_AVX512 static V set1(float f) { return _mm512_set1_ps(f); }
  LOSA_ATTN_AVX512 static V load(const float* p) { return _mm512_loadu_ps(p); }
  LOSA_ATTN_AVX512 static V load(const uint16_t* p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  LOSA_ATTN_AVX512 static void storef(float* p, V a) { _mm512_storeu_ps(p, a); }
  LOSA_ATTN_AVX512 static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  LOSA_ATTN_AVX512 static V add(V a, V b) { return _mm512_add_ps(a, b); }
  LOSA_ATTN_AVX512 static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  LOSA_ATTN_AVX512 static V max(V a, V b) { return _mm512_max_ps(a, b); }
  // lanes 8..15 of a
  LOSA_ATTN_AVX512 static __m256 upper(V a) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)); }
  // the two halves through the AVX2 exp (the softmax is a small part of the step)
  LOSA_ATTN_AVX512 static V exp_nonpositive(V x) {
    const __m256 lo = exp8_nonpositive(_mm512_castps512_ps256(x)), hi = exp8_nonpositive(upper(x));
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
  }
  LOSA_ATTN_AVX512 static Flag no_nan() { return 0; }
  LOSA_ATTN_AVX512 static Flag nan_seen(Flag f, V x) { return f | _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q); }
  LOSA_ATTN_AVX512 static bool any(Flag f) { return f != 0; }
  LOSA_ATTN_AVX512 static __m256 halves(V a) { return _mm256_add_ps(_mm512_castps512_ps256(a), upper(a)); }
  LOSA_ATTN_AVX512 static float hsum(V a) { return hsum8(halves(a)); }
  LOSA_ATTN_AVX512 static float hmax(V a) { return _mm512_reduce_max_ps(a); }
  LOSA_ATTN_AVX512 static __m128 sums4(V a0, V a1, V a2, V a3) {
    return Vec8::sums4(halves(a0), halves(a1), halves(a2), halves(a3));
  }
};

// The blocked loop twice: attn_avx2::attend_blocked (8 lanes, compiled for AVX2+FMA only: what
// LOSA_SPARSE_ISA=avx2 and AVX2-only CPUs run; tests/test_inference_kernel.py checks its code has no AVX-512
// instruction) and attn_avx512::attend_blocked (16 lanes, AVX-512F), each under its own target pragma.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace attn_avx2 {
using Vec = Vec8;
#include "decode_attention_blocked.h"
}  // namespace attn_avx2
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#endif
namespace attn_avx512 {
using Vec = Vec16;
#include "decode_attention_blocked.h"
}  // namespace attn_avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
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

// The plain loop: per query row, one dot product per position, then one axpy per position (out zeroed first).
template <bool AVX2, typename T>
void attend_rows(const float* q, const T* k, const T* v, const bool* keep, int64_t G, int64_t S, int64_t D,
                 int64_t Dv, float scale, float* out, float* sc) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    float* og = out + g * Dv;
    float mx = kNegInf;
    bool nan = false;
    for (int64_t j = 0; j < S; ++j) {
      if (keep && !keep[j]) {
        sc[j] = kNegInf;
        continue;
      }
      const float s = dot<AVX2>(qg, k + j * D, D) * scale;
      sc[j] = s;
      mx = s > mx ? s : mx;
      nan = nan || std::isnan(s);
    }
    if (nan) {  // a NaN score makes the row NaN, as in SDPA (also when every score is NaN and mx never moved)
      std::fill(og, og + Dv, std::numeric_limits<float>::quiet_NaN());
      continue;
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

// One (batch, KV head): G query rows [G, D] against keys [S, D] and values [S, Dv]; out [G, Dv] (zeroed).
// keep: S bytes (nonzero = attend) or nullptr; ix: the n positions keep sets, in order (nullptr and n = S without
// keep). sc: scratch of losa::attend_scratch(S, G) floats. LEVEL (losa::attention_level): 2 the 16-lane blocked loop
// where D and Dv are multiples of 16, 1 (or 2 otherwise) the 8-lane one where they are multiples of 8, else the
// plain loop (AVX2 dot products and axpys from level 1, scalar at 0).
template <int LEVEL, typename T>
void attend(const float* q, const T* k, const T* v, const bool* keep, const int32_t* ix, int64_t n, int64_t G,
            int64_t S, int64_t D, int64_t Dv, float scale, float* out, float* sc) {
#if LOSA_ATTN_X86
  if constexpr (LEVEL >= 2)
    if (D % 16 == 0 && Dv % 16 == 0)
      return attn_avx512::attend_blocked(q, k, v, keep, ix, n, G, S, D, Dv, scale, out, sc);
  if constexpr (LEVEL >= 1)
    if (D % 8 == 0 && Dv % 8 == 0) return attn_avx2::attend_blocked(q, k, v, keep, ix, n, G, S, D, Dv, scale, out, sc);
#endif
  (void)ix;
  (void)n;
  attend_rows<(LEVEL >= 1), T>(q, k, v, keep, G, S, D, Dv, scale, out, sc);
}

// attend<LEVEL, T> for a run-time level
template <typename T>
auto attend_at(int level) {
  return level >= 2 ? attend<2, T> : level == 1 ? attend<1, T> : attend<0, T>;
}

// q [B, H, G, D], k [B, H, S, D], v [B, H, S, Dv], all float32 or all bfloat16; mask None or bool [B, S];
// isa: the kernel's level (0 scalar, 1 AVX2+FMA, 2 AVX-512; losa::attention_level). Returns [B, H, G, Dv] in the
// dtype of q.
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
  std::vector<int32_t> pos;  // per batch row, the attended positions in order (listed once for all its heads)
  std::vector<int64_t> count;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->dim() == 2 && mask->size(0) == B && mask->size(1) == S,
                "decode_attn: the mask must be bool [B, S]");
    mc = mask->contiguous();
    keep = mc.data_ptr<bool>();
    pos.resize(static_cast<size_t>(B * S));
    count.assign(static_cast<size_t>(B), 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < S; ++j)
        if (keep[b * S + j]) pos[b * S + count[b]++] = static_cast<int32_t>(j);
  }
  auto out = torch::zeros({B, H, G, Dv}, q.options().dtype(torch::kFloat));
  const int level = losa::attention_level(isa);
  const float* qp = qc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto all_heads = [&](auto* kp, auto* vp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
    const auto run = attend_at<T>(level);
    // (batch, KV head) pairs over torch's threads, each chunk at least 1 << 18 multiply-adds (counted over all
    // S slots, attended or not), so that a small model's few heads stay on one thread
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, G * S * (D + Dv)));
    at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> sc(static_cast<size_t>(losa::attend_scratch(S, G)));
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H;
        run(qp + bh * G * D, kp + bh * S * D, vp + bh * S * Dv, keep ? keep + b * S : nullptr,
            keep ? pos.data() + b * S : nullptr, keep ? count[b] : S, G, S, D, Dv, float(scale), op + bh * G * Dv,
            sc.data());
      }
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
                float* out, float* scratch, int level) {
  std::fill(out, out + G * D, 0.f);
  attend_at<float>(level)(q, k, v, nullptr, nullptr, S, G, S, D, D, scale, out, scratch);
}

void attend_bf16(const float* q, const uint16_t* k, const uint16_t* v, int64_t G, int64_t S, int64_t D, float scale,
                 float* out, float* scratch, int level) {
  std::fill(out, out + G * D, 0.f);
  attend_at<uint16_t>(level)(q, k, v, nullptr, nullptr, S, G, S, D, D, scale, out, scratch);
}

int attention_level(int64_t isa) {
#if LOSA_ATTN_X86
  if (isa >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return 2;
  if (isa >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  (void)isa;
  return 0;
}

bool attention_avx2(int64_t isa) { return attention_level(isa) >= 1; }

}  // namespace losa

TORCH_LIBRARY_FRAGMENT(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attn(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, int isa) -> Tensor");
}
TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) { m.impl("decode_attn", &decode_attn); }
