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
// The AVX2 path (head sizes that are multiples of 8; also what AVX-512 CPUs run) is blocked: the attended
// positions are listed once, scores are computed four positions at a time for two query rows (each key load
// widened once, feeding both rows), the softmax numerators by a vectorised exp, and P·V keeps 32 outputs of two
// rows in registers. Both products go over the positions a block at a time (at most 16 KiB of key or value rows)
// with every query row pair and output chunk inside the block, so a KV head's cache streams from memory once per
// call. It replaced a loop of one dot product and one axpy per (row, position)
// (results/engine_regression.md, the rows with cached positions). Splitting bf16 loads into even / odd elements
// (one load and two integer operations per 16 values) gained little in an uncommitted lab run and was not kept.
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

// exp of the scores minus their maximum: losa::exp8_nonpositive (losa_kernels.h); the few scores past the last 8
// use std::exp. (NaN lanes are not passed on: softmax_numerators sends rows with any NaN elsewhere.)
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

// The four sums of a0..a3's lanes, in order.
LOSA_ATTN_AVX2 inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Scores of GN (1 or 2) query rows q [GN, D] (D a multiple of 8) against the keys of positions pos(i), i in
// [i0, i1): s[g][i] = scale · q[g] · k[pos(i)]. Four positions per pass share each q load, and each key load (widened
// once) feeds the GN rows: 4·GN independent accumulators, reduced once per pass. pf: prefetch the keys kPrefetch
// positions ahead (up to n, the last position + 1), for the call that reads this range first.
template <int GN, typename T, typename Pos>
LOSA_ATTN_AVX2 void scores_avx2(const float* q, const T* k, int64_t D, int64_t i0, int64_t i1, int64_t n, bool pf,
                                Pos pos, float scale, float* s0, float* s1) {
  float* out[2] = {s0, s1};
  const __m128 sc4 = _mm_set1_ps(scale);
  int64_t i = i0;
  for (; i + 4 <= i1; i += 4) {
    if (pf && i + kPrefetch + 4 <= n)
      for (int p = 0; p < 4; ++p) prefetch_row(k + pos(i + kPrefetch + p) * D, D);
    const T* kr[4] = {k + pos(i) * D, k + pos(i + 1) * D, k + pos(i + 2) * D, k + pos(i + 3) * D};
    __m256 acc[GN][4];
    for (int g = 0; g < GN; ++g)
      for (int p = 0; p < 4; ++p) acc[g][p] = _mm256_setzero_ps();
    for (int64_t c = 0; c < D; c += 8) {
      __m256 qv[GN];
      for (int g = 0; g < GN; ++g) qv[g] = _mm256_loadu_ps(q + g * D + c);
      for (int p = 0; p < 4; ++p) {
        const __m256 kv = load8(kr[p] + c);
        for (int g = 0; g < GN; ++g) acc[g][p] = _mm256_fmadd_ps(qv[g], kv, acc[g][p]);
      }
    }
    for (int g = 0; g < GN; ++g)
      _mm_storeu_ps(out[g] + i, _mm_mul_ps(hsum4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]), sc4));
  }
  for (; i < i1; ++i)
    for (int g = 0; g < GN; ++g) out[g][i] = dot_avx2(q + g * D, k + pos(i) * D, D) * scale;
}

// s[0:n] <- exp(s - max s) in place; returns the sum (n >= 1), 0 when every score is -inf (nothing to attend),
// or -1 (s unchanged) when a score is NaN or +inf: the caller then runs the plain loop, which passes those on as
// torch does.
LOSA_ATTN_AVX2 inline float softmax_numerators(float* s, int64_t n) {
  __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(s + i);
    mv = _mm256_max_ps(mv, x);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  float mx = _mm_cvtss_f32(m4);
  bool bad = _mm256_movemask_ps(nan) != 0;
  for (; i < n; ++i) {
    mx = s[i] > mx ? s[i] : mx;
    bad = bad || std::isnan(s[i]);
  }
  if (bad || mx == std::numeric_limits<float>::infinity()) return -1.f;
  if (mx == -std::numeric_limits<float>::infinity()) return 0.f;  // every score -inf: nothing attended
  const __m256 mxv = _mm256_set1_ps(mx);
  __m256 sum = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + i), mxv));
    _mm256_storeu_ps(s + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = hsum8(sum);
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - mx);
    total += s[i];
  }
  return total;
}

// out[g][c:c+8·NV] += Σ_{i in [i0, i1)} p[g][i] · v[pos(i)][c:c+8·NV] for GN rows: 8·NV outputs per row in
// registers over the range (one load and store of them per call), each value load (widened once) feeding the GN
// rows. pf: prefetch whole value rows kPrefetch positions ahead (up to n), for the call that reads the range first.
template <int GN, int NV, typename T, typename Pos>
LOSA_ATTN_AVX2 void pv_avx2(const float* const* p, const T* v, int64_t Dv, int64_t c, int64_t i0, int64_t i1,
                            int64_t n, bool pf, Pos pos, float* const* out) {
  __m256 acc[GN][NV];
  for (int g = 0; g < GN; ++g)
    for (int t = 0; t < NV; ++t) acc[g][t] = _mm256_loadu_ps(out[g] + c + 8 * t);
  for (int64_t i = i0; i < i1; ++i) {
    if (pf && i + kPrefetch < n) prefetch_row(v + pos(i + kPrefetch) * Dv, Dv);
    const T* vr = v + pos(i) * Dv + c;
    __m256 w[GN];
    for (int g = 0; g < GN; ++g) w[g] = _mm256_broadcast_ss(p[g] + i);
    for (int t = 0; t < NV; ++t) {
      const __m256 vv = load8(vr + 8 * t);
      for (int g = 0; g < GN; ++g) acc[g][t] = _mm256_fmadd_ps(w[g], vv, acc[g][t]);
    }
  }
  for (int g = 0; g < GN; ++g)
    for (int t = 0; t < NV; ++t) _mm256_storeu_ps(out[g] + c + 8 * t, acc[g][t]);
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

// attend() for AVX2 with D and Dv multiples of 8: query rows in pairs, scores of four positions per pass, a
// vectorised softmax, and P·V with the outputs in registers; both products go over the positions a block at a
// time with every row pair inside the block, so that each KV head's keys and values stream from memory once per
// call whatever the number of query rows (G) and the head size. scratch: losa::attend_scratch(S, G) floats (a
// score row per query row). A row with a NaN or +inf score goes through attend_rows (the plain loop), which passes
// them on. With a mask (keep), ix lists the n attended positions in order (the batch row's, listed once for all
// its heads); without, n = S. out [G, Dv] must be zero on entry.
template <typename T>
LOSA_ATTN_AVX2 void attend_blocked(const float* q, const T* k, const T* v, const bool* keep, const int32_t* ix,
                                   int64_t n, int64_t G, int64_t S, int64_t D, int64_t Dv, float scale, float* out,
                                   float* scratch) {
  if (n == 0) return;  // nothing attended: the rows stay 0
  const int64_t bk = block_positions(D * static_cast<int64_t>(sizeof(T)));
  const int64_t bv = block_positions(Dv * static_cast<int64_t>(sizeof(T)));
  std::vector<float> inv(static_cast<size_t>(G), 0.f);
  std::vector<char> plain(static_cast<size_t>(G), 0);
  auto run = [&](auto pos) {
    // scores of every row (row g in scratch + g S)
    for (int64_t i0 = 0; i0 < n; i0 += bk) {
      const int64_t i1 = std::min(n, i0 + bk);
      for (int64_t g0 = 0; g0 < G; g0 += 2) {
        float* s0 = scratch + g0 * S;
        if (G - g0 >= 2) scores_avx2<2>(q + g0 * D, k, D, i0, i1, n, g0 == 0, pos, scale, s0, s0 + S);
        else scores_avx2<1>(q + g0 * D, k, D, i0, i1, n, g0 == 0, pos, scale, s0, s0);
      }
    }
    bool any = false;
    for (int64_t g = 0; g < G; ++g) {
      float* sg = scratch + g * S;
      const float sum = softmax_numerators(sg, n);
      plain[g] = sum < 0.f;
      if (sum > 0.f) {
        inv[g] = 1.f / sum;
        any = true;
      } else {
        std::fill(sg, sg + n, 0.f);  // every score -inf (the row stays 0), or left to the plain loop
      }
    }
    if (any) {
      for (int64_t i0 = 0; i0 < n; i0 += bv) {
        const int64_t i1 = std::min(n, i0 + bv);
        for (int64_t g0 = 0; g0 < G; g0 += 2) {
          const bool two = G - g0 >= 2;
          const float* pp[2] = {scratch + g0 * S, scratch + (two ? g0 + 1 : g0) * S};
          float* o[2] = {out + g0 * Dv, out + (two ? g0 + 1 : g0) * Dv};
          int64_t c = 0;
          for (; c + 32 <= Dv; c += 32) {
            const bool pf = g0 == 0 && c == 0;
            if (two) pv_avx2<2, 4>(pp, v, Dv, c, i0, i1, n, pf, pos, o);
            else pv_avx2<1, 4>(pp, v, Dv, c, i0, i1, n, pf, pos, o);
          }
          for (; c < Dv; c += 8) {
            const bool pf = g0 == 0 && c == 0;
            if (two) pv_avx2<2, 1>(pp, v, Dv, c, i0, i1, n, pf, pos, o);
            else pv_avx2<1, 1>(pp, v, Dv, c, i0, i1, n, pf, pos, o);
          }
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < Dv; ++c) out[g * Dv + c] *= inv[g];
    }
    for (int64_t g = 0; g < G; ++g)
      if (plain[g]) {
        std::fill(out + g * Dv, out + (g + 1) * Dv, 0.f);
        attend_rows<true, T>(q + g * D, k, v, keep, 1, S, D, Dv, scale, out + g * Dv, scratch + g * S);
      }
  };
  if (keep) run([ix](int64_t i) { return static_cast<int64_t>(ix[i]); });
  else run([](int64_t i) { return i; });
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
// keep). sc: scratch of losa::attend_scratch(S, G) floats. The blocked AVX2 loop where it applies, else the plain one.
template <bool AVX2, typename T>
void attend(const float* q, const T* k, const T* v, const bool* keep, const int32_t* ix, int64_t n, int64_t G,
            int64_t S, int64_t D, int64_t Dv, float scale, float* out, float* sc) {
#if LOSA_ATTN_X86
  if constexpr (AVX2)
    if (D % 8 == 0 && Dv % 8 == 0) return attend_blocked(q, k, v, keep, ix, n, G, S, D, Dv, scale, out, sc);
#endif
  (void)ix;
  (void)n;
  attend_rows<AVX2, T>(q, k, v, keep, G, S, D, Dv, scale, out, sc);
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
                float* out, float* scratch, bool avx2) {
  std::fill(out, out + G * D, 0.f);
  if (avx2) attend<true, float>(q, k, v, nullptr, nullptr, S, G, S, D, D, scale, out, scratch);
  else attend<false, float>(q, k, v, nullptr, nullptr, S, G, S, D, D, scale, out, scratch);
}

void attend_bf16(const float* q, const uint16_t* k, const uint16_t* v, int64_t G, int64_t S, int64_t D, float scale,
                 float* out, float* scratch, bool avx2) {
  std::fill(out, out + G * D, 0.f);
  if (avx2) attend<true, uint16_t>(q, k, v, nullptr, nullptr, S, G, S, D, D, scale, out, scratch);
  else attend<false, uint16_t>(q, k, v, nullptr, nullptr, S, G, S, D, D, scale, out, scratch);
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
