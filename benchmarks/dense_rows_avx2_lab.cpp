// Lab: the AVX2 dense bf16 row loop with float32 inputs (dense_rows_f32x_avx2 in
// src/losa/inference/csrc/sparse_linear.cpp: a float32 model's bf16 LM head copy on a CPU without AVX512-BF16)
// against a plain vectorised read of the same bytes, on SmolLM2's LM head shape (49152 x 576 bf16, 56.6 MB),
// 1 or 2 OpenMP threads splitting the rows, interleaved, best of 20. Also: no prefetch, a longer prefetch, and
// 2 / 4 rows per pass sharing the x loads. Question: is the head at its read floor on an AVX2 CPU?
// Compiled for AVX2/FMA/F16C only (what an AVX2-only CPU runs). Results: benchmarks/results/dense_rows_lab.md.
//   g++ -O3 -fopenmp -std=c++17 -o /tmp/dense_rows_avx2_lab benchmarks/dense_rows_avx2_lab.cpp
//   OMP_NUM_THREADS=1 /tmp/dense_rows_avx2_lab; OMP_NUM_THREADS=2 /tmp/dense_rows_avx2_lab
#include <immintrin.h>
#include <omp.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <chrono>
#include <algorithm>
#define T2 __attribute__((target("avx2,fma,f16c,popcnt")))
T2 static inline float hsum256(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s)); s = _mm_add_ss(s, _mm_movehdup_ps(s)); return _mm_cvtss_f32(s);
}
template <int PF>
T2 void shipped(const uint16_t* w, const float* x, int64_t K, float* y, int64_t o0, int64_t o1) {
  const int64_t k32 = K / 32 * 32;
  for (int64_t o = o0; o < o1; ++o) {
    const uint16_t* wo = w + o * K;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t k = 0; k < k32; k += 32) {
      if (PF) _mm_prefetch(reinterpret_cast<const char*>(wo + k) + PF, _MM_HINT_T0);
      for (int q = 0; q < 4; ++q) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wo + k + 8 * q));
        const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
        acc[q] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + k + 8 * q), acc[q]);
      }
    }
    y[o] = hsum256(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  }
}
// bf16 -> f32 by unpack with zero (2 rows of 8 per 256-bit load: lo/hi halves interleaved) : x is permuted accordingly
// R: rows per pass sharing the x loads
template <int PF, int R>
T2 void rows(const uint16_t* w, const float* x, int64_t K, float* y, int64_t o0, int64_t o1) {
  const int64_t k32 = K / 32 * 32;
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k32; k += 32) {
      for (int r = 0; r < R; ++r) if (PF) _mm_prefetch(reinterpret_cast<const char*>(w + (o + r) * K + k) + PF, _MM_HINT_T0);
      for (int q = 0; q < 4; ++q) {
        const __m256 xv = _mm256_loadu_ps(x + k + 8 * q);
        for (int r = 0; r < R; ++r) {
          const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (o + r) * K + k + 8 * q));
          const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
          acc[r][q & 1] = _mm256_fmadd_ps(wv, xv, acc[r][q & 1]);
        }
      }
    }
    for (int r = 0; r < R; ++r) y[o + r] = hsum256(_mm256_add_ps(acc[r][0], acc[r][1]));
  }
}
// read only: sum of the weight bytes as 32-bit ints
template <int PF>
T2 void readonly(const uint16_t* w, const float* x, int64_t K, float* y, int64_t o0, int64_t o1) {
  __m256i a = _mm256_setzero_si256(), b = a;
  const char* p = (const char*)(w + o0 * K); const char* e = (const char*)(w + o1 * K);
  for (; p + 64 <= e; p += 64) {
    if (PF) _mm_prefetch(p + PF, _MM_HINT_T0);
    a = _mm256_add_epi32(a, _mm256_loadu_si256((const __m256i*)p)); b = _mm256_add_epi32(b, _mm256_loadu_si256((const __m256i*)(p + 32)));
  }
  a = _mm256_add_epi32(a, b); y[o0] = (float)_mm256_extract_epi32(a, 0);
}
using Fn = void (*)(const uint16_t*, const float*, int64_t, float*, int64_t, int64_t);
int main(int argc, char** argv) {
  int64_t N = 49152, K = 576; int reps = 20;
  std::vector<uint16_t> w(N * K); for (size_t i = 0; i < w.size(); ++i) w[i] = 0x3f80 + (i * 7919 % 127);
  std::vector<float> x(K, 0.5f), y(N), yref(N);
  struct V { const char* n; Fn f; };
  V vs[] = {{"read only 3K", readonly<3072>}, {"read only no pf", readonly<0>}, {"shipped (3K)", shipped<3072>}, {"shipped no pf", shipped<0>},
            {"shipped 6K", shipped<6144>}, {"2 rows 3K", rows<3072, 2>}, {"4 rows 3K", rows<3072, 4>}, {"2 rows no pf", rows<0, 2>}, {"4 rows no pf", rows<0, 4>}};
  int nv = sizeof(vs) / sizeof(vs[0]);
  std::vector<double> best(nv, 1e9);
  int T = omp_get_max_threads();
  for (int r = 0; r < reps; ++r)
    for (int i = 0; i < nv; ++i) {
      auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel
      { int t = omp_get_thread_num(); int64_t a = N * t / T, b = N * (t + 1) / T; vs[i].f(w.data(), x.data(), K, y.data(), a, b); }
      double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best[i] = std::min(best[i], dt);
      if (i == 2 && r == 0) yref = y;
      if (r == 0 && i > 1) { double e = 0; for (int64_t o = 0; o < N; ++o) e = std::max(e, (double)std::abs(y[o] - yref[o])); if (e > 1e-2) printf("mismatch %s %g\n", vs[i].n, e); }
    }
  printf("| variant | ms | GB/s |\n|---|---|---|\n");
  for (int i = 0; i < nv; ++i) printf("| %s | %.2f | %.1f |\n", vs[i].n, best[i] * 1e3, N * K * 2 / best[i] / 1e9);
}
