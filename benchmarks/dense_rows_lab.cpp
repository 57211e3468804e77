// Lab: the dense bf16 row loop of the decode engine (dense_rows_bf16dot in src/losa/inference/csrc/sparse_linear.cpp,
// a bf16 model's LM head) with software prefetch variants, against a plain read of the same bytes, on SmolLM2's
// LM head shape (49152 x 576 bf16, 56.6 MB), 1 or 2 OpenMP threads splitting the rows, interleaved, best of 20.
// Each loop step reads 128 bytes (two cache lines) of weights; "1 line" prefetches one of them 4 KiB ahead (the
// loop before 2026-12-03), "2 lines" both.
// Build and run (needs an AVX-512 CPU with AVX512-BF16):
//   g++ -O3 -fopenmp -std=c++17 -o /tmp/dense_rows_lab benchmarks/dense_rows_lab.cpp
//   /tmp/dense_rows_lab 1; /tmp/dense_rows_lab 2
#include <immintrin.h>
#include <omp.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <chrono>
#include <algorithm>
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx2,fma,popcnt,avx512bf16")))
template <int PF, int LINES>
T512 void dense(const uint16_t* w, const uint16_t* x, int64_t K, float* y, int64_t o0, int64_t o1) {
  const int64_t k64 = K / 64 * 64;
  for (int64_t o = o0; o < o1; ++o) {
    const uint16_t* wo = w + o * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (int64_t k = 0; k < k64; k += 64) {
      if (PF) { _mm_prefetch((const char*)(wo + k) + PF, _MM_HINT_T0); if (LINES == 2) _mm_prefetch((const char*)(wo + k) + PF + 64, _MM_HINT_T0); }
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(wo + k), (__m512bh)_mm512_loadu_si512(x + k));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(wo + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
    }
    y[o] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
}
T512 void readall(const uint16_t* w, const uint16_t* x, int64_t K, float* y, int64_t o0, int64_t o1) {
  __m512i a = _mm512_setzero_si512(), b = a;
  for (int64_t i = o0 * K; i < o1 * K; i += 64) { a = _mm512_add_epi32(a, _mm512_loadu_si512(w + i)); b = _mm512_add_epi32(b, _mm512_loadu_si512(w + i + 32)); }
  y[o0] = (float)_mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
}
typedef void (*Fn)(const uint16_t*, const uint16_t*, int64_t, float*, int64_t, int64_t);
int main(int argc, char** argv) {
  int64_t N = 49152, K = 576; int th = atoi(argv[1]);
  omp_set_num_threads(th);
  std::vector<uint16_t> w(N * K, 0x3f80); std::vector<uint16_t> x(K, 0x3f80); std::vector<float> y(N);
  Fn fns[] = {readall, dense<4096, 1>, dense<0, 1>, dense<4096, 2>, dense<2048, 2>, dense<8192, 2>, dense<1024, 2>};
  const char* names[] = {"read only", "4K, 1 line (before)", "no prefetch", "4K, 2 lines", "2K, 2 lines", "8K, 2 lines", "1K, 2 lines"};
  const int nf = 7; double best[nf]; for (auto& b : best) b = 1e30;
  for (int it = 0; it < 20; ++it)
    for (int f = 0; f < nf; ++f) {
      auto t = std::chrono::steady_clock::now();
      #pragma omp parallel
      { int t_ = omp_get_thread_num(), n_ = omp_get_num_threads(); int64_t a = N * t_ / n_, b = N * (t_ + 1) / n_; fns[f](w.data(), x.data(), K, y.data(), a, b); }
      best[f] = std::min(best[f], std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count());
    }
  for (int f = 0; f < nf; ++f) printf("%-22s %.2f ms  %.1f GB/s\n", names[f], best[f] * 1e3, N * K * 2 / best[f] / 1e9);
}
