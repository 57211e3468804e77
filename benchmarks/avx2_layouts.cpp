// Kernel lab: AVX2 batch-1 row loop, other layouts of the same bitmask + bf16 values (standalone).
//
//   g++ -O3 -std=c++17 -fopenmp -Wno-psabi -o /tmp/avx2_layouts benchmarks/avx2_layouts.cpp
//   OMP_NUM_THREADS=1 /tmp/avx2_layouts 11008 4096 0.7 31     # N K sparsity repeats
//
// N4 is the shipped loop (row_avx2 in src/losa/inference/csrc/sparse_linear.cpp). P8 stores each block's prefix
// popcounts next to its mask (8 bytes per 32 inputs), P12 also the four table-row offsets (12 bytes): no scalar
// arithmetic left in the loop. R2 runs two rows at once so that each x load feeds both. G16 gathers x at the
// nonzeros (u16 column index + bf16 value per nonzero, vpgatherdps). A1-A7 are ablations of P12 that compute
// wrong results by design, to see which part of the loop costs: A1 one fixed table row (the load is hoisted),
// A2 fixed value offsets, A3 no shuffle and no table (the raw broadcast as weights), A4 the shuffle control in
// a register (no table load), A5 8 accumulators, A6 no FMA and no x loads, A7 a fixed value-pointer step.
// D1 (sparsity 0 only) reads the bf16 values densely without a mask, as a dedicated bf16 LM-head loop would.
// Every function is compiled for AVX2/FMA/F16C/POPCNT only. Variants timed interleaved (medians); 'vs N4' =
// N4's time / variant's time; 'bytes MB' = the layout's weight bytes (0 for ablations). Results:
// benchmarks/results/avx2_variants.md (section 2026-12-02, layouts).
#include <immintrin.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <random>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <omp.h>
#define T2 __attribute__((target("avx2,fma,f16c,popcnt")))
struct Tab { alignas(32) uint8_t shuf[256][32]; };
static Tab make() {
  Tab t{};
  for (int b = 0; b < 256; ++b) { int k = 0;
    for (int i = 0; i < 8; ++i) { bool on = (b >> i) & 1; int pos = (i % 4) * 4 + (i / 4) * 16;
      t.shuf[b][pos] = 0x80; t.shuf[b][pos + 1] = 0x80;
      t.shuf[b][pos + 2] = on ? 2 * k : 0x80; t.shuf[b][pos + 3] = on ? 2 * k + 1 : 0x80; k += on; } }
  return t; }
static const Tab T = make();
T2 static inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s)); s = _mm_add_ss(s, _mm_movehdup_ps(s)); return _mm_cvtss_f32(s); }
T2 static inline __m256 exo(const uint16_t* v, uint32_t off32) {
  __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)v));
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(raw, _mm256_load_si256((const __m256i*)((const char*)T.shuf + off32)))); }
struct Row { const uint8_t* meta; const uint8_t* m8; const uint8_t* m12; const uint16_t* v; const uint16_t* gi; const uint16_t* gv; int64_t nnz; };
// N4: shipped
T2 float rowN4(const Row& r, const float* x, int64_t nblk) {
  const uint8_t* meta = r.meta; const uint16_t* v = r.v;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t k = 0; k < nblk; ++k) {
    _mm_prefetch((const char*)(v + 1536), _MM_HINT_T0);
    uint32_t m; memcpy(&m, meta + 4 * k, 4);
    const float* xk = x + 32 * k;
    int o1 = _mm_popcnt_u32(m & 0xff), o2 = _mm_popcnt_u32(m & 0xffff), o3 = _mm_popcnt_u32(m & 0xffffff);
    a0 = _mm256_fmadd_ps(exo(v, (m << 5) & 0x1fe0), _mm256_loadu_ps(xk), a0);
    a1 = _mm256_fmadd_ps(exo(v + o1, (m >> 3) & 0x1fe0), _mm256_loadu_ps(xk + 8), a1);
    a2 = _mm256_fmadd_ps(exo(v + o2, (m >> 11) & 0x1fe0), _mm256_loadu_ps(xk + 16), a2);
    a3 = _mm256_fmadd_ps(exo(v + o3, (m >> 19) & 0x1fe0), _mm256_loadu_ps(xk + 24), a3);
    v += _mm_popcnt_u32(m);
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))); }
// P8: per block 8 bytes: u32 mask, u8 p1 p2 p3 cnt (prefix counts precomputed)
T2 float rowP8(const Row& r, const float* x, int64_t nblk) {
  const uint8_t* meta = r.m8; const uint16_t* v = r.v;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t k = 0; k < nblk; ++k) {
    _mm_prefetch((const char*)(v + 1536), _MM_HINT_T0);
    const uint8_t* b = meta + 8 * k;
    uint32_t m; memcpy(&m, b, 4);
    const float* xk = x + 32 * k;
    a0 = _mm256_fmadd_ps(exo(v, (m << 5) & 0x1fe0), _mm256_loadu_ps(xk), a0);
    a1 = _mm256_fmadd_ps(exo(v + b[4], (m >> 3) & 0x1fe0), _mm256_loadu_ps(xk + 8), a1);
    a2 = _mm256_fmadd_ps(exo(v + b[5], (m >> 11) & 0x1fe0), _mm256_loadu_ps(xk + 16), a2);
    a3 = _mm256_fmadd_ps(exo(v + b[6], (m >> 19) & 0x1fe0), _mm256_loadu_ps(xk + 24), a3);
    v += b[7];
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))); }
// P12: per block 12 bytes: u16 row offsets (mask*32) x4, u8 p1 p2 p3 cnt
T2 float rowP12(const Row& r, const float* x, int64_t nblk) {
  const uint8_t* meta = r.m12; const uint16_t* v = r.v;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t k = 0; k < nblk; ++k) {
    _mm_prefetch((const char*)(v + 1536), _MM_HINT_T0);
    const uint8_t* b = meta + 12 * k; uint16_t ro[4]; memcpy(ro, b, 8);
    const float* xk = x + 32 * k;
    a0 = _mm256_fmadd_ps(exo(v, ro[0]), _mm256_loadu_ps(xk), a0);
    a1 = _mm256_fmadd_ps(exo(v + b[8], ro[1]), _mm256_loadu_ps(xk + 8), a1);
    a2 = _mm256_fmadd_ps(exo(v + b[9], ro[2]), _mm256_loadu_ps(xk + 16), a2);
    a3 = _mm256_fmadd_ps(exo(v + b[10], ro[3]), _mm256_loadu_ps(xk + 24), a3);
    v += b[11];
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))); }
// G: gather over nonzeros: u16 column index + bf16 value per nonzero (separate streams), 8 per step
T2 float rowG(const Row& r, const float* x, int64_t) {
  const uint16_t* gi = r.gi; const uint16_t* gv = r.gv; int64_t n8 = r.nnz / 8;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  int64_t i = 0;
  for (; i + 1 < n8; i += 2) {
    __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(gi + 8 * i)));
    __m256i i1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(gi + 8 * i + 8)));
    __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(gv + 8 * i))), 16));
    __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(gv + 8 * i + 8))), 16));
    a0 = _mm256_fmadd_ps(w0, _mm256_i32gather_ps(x, i0, 4), a0);
    a1 = _mm256_fmadd_ps(w1, _mm256_i32gather_ps(x, i1, 4), a1);
  }
  float s = hsum(_mm256_add_ps(a0, a1));
  for (int64_t j = 8 * i; j < r.nnz; ++j) { uint32_t b = uint32_t(gv[j]) << 16; float w; memcpy(&w, &b, 4); s += w * x[gi[j]]; }
  return s; }

T2 static inline __m256 ld(const uint16_t* p) { return _mm256_castsi256_ps(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p))); }
T2 static inline __m256 E(const uint16_t* p, __m256i c0) { return _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p)), c0)); }
// ablations of P12 (wrong results by design)
template <int MODE>
T2 float rowA(const Row& r, const float* x, int64_t nblk) {
  const uint8_t* meta = r.m12; const uint16_t* v = r.v;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  const __m256i c0 = _mm256_load_si256((const __m256i*)T.shuf[0xb5]);
  for (int64_t k = 0; k < nblk; ++k) {
    _mm_prefetch((const char*)(v + 1536), _MM_HINT_T0);
    const uint8_t* b = meta + 12 * k; uint16_t ro[4]; memcpy(ro, b, 8);
    const float* xk = x + 32 * k;
    if (MODE == 1) { ro[0] = ro[1] = ro[2] = ro[3] = 0xb5 * 32; }
    int o1 = b[8], o2 = b[9], o3 = b[10];
    if (MODE == 2) { o1 = 2; o2 = 5; o3 = 7; }
    if (MODE == 3) {  // no shuffle: raw broadcast as weights
      a0 = _mm256_fmadd_ps(ld(v), _mm256_loadu_ps(xk), a0);
      a1 = _mm256_fmadd_ps(ld(v + o1), _mm256_loadu_ps(xk + 8), a1);
      a2 = _mm256_fmadd_ps(ld(v + o2), _mm256_loadu_ps(xk + 16), a2);
      a3 = _mm256_fmadd_ps(ld(v + o3), _mm256_loadu_ps(xk + 24), a3);
    } else if (MODE == 4) {  // shuffle with a register control (no table load)
      a0 = _mm256_fmadd_ps(E(v, c0), _mm256_loadu_ps(xk), a0);
      a1 = _mm256_fmadd_ps(E(v + o1, c0), _mm256_loadu_ps(xk + 8), a1);
      a2 = _mm256_fmadd_ps(E(v + o2, c0), _mm256_loadu_ps(xk + 16), a2);
      a3 = _mm256_fmadd_ps(E(v + o3, c0), _mm256_loadu_ps(xk + 24), a3);
    } else if (MODE == 5) {  // 8 accumulators, alternate by block parity
      if (k & 1) {
      a4 = _mm256_fmadd_ps(exo(v, ro[0]), _mm256_loadu_ps(xk), a4);
      a5 = _mm256_fmadd_ps(exo(v + o1, ro[1]), _mm256_loadu_ps(xk + 8), a5);
      a6 = _mm256_fmadd_ps(exo(v + o2, ro[2]), _mm256_loadu_ps(xk + 16), a6);
      a7 = _mm256_fmadd_ps(exo(v + o3, ro[3]), _mm256_loadu_ps(xk + 24), a7);
      } else {
      a0 = _mm256_fmadd_ps(exo(v, ro[0]), _mm256_loadu_ps(xk), a0);
      a1 = _mm256_fmadd_ps(exo(v + o1, ro[1]), _mm256_loadu_ps(xk + 8), a1);
      a2 = _mm256_fmadd_ps(exo(v + o2, ro[2]), _mm256_loadu_ps(xk + 16), a2);
      a3 = _mm256_fmadd_ps(exo(v + o3, ro[3]), _mm256_loadu_ps(xk + 24), a3);
      }
    } else if (MODE == 6) {  // no FMA: xor-accumulate the expanded weights (no x loads)
      a0 = _mm256_xor_ps(exo(v, ro[0]), a0);
      a1 = _mm256_xor_ps(exo(v + o1, ro[1]), a1);
      a2 = _mm256_xor_ps(exo(v + o2, ro[2]), a2);
      a3 = _mm256_xor_ps(exo(v + o3, ro[3]), a3);
    } else {
      a0 = _mm256_fmadd_ps(exo(v, ro[0]), _mm256_loadu_ps(xk), a0);
      a1 = _mm256_fmadd_ps(exo(v + o1, ro[1]), _mm256_loadu_ps(xk + 8), a1);
      a2 = _mm256_fmadd_ps(exo(v + o2, ro[2]), _mm256_loadu_ps(xk + 16), a2);
      a3 = _mm256_fmadd_ps(exo(v + o3, ro[3]), _mm256_loadu_ps(xk + 24), a3);
    }
    v += (MODE == 7) ? 10 : b[11];
  }
  a0 = _mm256_add_ps(a0, a4); a1 = _mm256_add_ps(a1, a5); a2 = _mm256_add_ps(a2, a6); a3 = _mm256_add_ps(a3, a7);
  return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))); }

// R2: N4 on two rows at once, each x load feeding both rows' FMAs (4 accumulators per row)
T2 void rowR2(const Row& r0, const Row& r1, const float* x, int64_t nblk, float* y) {
  const uint8_t* ma = r0.meta; const uint8_t* mb = r1.meta; const uint16_t* va = r0.v; const uint16_t* vb = r1.v;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  for (int64_t k = 0; k < nblk; ++k) {
    _mm_prefetch((const char*)(va + 1536), _MM_HINT_T0);
    _mm_prefetch((const char*)(vb + 1536), _MM_HINT_T0);
    uint32_t m, n; memcpy(&m, ma + 4 * k, 4); memcpy(&n, mb + 4 * k, 4);
    const float* xk = x + 32 * k;
    int o1 = _mm_popcnt_u32(m & 0xff), o2 = _mm_popcnt_u32(m & 0xffff), o3 = _mm_popcnt_u32(m & 0xffffff);
    int p1 = _mm_popcnt_u32(n & 0xff), p2 = _mm_popcnt_u32(n & 0xffff), p3 = _mm_popcnt_u32(n & 0xffffff);
    __m256 x0 = _mm256_loadu_ps(xk), x1 = _mm256_loadu_ps(xk + 8), x2 = _mm256_loadu_ps(xk + 16), x3 = _mm256_loadu_ps(xk + 24);
    a0 = _mm256_fmadd_ps(exo(va, (m << 5) & 0x1fe0), x0, a0);
    b0 = _mm256_fmadd_ps(exo(vb, (n << 5) & 0x1fe0), x0, b0);
    a1 = _mm256_fmadd_ps(exo(va + o1, (m >> 3) & 0x1fe0), x1, a1);
    b1 = _mm256_fmadd_ps(exo(vb + p1, (n >> 3) & 0x1fe0), x1, b1);
    a2 = _mm256_fmadd_ps(exo(va + o2, (m >> 11) & 0x1fe0), x2, a2);
    b2 = _mm256_fmadd_ps(exo(vb + p2, (n >> 11) & 0x1fe0), x2, b2);
    a3 = _mm256_fmadd_ps(exo(va + o3, (m >> 19) & 0x1fe0), x3, a3);
    b3 = _mm256_fmadd_ps(exo(vb + p3, (n >> 19) & 0x1fe0), x3, b3);
    va += _mm_popcnt_u32(m); vb += _mm_popcnt_u32(n);
  }
  y[0] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  y[1] = hsum(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3))); }
// D1 (sparsity 0 only): the row's K bf16 values read densely, no mask (vpmovzxwd + shift + FMA per 8 inputs) --
// what a dedicated dense loop for a bf16 LM head would do instead of N4 over all-ones masks
T2 static inline __m256 widen8(const uint16_t* v) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)v)), 16)); }
T2 float rowD1(const Row& r, const float* x, int64_t nblk) {
  const uint16_t* v = r.v;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t k = 0; k < nblk; ++k, v += 32) {
    const float* xk = x + 32 * k;
    a0 = _mm256_fmadd_ps(widen8(v), _mm256_loadu_ps(xk), a0);
    a1 = _mm256_fmadd_ps(widen8(v + 8), _mm256_loadu_ps(xk + 8), a1);
    a2 = _mm256_fmadd_ps(widen8(v + 16), _mm256_loadu_ps(xk + 16), a2);
    a3 = _mm256_fmadd_ps(widen8(v + 24), _mm256_loadu_ps(xk + 24), a3);
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))); }
using Fn = float (*)(const Row&, const float*, int64_t);
int main(int argc, char** argv) {
  if (argc != 5) { fprintf(stderr, "usage: %s N K sparsity repeats  (N even, K a multiple of 32 below 65536)\n", argv[0]); return 2; }
  int64_t N = atoll(argv[1]), K = atoll(argv[2]); double sp = atof(argv[3]); int reps = atoi(argv[4]);
  if (N < 2 || N % 2 || K < 32 || K % 32 || K >= 65536 || !(sp >= 0 && sp < 1) || reps < 1) {
    fprintf(stderr, "N must be even (R2 takes rows in pairs), K a multiple of 32 below 65536 (G16's u16 column "
                    "index), 0 <= sparsity < 1, repeats >= 1\n");
    return 2;
  }
  int64_t nblk = K / 32, stride = K / 8;
  std::mt19937 g(1); std::uniform_real_distribution<float> u(0, 1); std::normal_distribution<float> nd;
  std::vector<uint8_t> meta(N * stride), m8(N * nblk * 8), m12(N * nblk * 12); std::vector<int64_t> rp(N + 1);
  std::vector<uint16_t> vals, gi; std::vector<float> x(K); for (auto& e : x) e = nd(g);
  std::vector<double> ref(N);
  for (int64_t o = 0; o < N; ++o) {
    rp[o] = vals.size(); double s = 0;
    for (int64_t j = 0; j < K; ++j) if (u(g) >= sp) {
      meta[o * stride + j / 8] |= 1 << (j % 8); gi.push_back(j);
      float w = nd(g); uint32_t bits; memcpy(&bits, &w, 4); uint16_t h = bits >> 16; vals.push_back(h);
      uint32_t b2 = uint32_t(h) << 16; float wf; memcpy(&wf, &b2, 4); s += double(wf) * x[j]; }
    ref[o] = s;
    for (int64_t k = 0; k < nblk; ++k) {
      uint32_t m; memcpy(&m, &meta[o * stride + 4 * k], 4);
      uint8_t* b = &m8[(o * nblk + k) * 8]; memcpy(b, &m, 4);
      b[4] = __builtin_popcount(m & 0xff); b[5] = __builtin_popcount(m & 0xffff); b[6] = __builtin_popcount(m & 0xffffff); b[7] = __builtin_popcount(m);
      uint8_t* c = &m12[(o * nblk + k) * 12];
      for (int q = 0; q < 4; ++q) { uint16_t ro = ((m >> (8 * q)) & 0xff) * 32; memcpy(c + 2 * q, &ro, 2); }
      c[8] = b[4]; c[9] = b[5]; c[10] = b[6]; c[11] = b[7]; }
  }
  rp[N] = vals.size(); for (int i = 0; i < 64; ++i) { vals.push_back(0); gi.push_back(0); }
  std::vector<Row> rows(N);
  for (int64_t o = 0; o < N; ++o) rows[o] = {&meta[o * stride], &m8[o * nblk * 8], &m12[o * nblk * 12], &vals[rp[o]], &gi[rp[o]], &vals[rp[o]], rp[o + 1] - rp[o]};
  double nnzb = vals.size() * 2.0;
  struct V { const char* name; Fn f; double mb; };
  V vs[] = {{"N4", rowN4, (nnzb + meta.size()) / 1e6}, {"P8", rowP8, (nnzb + m8.size()) / 1e6},
            {"P12", rowP12, (nnzb + m12.size()) / 1e6}, {"G16", rowG, (nnzb * 2) / 1e6}, {"A1 fixed table row", rowA<1>, 0}, {"A2 fixed offsets", rowA<2>, 0}, {"A3 no shuffle", rowA<3>, 0}, {"A4 reg control", rowA<4>, 0}, {"A5 8 acc", rowA<5>, 0}, {"A6 no fma/x", rowA<6>, 0}, {"A7 fixed v step", rowA<7>, 0}, {"A0 =P12", rowA<0>, 0}, {"R2", nullptr, (nnzb + meta.size()) / 1e6}, {"D1 dense rows", rowD1, nnzb / 1e6}};
  int nv = sizeof(vs) / sizeof(vs[0]) - (sp == 0 ? 0 : 1);  // D1 only where every row is dense
  std::vector<float> y(N); std::vector<std::vector<double>> t(nv); std::vector<double> err(nv);
  for (int r = 0; r < reps + 1; ++r)
    for (int i = 0; i < nv; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      if (vs[i].f) {
#pragma omp parallel for schedule(static)
        for (int64_t o = 0; o < N; ++o) y[o] = vs[i].f(rows[o], x.data(), nblk); }
      else {
#pragma omp parallel for schedule(static)
        for (int64_t o = 0; o < N; o += 2) rowR2(rows[o], rows[o + 1], x.data(), nblk, &y[o]); }
      double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (r) t[i].push_back(dt);
      if (r == 0) { double e = 0, sc = 0;
        for (int64_t o = 0; o < N; ++o) { e = std::max(e, std::fabs(y[o] - ref[o])); sc = std::max(sc, std::fabs(ref[o])); }
        err[i] = e / sc; } }
  printf("| variant | median ms | bytes MB | GB/s | vs N4 | max rel err |\n|---|---|---|---|---|---|\n");
  std::vector<double> med(nv);
  for (int i = 0; i < nv; ++i) { std::sort(t[i].begin(), t[i].end()); med[i] = t[i][t[i].size() / 2]; }
  for (int i = 0; i < nv; ++i)
    printf("| %s | %.3f | %.2f | %.1f | %.2fx | %.1e |\n", vs[i].name, med[i] * 1e3, vs[i].mb, vs[i].mb / 1e3 / med[i], med[0] / med[i], err[i]);
}
