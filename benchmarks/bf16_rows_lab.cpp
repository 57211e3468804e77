// Lab: variants of the AVX512-BF16 sparse row loop for bf16 inputs (row_bf16dot in src/losa/inference/csrc/
// sparse_linear.cpp, the decode engine's loop for a bf16 model) on one thread, random bitmask weights at the given
// sparsity, interleaved, best of 15; `copies` > 1 cycles that many matrices so the weights stream from memory.
// Variants: v0 the shipped loop (2 blocks per step, 2 accumulators, prefetch 1024 values ahead); v1 4 blocks and 4
// accumulators; v2 v1 with the masks loaded straight into k-registers; v3 the memory form of vpexpandw; v4 no
// expansion (a wrong result: the cost without it); v0 with other prefetch distances; 2 or 4 rows interleaved
// sharing each input load. None beat v0 by more than about 10 % on the AMX Xeon (2026-12-03 closing note).
// Build and run (AVX-512 VBMI2 + BF16 CPU):
//   g++ -O3 -std=c++17 -o /tmp/bf16_rows_lab benchmarks/bf16_rows_lab.cpp
//   /tmp/bf16_rows_lab 1536 576 0.7 48; /tmp/bf16_rows_lab 576 1536 0.7 48; /tmp/bf16_rows_lab 1536 576 0.7 1
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <random>
#include <chrono>
#include <algorithm>
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx2,fma,popcnt,avx512bf16,bmi2")))
typedef uint16_t bf;
struct M { int N, K, nb; std::vector<uint32_t> meta; std::vector<bf> vals; std::vector<int64_t> rp; };
T512 static inline __m512i ex(uint32_t m, const bf*& v) {
  __m512i r = _mm512_loadu_si512(v); asm("" : "+v"(r)); v += _mm_popcnt_u32(m);
  return _mm512_maskz_expand_epi16((__mmask32)m, r);
}
// V0: shipped (2 blocks per step, 2 accumulators)
T512 float v0(const uint32_t* meta, const bf* v, const bf* x, int nb) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0; int k = 0;
  for (; k + 1 < nb; k += 2) {
    _mm_prefetch((const char*)(v + 1024), _MM_HINT_T0);
    __m512bh w0 = (__m512bh)ex(meta[k], v), w1 = (__m512bh)ex(meta[k + 1], v);
    a0 = _mm512_dpbf16_ps(a0, w0, (__m512bh)_mm512_loadu_si512(x + 32 * k));
    a1 = _mm512_dpbf16_ps(a1, w1, (__m512bh)_mm512_loadu_si512(x + 32 * k + 32));
  }
  if (k < nb) a0 = _mm512_dpbf16_ps(a0, (__m512bh)ex(meta[k], v), (__m512bh)_mm512_loadu_si512(x + 32 * k));
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
// V1: 4 blocks per step, 4 accumulators, offsets from one 64-bit popcount chain per pair
T512 float v1(const uint32_t* meta, const bf* v, const bf* x, int nb) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0; int k = 0;
  for (; k + 3 < nb; k += 4) {
    _mm_prefetch((const char*)(v + 1024), _MM_HINT_T0);
    uint32_t m0 = meta[k], m1 = meta[k+1], m2 = meta[k+2], m3 = meta[k+3];
    const bf* p1 = v + _mm_popcnt_u32(m0); const bf* p2 = p1 + _mm_popcnt_u32(m1); const bf* p3 = p2 + _mm_popcnt_u32(m2);
    __m512i r0 = _mm512_loadu_si512(v), r1 = _mm512_loadu_si512(p1), r2 = _mm512_loadu_si512(p2), r3 = _mm512_loadu_si512(p3);
    asm("" : "+v"(r0), "+v"(r1), "+v"(r2), "+v"(r3));
    v = p3 + _mm_popcnt_u32(m3);
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_expand_epi16(m0, r0), (__m512bh)_mm512_loadu_si512(x + 32 * k));
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_expand_epi16(m1, r1), (__m512bh)_mm512_loadu_si512(x + 32 * k + 32));
    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_maskz_expand_epi16(m2, r2), (__m512bh)_mm512_loadu_si512(x + 32 * k + 64));
    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_maskz_expand_epi16(m3, r3), (__m512bh)_mm512_loadu_si512(x + 32 * k + 96));
  }
  for (; k < nb; ++k) a0 = _mm512_dpbf16_ps(a0, (__m512bh)ex(meta[k], v), (__m512bh)_mm512_loadu_si512(x + 32 * k));
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
// V2: V1 with the masks loaded straight into mask registers (kmovd k, m32)
T512 float v2(const uint32_t* meta, const bf* v, const bf* x, int nb) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0; int k = 0;
  for (; k + 3 < nb; k += 4) {
    _mm_prefetch((const char*)(v + 1024), _MM_HINT_T0);
    uint32_t m0 = meta[k], m1 = meta[k+1], m2 = meta[k+2], m3 = meta[k+3];
    __mmask32 k0 = _load_mask32((__mmask32*)(meta + k)), k1 = _load_mask32((__mmask32*)(meta + k + 1)),
              k2 = _load_mask32((__mmask32*)(meta + k + 2)), k3 = _load_mask32((__mmask32*)(meta + k + 3));
    const bf* p1 = v + _mm_popcnt_u32(m0); const bf* p2 = p1 + _mm_popcnt_u32(m1); const bf* p3 = p2 + _mm_popcnt_u32(m2);
    __m512i r0 = _mm512_loadu_si512(v), r1 = _mm512_loadu_si512(p1), r2 = _mm512_loadu_si512(p2), r3 = _mm512_loadu_si512(p3);
    asm("" : "+v"(r0), "+v"(r1), "+v"(r2), "+v"(r3));
    v = p3 + _mm_popcnt_u32(m3);
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_expand_epi16(k0, r0), (__m512bh)_mm512_loadu_si512(x + 32 * k));
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_expand_epi16(k1, r1), (__m512bh)_mm512_loadu_si512(x + 32 * k + 32));
    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_maskz_expand_epi16(k2, r2), (__m512bh)_mm512_loadu_si512(x + 32 * k + 64));
    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_maskz_expand_epi16(k3, r3), (__m512bh)_mm512_loadu_si512(x + 32 * k + 96));
  }
  for (; k < nb; ++k) a0 = _mm512_dpbf16_ps(a0, (__m512bh)ex(meta[k], v), (__m512bh)_mm512_loadu_si512(x + 32 * k));
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
// V3: memory-form expand, 4 accumulators
T512 float v3(const uint32_t* meta, const bf* v, const bf* x, int nb) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0; int k = 0;
  for (; k + 3 < nb; k += 4) {
    _mm_prefetch((const char*)(v + 1024), _MM_HINT_T0);
    uint32_t m0 = meta[k], m1 = meta[k+1], m2 = meta[k+2], m3 = meta[k+3];
    const bf* p1 = v + _mm_popcnt_u32(m0); const bf* p2 = p1 + _mm_popcnt_u32(m1); const bf* p3 = p2 + _mm_popcnt_u32(m2);
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_expandloadu_epi16(m0, v), (__m512bh)_mm512_loadu_si512(x + 32 * k));
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_expandloadu_epi16(m1, p1), (__m512bh)_mm512_loadu_si512(x + 32 * k + 32));
    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_maskz_expandloadu_epi16(m2, p2), (__m512bh)_mm512_loadu_si512(x + 32 * k + 64));
    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_maskz_expandloadu_epi16(m3, p3), (__m512bh)_mm512_loadu_si512(x + 32 * k + 96));
    v = p3 + _mm_popcnt_u32(m3);
  }
  for (; k < nb; ++k) a0 = _mm512_dpbf16_ps(a0, (__m512bh)ex(meta[k], v), (__m512bh)_mm512_loadu_si512(x + 32 * k));
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
// V4: no expansion at all (wrong result; the loads and dot products alone: the floor of this structure)
T512 float v4(const uint32_t* meta, const bf* v, const bf* x, int nb) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0; int k = 0;
  for (; k + 3 < nb; k += 4) {
    _mm_prefetch((const char*)(v + 1024), _MM_HINT_T0);
    uint32_t m0 = meta[k], m1 = meta[k+1], m2 = meta[k+2], m3 = meta[k+3];
    const bf* p1 = v + _mm_popcnt_u32(m0); const bf* p2 = p1 + _mm_popcnt_u32(m1); const bf* p3 = p2 + _mm_popcnt_u32(m2);
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(v), (__m512bh)_mm512_loadu_si512(x + 32 * k));
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(p1), (__m512bh)_mm512_loadu_si512(x + 32 * k + 32));
    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(p2), (__m512bh)_mm512_loadu_si512(x + 32 * k + 64));
    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(p3), (__m512bh)_mm512_loadu_si512(x + 32 * k + 96));
    v = p3 + _mm_popcnt_u32(m3);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// R rows at once: one accumulator per row (R independent chains), each x load shared by the R rows; sums of the R rows
template <int R>
T512 void vr(const uint32_t* meta, int64_t stride, const bf* const* vv, const bf* x, int nb, float* out) {
  __m512 a[R]; const bf* v[R];
  for (int r = 0; r < R; ++r) { a[r] = _mm512_setzero_ps(); v[r] = vv[r]; }
  for (int k = 0; k < nb; ++k) {
    const __m512bh xk = (__m512bh)_mm512_loadu_si512(x + 32 * k);
    for (int r = 0; r < R; ++r) {
      if ((k & 1) == 0) _mm_prefetch((const char*)(v[r] + 1024), _MM_HINT_T0);
      a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)ex(meta[r * stride + k], v[r]), xk);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(a[r]);
}
template <int R>
T512 void vr2(const uint32_t* meta, int64_t stride, const bf* const* vv, const bf* x, int nb, float* out) {
  __m512 a[R], b[R]; const bf* v[R];
  for (int r = 0; r < R; ++r) { a[r] = _mm512_setzero_ps(); b[r] = a[r]; v[r] = vv[r]; }
  int k = 0;
  for (; k + 1 < nb; k += 2) {
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + 32 * k), x1 = (__m512bh)_mm512_loadu_si512(x + 32 * k + 32);
    for (int r = 0; r < R; ++r) {
      _mm_prefetch((const char*)(v[r] + 1024), _MM_HINT_T0);
      a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)ex(meta[r * stride + k], v[r]), x0);
      b[r] = _mm512_dpbf16_ps(b[r], (__m512bh)ex(meta[r * stride + k + 1], v[r]), x1);
    }
  }
  for (; k < nb; ++k) {
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + 32 * k);
    for (int r = 0; r < R; ++r) a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)ex(meta[r * stride + k], v[r]), x0);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
}
typedef void (*FnR)(const uint32_t*, int64_t, const bf* const*, const bf*, int, float*);

template <int PFV, int PFM>
T512 float vp(const uint32_t* meta, const bf* v, const bf* x, int nb) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0; int k = 0;
  for (; k + 1 < nb; k += 2) {
    if (PFV) _mm_prefetch((const char*)(v + PFV), _MM_HINT_T0);
    if (PFM && (k & 15) == 0) _mm_prefetch((const char*)(meta + k) + PFM, _MM_HINT_T0);
    __m512bh w0 = (__m512bh)ex(meta[k], v), w1 = (__m512bh)ex(meta[k + 1], v);
    a0 = _mm512_dpbf16_ps(a0, w0, (__m512bh)_mm512_loadu_si512(x + 32 * k));
    a1 = _mm512_dpbf16_ps(a1, w1, (__m512bh)_mm512_loadu_si512(x + 32 * k + 32));
  }
  if (k < nb) a0 = _mm512_dpbf16_ps(a0, (__m512bh)ex(meta[k], v), (__m512bh)_mm512_loadu_si512(x + 32 * k));
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
typedef float (*Fn)(const uint32_t*, const bf*, const bf*, int);
M make(int N, int K, double sp, std::mt19937& g) {
  M m; m.N = N; m.K = K; m.nb = K / 32; m.rp.push_back(0);
  std::uniform_real_distribution<float> u(0, 1);
  for (int o = 0; o < N; ++o) {
    for (int b = 0; b < m.nb; ++b) {
      uint32_t mk = 0;
      for (int j = 0; j < 32; ++j) if (u(g) >= sp) { mk |= 1u << j; m.vals.push_back(0x3f80 + (g() & 0x7f)); }
      m.meta.push_back(mk);
    }
    m.rp.push_back(m.vals.size());
  }
  m.vals.resize(m.vals.size() + 64, 0);
  return m;
}
int main(int argc, char** argv) {
  int N = atoi(argv[1]), K = atoi(argv[2]); double sp = atof(argv[3]); int copies = argc > 4 ? atoi(argv[4]) : 1;
  std::mt19937 g(1);
  std::vector<M> ms; for (int c = 0; c < copies; ++c) ms.push_back(make(N, K, sp, g));
  std::vector<bf> x(K + 64); for (auto& e : x) e = 0x3f80 + (g() & 0x7f);
  std::vector<float> y(N);
  Fn fns[] = {v0, v1, v2, v3, v4, vp<0, 0>, vp<2048, 512>, vp<4096, 1024>};
  const char* names[] = {"v0 shipped", "v1 4acc", "v2 4acc kmov-mem", "v3 4acc expandload", "v4 no expand (wrong)",
                         "v0 no prefetch", "v0 pf 2048 m512", "v0 pf 4096 m1024"};
  FnR fr[] = {vr<2>, vr<4>, vr2<2>, vr2<4>}; const char* rnames[] = {"rows2 1acc", "rows4 1acc", "rows2 2acc", "rows4 2acc"};
  int rr[] = {2, 4, 2, 4};
  const int nf = 8, nr = 4; double best[nf + nr]; for (auto& b : best) b = 1e30;
  double chk[nf + nr] = {0};
  int reps = std::max(1, 200 / copies);
  for (int it = 0; it < 15; ++it)
    for (int f = 0; f < nf + nr; ++f) {
      auto t = std::chrono::steady_clock::now();
      for (int r = 0; r < reps; ++r)
        for (auto& m : ms) {
          if (f < nf) for (int o = 0; o < N; ++o) y[o] = fns[f](m.meta.data() + (int64_t)o * m.nb, m.vals.data() + m.rp[o], x.data(), m.nb);
          else { const int R = rr[f - nf]; const bf* vv[4];
            for (int o = 0; o < N; o += R) { for (int q = 0; q < R; ++q) vv[q] = m.vals.data() + m.rp[o + q];
              fr[f - nf](m.meta.data() + (int64_t)o * m.nb, m.nb, vv, x.data(), m.nb, y.data() + o); } }
        }
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
      best[f] = std::min(best[f], s);
      chk[f] = 0; for (int o = 0; o < N; ++o) chk[f] += y[o];
    }
  double groups = double(N) * (K / 32) * copies * reps;
  double bytes = 0; for (auto& m : ms) bytes += m.vals.size() * 2 + m.meta.size() * 4;
  for (int f = 0; f < nf + nr; ++f) printf("%-22s %.3f ns/group  %.1f GB/s  (check %.6g)\n", f < nf ? names[f] : rnames[f - nf], best[f] / groups * 1e9, bytes * reps / best[f] / 1e9, chk[f]);
}
