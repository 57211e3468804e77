// Kernel lab: the decode attention's AVX2 loop streaming a bf16 KV cache from memory (standalone).
//
//   g++ -O3 -std=c++17 -fopenmp -o /tmp/attention_lab benchmarks/attention_lab.cpp
//   OMP_NUM_THREADS=1 /tmp/attention_lab 8 32 2048 128 5    # layers, heads (one query row each), positions, head
//                                                            # size, repetitions
//
// Every layer's cache is read once per pass, as a decode step does (8 x 32 x 2048 x 128 bf16 keys and values are
// 537 MB: far beyond the caches). Variants, timed interleaved (best of the repetitions): "A blocked" = a one-query-
// row copy of the blocked loop of csrc/decode_attention.cpp (four positions per score pass, P·V in 32-output
// chunks; no row pairs, no mask, S a multiple of 4; the exp cut off at -80 as in aca3976), "A pf8" / "A pf16" = the same with software prefetch of the key / value rows 8 or 16 positions ahead
// (pf16 is what aca3976 ships), "R onepassV" = P·V over the whole head in one pass, "Z avx512" = 16-wide
// AVX-512 scores and P·V, "sum" = a plain vector read of the same bytes (no arithmetic, no prefetch). GB/s =
// cache bytes / time. Results: benchmarks/results/attention_lab.md.
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>
#define A2 __attribute__((target("avx2,fma")))
#define A5 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
A2 inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
A2 inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
A2 inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-80.f);
  const __m256 dead = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
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
A2 float softmax(float* s, int64_t n) {
  __m256 mv = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + i));
  float m8[8]; _mm256_storeu_ps(m8, mv);
  float mx = -INFINITY; for (float t : m8) mx = std::max(mx, t);
  for (; i < n; ++i) mx = std::max(mx, s[i]);
  __m256 sum = _mm256_setzero_ps(); const __m256 mxv = _mm256_set1_ps(mx);
  for (i = 0; i + 8 <= n; i += 8) { __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), mxv)); _mm256_storeu_ps(s + i, e); sum = _mm256_add_ps(sum, e); }
  float s8[8]; _mm256_storeu_ps(s8, sum); float t = 0; for (float u : s8) t += u;
  for (; i < n; ++i) { s[i] = std::exp(s[i] - mx); t += s[i]; }
  return t;
}
// variant A: the blocked AVX2 loop, one query row; PF: prefetch distance in positions (0 = none)
template <int PF>
A2 void scores_a(const float* q, const uint16_t* k, int64_t S, int64_t D, float* s) {
  for (int64_t i = 0; i + 4 <= S; i += 4) {
    if (PF) for (int p = 0; p < 4; ++p) for (int64_t b = 0; b < D * 2; b += 64) _mm_prefetch((const char*)(k + (i + PF + p) * D) + b, _MM_HINT_T0);
    const uint16_t* kr[4] = {k + i * D, k + (i + 1) * D, k + (i + 2) * D, k + (i + 3) * D};
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t c = 0; c < D; c += 8) {
      const __m256 qv = _mm256_loadu_ps(q + c);
      for (int p = 0; p < 4; ++p) acc[p] = _mm256_fmadd_ps(qv, load8(kr[p] + c), acc[p]);
    }
    _mm_storeu_ps(s + i, hsum4(acc[0], acc[1], acc[2], acc[3]));
  }
}
template <int PF>
A2 void attend_a(const float* q, const uint16_t* k, const uint16_t* v, int64_t S, int64_t D, float* out, float* s) {
  scores_a<PF>(q, k, S, D, s);
  const float inv = 1.f / softmax(s, S);
  for (int64_t c = 0; c < D; c += 32) {
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t j = 0; j < S; ++j) {
      if (PF && c == 0) for (int64_t b = 0; b < D * 2; b += 64) _mm_prefetch((const char*)(v + (j + PF) * D) + b, _MM_HINT_T0);
      const uint16_t* vr = v + j * D + c; const __m256 w = _mm256_broadcast_ss(s + j);
      for (int t = 0; t < 4; ++t) a[t] = _mm256_fmadd_ps(w, load8(vr + 8 * t), a[t]);
    }
    for (int t = 0; t < 4; ++t) _mm256_storeu_ps(out + c + 8 * t, _mm256_mul_ps(a[t], _mm256_set1_ps(inv)));
  }
}
// variant R: P·V over all of Dv at once (D=128: 16 accumulators... use two halves interleaved per row: 8+8) -> one pass over V
A2 void attend_r(const float* q, const uint16_t* k, const uint16_t* v, int64_t S, int64_t D, float* out, float* s) {
  scores_a<0>(q, k, S, D, s);
  const float inv = 1.f / softmax(s, S);
  // whole row of V per position: 16 accumulators for D=128 (no spare registers: w from memory)
  __m256 a[16];
  for (int t = 0; t < 16; ++t) a[t] = _mm256_setzero_ps();
  for (int64_t j = 0; j < S; ++j) {
    const uint16_t* vr = v + j * D; const __m256 w = _mm256_broadcast_ss(s + j);
    for (int t = 0; t < D / 8; ++t) a[t] = _mm256_fmadd_ps(w, load8(vr + 8 * t), a[t]);
  }
  for (int t = 0; t < D / 8; ++t) _mm256_storeu_ps(out + 8 * t, _mm256_mul_ps(a[t], _mm256_set1_ps(inv)));
}
// variant Z: AVX-512 scores (16 wide) and P·V (D=128 -> 8 zmm accumulators, one pass)
A5 inline __m512 load16(const uint16_t* p) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16)); }
A5 void attend_z(const float* q, const uint16_t* k, const uint16_t* v, int64_t S, int64_t D, float* out, float* s) {
  int64_t i = 0;
  for (; i + 4 <= S; i += 4) {
    const uint16_t* kr[4] = {k + i * D, k + (i + 1) * D, k + (i + 2) * D, k + (i + 3) * D};
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c = 0; c < D; c += 16) {
      const __m512 qv = _mm512_loadu_ps(q + c);
      for (int p = 0; p < 4; ++p) acc[p] = _mm512_fmadd_ps(qv, load16(kr[p] + c), acc[p]);
    }
    for (int p = 0; p < 4; ++p) s[i + p] = _mm512_reduce_add_ps(acc[p]);
  }
  const float inv = 1.f / softmax(s, S);
  __m512 a[8];
  for (int t = 0; t < 8; ++t) a[t] = _mm512_setzero_ps();
  for (int64_t j = 0; j < S; ++j) {
    const uint16_t* vr = v + j * D; const __m512 w = _mm512_set1_ps(s[j]);
    for (int t = 0; t < D / 16; ++t) a[t] = _mm512_fmadd_ps(w, load16(vr + 16 * t), a[t]);
  }
  for (int t = 0; t < D / 16; ++t) _mm512_storeu_ps(out + 16 * t, _mm512_mul_ps(a[t], _mm512_set1_ps(inv)));
}
A2 float sum_bytes(const uint16_t* p, int64_t n) {
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) { a = _mm256_add_ps(a, _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i*)(p + i)))); }
  float t[8]; _mm256_storeu_ps(t, _mm256_add_ps(a, b)); return t[0];
}
int main(int argc, char** argv) {
  const int64_t L = atoi(argv[1]), H = atoi(argv[2]), S = atoi(argv[3]), D = atoi(argv[4]);
  const int reps = argc > 5 ? atoi(argv[5]) : 5;
  const int64_t per = H * S * D;
  std::vector<uint16_t> K(L * per), V(L * per);
  for (size_t i = 0; i < K.size(); ++i) { float f = (float)(rand() % 2000 - 1000) / 1000.f; uint32_t u; memcpy(&u, &f, 4); K[i] = u >> 16; f = (float)(rand() % 2000 - 1000) / 1000.f; memcpy(&u, &f, 4); V[i] = u >> 16; }
  std::vector<float> q(H * D), out(H * D);
  for (auto& x : q) x = (float)(rand() % 2000 - 1000) / 4000.f;
  const char* names[] = {"A blocked", "A pf8", "A pf16", "R onepassV", "Z avx512", "sum"};
  double best[6]; for (double& b : best) b = 1e30;
  float ref[4096];
  for (int r = 0; r < reps; ++r)
    for (int vi = 0; vi < 6; ++vi) {
      auto t0 = std::chrono::steady_clock::now();
      volatile float sink = 0;
      for (int64_t l = 0; l < L; ++l) {
        #pragma omp parallel for schedule(static)
        for (int64_t h = 0; h < H; ++h) {
          std::vector<float> s(S + 64);
          const uint16_t* k = K.data() + l * per + h * S * D; const uint16_t* v = V.data() + l * per + h * S * D;
          float* o = out.data() + h * D;
          switch (vi) {
            case 0: attend_a<0>(q.data() + h * D, k, v, S, D, o, s.data()); break;
            case 1: attend_a<8>(q.data() + h * D, k, v, S, D, o, s.data()); break;
            case 2: attend_a<16>(q.data() + h * D, k, v, S, D, o, s.data()); break;
            case 3: attend_r(q.data() + h * D, k, v, S, D, o, s.data()); break;
            case 4: attend_z(q.data() + h * D, k, v, S, D, o, s.data()); break;
            case 5: o[0] = sum_bytes(k, S * D) + sum_bytes(v, S * D); break;
          }
        }
      }
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      best[vi] = std::min(best[vi], ms);
      if (r == 0 && vi == 0) for (int i = 0; i < H * D && i < 4096; ++i) ref[i] = out[i];
      if (r == 0 && vi > 0 && vi < 5) { double e = 0; for (int i = 0; i < H * D && i < 4096; ++i) e = std::max(e, (double)std::fabs(out[i] - ref[i])); if (e > 1e-4) printf("variant %s differs: %g\n", names[vi], e); }
    }
  const double mb = 2.0 * L * per * 2 / 1e6;
  for (int vi = 0; vi < 6; ++vi) printf("%-12s %8.2f ms  %6.1f GB/s  vs A %.2fx\n", names[vi], best[vi], mb / best[vi], best[0] / best[vi]);
}
