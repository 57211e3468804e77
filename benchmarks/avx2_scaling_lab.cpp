// Lab: the AVX2 float32-input sparse row loop (row_avx2 for bf16 values, batch 1, in src/losa/inference/csrc/
// sparse_linear.cpp) on 1 or 2 OpenMP threads, random bitmask weights at the given sparsity, with software-prefetch
// distances, interleaved, best of 15. HUGE=1 puts the weights in 2 MB-aligned memory with MADV_HUGEPAGE (as the
// kernel's layers allocate theirs), else 2 MB-aligned memory without the advice. Used for the 2-thread scaling lead
// of the 2026-12-03 closing note (the kernel's own loop scaled 1.2x there: benchmarks/avx2_scaling_lab.py).
// Build and run (an AVX2 CPU):
//   g++ -O3 -fopenmp -std=c++17 -o /tmp/avx2_scaling_lab benchmarks/avx2_scaling_lab.cpp
//   for h in "" 1; do for t in 1 2; do HUGE=$h /tmp/avx2_scaling_lab $t 11008 4096 0.7; done; done
#include <immintrin.h>
#include <omp.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <chrono>
#include <algorithm>
#include <sys/mman.h>
#include <cmath>
#define A2 __attribute__((target("avx2,fma,f16c,popcnt")))
alignas(32) uint8_t shuf16[256][32];
void tables() { for (int b = 0; b < 256; ++b) { int k = 0; for (int i = 0; i < 8; ++i) { bool on = (b >> i) & 1; uint8_t* c = shuf16[b] + 4 * i; c[0] = c[1] = 0x80; c[2] = on ? 2 * k : 0x80; c[3] = on ? 2 * k + 1 : 0x80; k += on; } } }
A2 inline __m256 expand_group(const uint16_t* v, uint32_t row) {
  const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)v));
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(raw, _mm256_load_si256((const __m256i*)((const char*)shuf16 + row))));
}
template <int Q> inline uint32_t table_row(uint32_t m) { if constexpr (Q == 0) return (m << 5) & 0x1fe0u; else return (m >> (8 * Q - 5)) & 0x1fe0u; }
A2 inline float hsum256(__m256 a) { __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)); s = _mm_add_ps(s, _mm_movehl_ps(s, s)); s = _mm_add_ss(s, _mm_movehdup_ps(s)); return _mm_cvtss_f32(s); }
template <int PFD>
A2 void sparse(const uint32_t* meta, const uint16_t* vals, const int64_t* rp, const float* x, int64_t K, float* y, int64_t o0, int64_t o1) {
  const int64_t nblk = K / 32;
  for (int64_t o = o0; o < o1; ++o) {
    const uint16_t* v = vals + rp[o]; const uint32_t* mt = meta + o * nblk;
    __m256 acc[4]; for (auto& a : acc) a = _mm256_setzero_ps();
    for (int64_t k = 0; k < nblk; ++k) {
      if (PFD) _mm_prefetch((const char*)v + PFD, _MM_HINT_T0);
      const uint32_t m = mt[k];
      const uint16_t* vq[4] = {v, v + _mm_popcnt_u32(m & 0xffu), v + _mm_popcnt_u32(m & 0xffffu), v + _mm_popcnt_u32(m & 0xffffffu)};
      const uint32_t rows[4] = {table_row<0>(m), table_row<1>(m), table_row<2>(m), table_row<3>(m)};
      for (int q = 0; q < 4; ++q) acc[q] = _mm256_fmadd_ps(expand_group(vq[q], rows[q]), _mm256_loadu_ps(x + 32 * k + 8 * q), acc[q]);
      v += _mm_popcnt_u32(m);
    }
    y[o] = hsum256(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  }
}
template <int PF>
A2 void dense(const uint16_t* w, const float* x, int64_t K, float* y, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const uint16_t* wo = w + o * K;
    __m256 acc[4]; for (auto& a : acc) a = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      if (PF) { _mm_prefetch((const char*)(wo + k) + PF, _MM_HINT_T0); }
      for (int q = 0; q < 4; ++q) {
        const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(wo + k + 8 * q))), 16));
        acc[q] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + k + 8 * q), acc[q]);
      }
    }
    y[o] = hsum256(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  }
}
// dense, 16 values per load: unpack lo/hi against zero (lanes permuted: x pre-permuted to match)
template <int PF>
A2 void dense_unpack(const uint16_t* w, const float* xp, int64_t K, float* y, int64_t o0, int64_t o1) {
  const __m256i z = _mm256_setzero_si256();
  for (int64_t o = o0; o < o1; ++o) {
    const uint16_t* wo = w + o * K;
    __m256 acc[4]; for (auto& a : acc) a = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      if (PF) _mm_prefetch((const char*)(wo + k) + PF, _MM_HINT_T0);
      for (int h = 0; h < 2; ++h) {
        const __m256i r = _mm256_loadu_si256((const __m256i*)(wo + k + 16 * h));
        const __m256 lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, r)), hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, r));
        acc[2 * h] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xp + k + 16 * h), acc[2 * h]);
        acc[2 * h + 1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xp + k + 16 * h + 8), acc[2 * h + 1]);
      }
    }
    y[o] = hsum256(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  }
}
int main(int argc, char** argv) {
  tables();
  int64_t N = argc > 3 ? atoi(argv[2]) : 49152, K = argc > 3 ? atoi(argv[3]) : 576; int th = atoi(argv[1]);
  omp_set_num_threads(th);
  const bool huge = getenv("HUGE") != nullptr;
  auto halloc = [&](size_t bytes) { void* p = nullptr; posix_memalign(&p, 1 << 21, bytes); if (huge) madvise(p, bytes / (1 << 21) * (1 << 21), MADV_HUGEPAGE); return p; };
  uint16_t* wbuf = (uint16_t*)halloc((N * K + 64) * 2); for (int64_t i = 0; i < N * K + 64; ++i) wbuf[i] = 0x3f80 + (i * 7 % 128);
  struct { uint16_t* p; uint16_t* data() { return p; } } w{wbuf};
  double sp = argc > 4 ? atof(argv[4]) : 0.0;
  uint32_t* mbuf = (uint32_t*)halloc(N * K / 32 * 4); struct { uint32_t* p; uint32_t* data() { return p; } uint32_t& operator[](int64_t i) { return p[i]; } } meta{mbuf}; std::vector<int64_t> rp(N + 1); rp[0] = 0;
  { uint64_t st = 88172645463325252ull; int64_t nnz = 0;
    for (int64_t o = 0; o < N; ++o) { for (int64_t b = 0; b < K / 32; ++b) { uint32_t m = 0; for (int j = 0; j < 32; ++j) { st ^= st << 13; st ^= st >> 7; st ^= st << 17; if ((st % 1000) >= sp * 1000) m |= 1u << j; } meta[o * (K / 32) + b] = m; nnz += __builtin_popcount(m); } rp[o + 1] = nnz; } }
  std::vector<float> x(K), xp(K); for (int64_t i = 0; i < K; ++i) x[i] = 1.f + (i % 5) * 0.25f;
  // xp: x in the order unpacklo/hi produce: per 16: [0-3, 8-11] then [4-7, 12-15]
  for (int64_t k = 0; k < K; k += 16) for (int j = 0; j < 4; ++j) { xp[k + j] = x[k + j]; xp[k + 4 + j] = x[k + 8 + j]; xp[k + 8 + j] = x[k + 4 + j]; xp[k + 12 + j] = x[k + 12 + j]; }
  std::vector<float> y(N), y2(N);
  const char* names[] = {"sparse pf 3K", "sparse pf 6K", "sparse pf 12K", "sparse pf 1.5K", "sparse no pf"};
  const int nf = 5; double best[nf]; for (auto& b : best) b = 1e30;
  for (int it = 0; it < 15; ++it)
    for (int f = 0; f < nf; ++f) {
      auto t = std::chrono::steady_clock::now();
      #pragma omp parallel
      { int t_ = omp_get_thread_num(), n_ = omp_get_num_threads(); int64_t a = N * t_ / n_, b = N * (t_ + 1) / n_;
        switch (f) { case 0: sparse<3072>(meta.data(), w.data(), rp.data(), x.data(), K, y.data(), a, b); break;
          case 1: sparse<6144>(meta.data(), w.data(), rp.data(), x.data(), K, y2.data(), a, b); break;
          case 2: sparse<12288>(meta.data(), w.data(), rp.data(), x.data(), K, y2.data(), a, b); break;
          case 3: sparse<1536>(meta.data(), w.data(), rp.data(), x.data(), K, y2.data(), a, b); break;
          case 4: sparse<0>(meta.data(), w.data(), rp.data(), x.data(), K, y2.data(), a, b); break; } }
      best[f] = std::min(best[f], std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count());
      if (f > 0 && sp == 0) for (int64_t o = 0; o < N; o += 997) if (std::abs(y[o] - y2[o]) > 1e-3f * std::abs(y[o])) { printf("mismatch %s\n", names[f]); break; }
    }
  double bytes_sparse = rp[N] * 2.0 + N * K / 8.0, bytes_dense = N * K * 2.0;
  for (int f = 0; f < nf; ++f) printf("%-28s %.2f ms  %.1f GB/s\n", names[f], best[f] * 1e3, bytes_sparse / best[f] / 1e9);
}
