// Prefill kernel lab: zero-skipping bf16 GEMM variants (see README.md). Throw-away code, not the package's kernel.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,bmi,bmi2,popcnt,avx2,fma")))
// combos of a group of 4: 0:(0,1) 1:(0,2) 2:(0,3) 3:(1,2) 4:(1,3) 5:(2,3)
TGT static inline __m512i exp16(uint32_t m, const uint16_t*& v) {
  __m512i r = _mm512_loadu_si512((const void*)v);
  asm("" : "+v"(r));
  v += _mm_popcnt_u32(m);
  return _mm512_maskz_expand_epi16((__mmask32)m, r);
}


// ---- A: pair-skip. list of (byte offset of pair row in xP, w pair)
TGT int listA(const uint8_t* meta, const uint16_t* v, int64_t nblk, int32_t pstride, int32_t* off, uint32_t* w) {
  const __m512i iota = _mm512_setr_epi32(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15);
  int cnt = 0;
  for (int64_t b = 0; b < nblk; ++b) {
    uint32_t m; std::memcpy(&m, meta + 4*b, 4);
    __m512i e = exp16(m, v);
    __mmask16 pm = _mm512_test_epi32_mask(e, e);
    __m512i idx = _mm512_mullo_epi32(_mm512_add_epi32(iota, _mm512_set1_epi32(int(b*16))), _mm512_set1_epi32(pstride));
    _mm512_storeu_si512(w + cnt, _mm512_maskz_compress_epi32(pm, e));
    _mm512_storeu_si512(off + cnt, _mm512_maskz_compress_epi32(pm, idx));
    cnt += _mm_popcnt_u32(pm);
  }
  return cnt;
}
template <int NZ>
TGT void rowA(const int32_t* off, const uint32_t* w, int cnt, const char* xP, float* out) {
  __m512 acc[NZ];
  for (int z = 0; z < NZ; ++z) acc[z] = _mm512_setzero_ps();
  for (int i = 0; i < cnt; ++i) {
    __m512bh wb = (__m512bh)_mm512_set1_epi32(int(w[i]));
    const char* xp = xP + off[i];
    for (int z = 0; z < NZ; ++z) acc[z] = _mm512_dpbf16_ps(acc[z], wb, (__m512bh)_mm512_loadu_si512(xp + 64*z));
  }
  for (int z = 0; z < NZ; ++z) _mm512_storeu_ps(out + 16*z, acc[z]);
}
// x: bf16 [B, K32]; returns yT fp32 [N, Tp]
torch::Tensor mmA(torch::Tensor x, torch::Tensor meta, torch::Tensor values, torch::Tensor row_ptr, int64_t n, int64_t k) {
  int64_t k32 = (k+31)/32*32, B = x.size(0), Tp = (B+15)/16*16, P = k32/2;
  auto xi = torch::zeros({Tp, P}, torch::kInt32);
  xi.narrow(0,0,B).copy_(x.view(torch::kInt32));
  auto xP = xi.t().contiguous();  // [P, Tp]
  auto yT = torch::empty({n, Tp}, torch::kFloat32);
  const uint8_t* mp = meta.data_ptr<uint8_t>(); const uint16_t* vp = (const uint16_t*)values.data_ptr(); const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const char* xpp = (const char*)xP.data_ptr<int32_t>(); float* yp = yT.data_ptr<float>();
  int64_t stride = k32/8;
  at::parallel_for(0, n, 16, [&](int64_t o0, int64_t o1) {
    std::vector<int32_t> off(P + 16); std::vector<uint32_t> w(P + 16);
    for (int64_t o = o0; o < o1; ++o) {
      int cnt = listA(mp + o*stride, vp + rp[o], k32/32, int32_t(Tp*4), off.data(), w.data());
      int64_t t = 0;
      for (; t + 128 <= Tp; t += 128) rowA<8>(off.data(), w.data(), cnt, xpp + t*4, yp + o*Tp + t);
      for (; t + 64 <= Tp; t += 64) rowA<4>(off.data(), w.data(), cnt, xpp + t*4, yp + o*Tp + t);
      for (; t + 16 <= Tp; t += 16) rowA<1>(off.data(), w.data(), cnt, xpp + t*4, yp + o*Tp + t);
    }
  });
  return yT;
}

// ---- B: kept weights in pairs, inputs interleaved with vpunpck{l,h}wd (xT bf16 [K32][tokens])
TGT static inline int buildB(uint32_t m, int64_t blk, int32_t kstride, int32_t* off) {
  const __m512i iota = _mm512_setr_epi32(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15);
  __m512i i0 = _mm512_mullo_epi32(_mm512_add_epi32(iota, _mm512_set1_epi32(int(blk*32))), _mm512_set1_epi32(kstride));
  __m512i i1 = _mm512_add_epi32(i0, _mm512_set1_epi32(16*kstride));
  int c0 = _mm_popcnt_u32(m & 0xffff);
  _mm512_storeu_si512(off, _mm512_maskz_compress_epi32((__mmask16)(m & 0xffff), i0));
  _mm512_storeu_si512(off + c0, _mm512_maskz_compress_epi32((__mmask16)(m >> 16), i1));
  return c0 + _mm_popcnt_u32(m >> 16);
}
template <int NG>
TGT static inline void consumeB(const int32_t* off, const uint16_t* v, int cnt, const char* xT, __m512* acc) {
  int i = 0;
  for (; i + 1 < cnt; i += 2) {
    uint32_t wp; std::memcpy(&wp, v + i, 4);
    __m512bh wb = (__m512bh)_mm512_set1_epi32(int(wp));
    const char* a = xT + off[i]; const char* b = xT + off[i+1];
    for (int g = 0; g < NG; ++g) {
      __m512i xa = _mm512_loadu_si512(a + 64*g), xb = _mm512_loadu_si512(b + 64*g);
      acc[2*g] = _mm512_dpbf16_ps(acc[2*g], wb, (__m512bh)_mm512_unpacklo_epi16(xa, xb));
      acc[2*g+1] = _mm512_dpbf16_ps(acc[2*g+1], wb, (__m512bh)_mm512_unpackhi_epi16(xa, xb));
    }
  }
  if (i < cnt) {
    __m512bh wb = (__m512bh)_mm512_set1_epi32(int(v[i]));
    const char* a = xT + off[i];
    for (int g = 0; g < NG; ++g) {
      __m512i xa = _mm512_loadu_si512(a + 64*g);
      acc[2*g] = _mm512_dpbf16_ps(acc[2*g], wb, (__m512bh)_mm512_unpacklo_epi16(xa, xa));
      acc[2*g+1] = _mm512_dpbf16_ps(acc[2*g+1], wb, (__m512bh)_mm512_unpackhi_epi16(xa, xa));
    }
  }
}

// acc[2g] / acc[2g + 1] hold tokens {8L + i} / {8L + 4 + i} (lane 4L + i) of token group g: store in order
template <int NG>
TGT static inline void store_tokens(const __m512* acc, float* dst) {
  const __m512i p0 = _mm512_setr_epi32(0,1,2,3,16,17,18,19,4,5,6,7,20,21,22,23);
  const __m512i p1 = _mm512_setr_epi32(8,9,10,11,24,25,26,27,12,13,14,15,28,29,30,31);
  for (int g = 0; g < NG; ++g) {
    _mm512_storeu_ps(dst + 32*g, _mm512_permutex2var_ps(acc[2*g], p0, acc[2*g+1]));
    _mm512_storeu_ps(dst + 32*g + 16, _mm512_permutex2var_ps(acc[2*g], p1, acc[2*g+1]));
  }
}


template <int NG>
TGT static inline void group(const int32_t* off, const uint16_t* v, int cnt, const char* xt, float* dst) {
  __m512 acc[2 * NG];
  for (int z = 0; z < 2 * NG; ++z) acc[z] = _mm512_setzero_ps();
  consumeB<NG>(off, v, cnt, xt, acc);
  store_tokens<NG>(acc, dst);
}

// unblocked B over the whole row; maskbits != -1 confines the input offsets to a window (wrong results: the
// compute ceiling with L1/L2-resident inputs)
torch::Tensor mmB(torch::Tensor x, torch::Tensor meta, torch::Tensor values, torch::Tensor row_ptr, int64_t n, int64_t k,
                  int64_t maskbits) {
  int64_t k32 = (k + 31) / 32 * 32, B = x.size(0), Tp = (B + 31) / 32 * 32;
  auto xs = torch::zeros({Tp, k32}, torch::kBFloat16);
  xs.narrow(0, 0, B).narrow(1, 0, k).copy_(x);
  auto xT = xs.t().contiguous();  // [K32, Tp]
  auto yT = torch::empty({n, Tp}, torch::kFloat32);
  const uint8_t* mp = meta.data_ptr<uint8_t>(); const uint16_t* vp = (const uint16_t*)values.data_ptr(); const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const char* xtp = (const char*)xT.data_ptr(); float* yp = yT.data_ptr<float>();
  const int64_t stride = k32 / 8;
  const int32_t msk = int32_t(maskbits);
  at::parallel_for(0, n, 16, [&](int64_t o0, int64_t o1) {
    std::vector<int32_t> off(k32 + 32);
    for (int64_t o = o0; o < o1; ++o) {
      int cnt = 0;
      for (int64_t b = 0; b < k32 / 32; ++b) {
        uint32_t m; std::memcpy(&m, mp + o * stride + 4 * b, 4);
        cnt += buildB(m, b, int32_t(Tp * 2), off.data() + cnt);
      }
      if (maskbits != -1) for (int i = 0; i < cnt; ++i) off[i] &= msk;
      int64_t t = 0;
      for (; t + 128 <= Tp; t += 128) group<4>(off.data(), vp + rp[o], cnt, xtp + t * 2, yp + o * Tp + t);
      for (; t + 64 <= Tp; t += 64) group<2>(off.data(), vp + rp[o], cnt, xtp + t * 2, yp + o * Tp + t);
      for (; t + 32 <= Tp; t += 32) group<1>(off.data(), vp + rp[o], cnt, xtp + t * 2, yp + o * Tp + t);
    }
  });
  return yT;
}

template <int NG>
TGT void rowsB(const uint8_t* meta, const uint16_t* vals, const int64_t* rp, int64_t stride_m, int64_t nblk,
              const char* xT, int64_t nch, float* yT, int64_t ldy, int64_t o0, int64_t o1, int64_t R, int64_t KB) {
  constexpr int TC = 32 * NG;
  const int64_t chunk_bytes = nblk * 32 * TC * 2;
  std::vector<float> yacc(R * TC);
  std::vector<const uint16_t*> vc(R);
  std::vector<int32_t> off(32 * KB + 32);
  for (int64_t c = 0; c < nch; ++c) {
    const char* xc = xT + c * chunk_bytes;
    for (int64_t r0 = o0; r0 < o1; r0 += R) {
      const int64_t r1 = std::min(o1, r0 + R);
      for (int64_t o = r0; o < r1; ++o) vc[o - r0] = vals + rp[o];
      for (int64_t b0 = 0; b0 < nblk; b0 += KB) {
        const int64_t b1 = std::min(nblk, b0 + KB);
        for (int64_t o = r0; o < r1; ++o) {
          __m512 acc[2*NG];
          float* ya = yacc.data() + (o - r0) * TC;
          for (int z = 0; z < 2*NG; ++z) acc[z] = b0 ? _mm512_loadu_ps(ya + 16 * z) : _mm512_setzero_ps();
          const uint8_t* mrow = meta + o * stride_m;
          int cnt = 0;
          for (int64_t b = b0; b < b1; ++b) {
            uint32_t m; std::memcpy(&m, mrow + 4 * b, 4);
            cnt += buildB(m, b, TC * 2, off.data() + cnt);
          }
          const uint16_t* v = vc[o - r0];
          consumeB<NG>(off.data(), v, cnt, xc, acc);
          vc[o - r0] = v + cnt;
          if (b1 == nblk) {
            store_tokens<NG>(acc, yT + o * ldy + c * TC);
          } else {
            for (int z = 0; z < 2*NG; ++z) _mm512_storeu_ps(ya + 16 * z, acc[z]);
          }
        }
      }
    }
  }
}
using RowsFn = void (*)(const uint8_t*, const uint16_t*, const int64_t*, int64_t, int64_t, const char*, int64_t,
                       float*, int64_t, int64_t, int64_t, int64_t, int64_t);

// yT [N, chunks x tc] from a prepared input (per chunk of tc tokens) and a blocked row kernel
torch::Tensor run_blocked(const torch::Tensor& xprep, const torch::Tensor& meta, const torch::Tensor& values,
                          const torch::Tensor& row_ptr, int64_t n, int64_t k, int64_t B, int64_t tc, int64_t R,
                          int64_t KB, RowsFn fn) {
  const int64_t k32 = (k + 31) / 32 * 32, nch = (B + tc - 1) / tc, Bp = nch * tc;
  auto yT = torch::empty({n, Bp}, torch::kFloat32);
  const uint8_t* mp = meta.data_ptr<uint8_t>(); const uint16_t* vp = (const uint16_t*)values.data_ptr(); const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const char* xcp = (const char*)xprep.data_ptr(); float* yp = yT.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t o0, int64_t o1) { fn(mp, vp, rp, k32 / 8, k32 / 32, xcp, nch, yp, Bp, o0, o1, R, KB); });
  return yT;
}

torch::Tensor mmB2(torch::Tensor x, torch::Tensor meta, torch::Tensor values, torch::Tensor row_ptr, int64_t n, int64_t k,
                  int64_t tc, int64_t R, int64_t KB) {
  int64_t k32 = (k + 31) / 32 * 32, B = x.size(0), nch = (B + tc - 1) / tc, Bp = nch * tc;
  auto xs = torch::zeros({Bp, k32}, torch::kBFloat16);
  xs.narrow(0, 0, B).narrow(1, 0, k).copy_(x);
  auto xT = xs.view({nch, tc, k32}).permute({0, 2, 1}).contiguous();
  return run_blocked(xT, meta, values, row_ptr, n, k, B, tc, R, KB, tc == 128 ? rowsB<4> : tc == 64 ? rowsB<2> : rowsB<1>);
}
// ---- C: all six pairs of each group of four pre-interleaved
// combos of a group of 4: 0:(0,1) 1:(0,2) 2:(0,3) 3:(1,2) 4:(1,3) 5:(2,3)
struct CT { alignas(64) int32_t c0[16]; alignas(64) int32_t c1[16]; alignas(64) int32_t pos[16]; };
static CT make_ct() {
  CT t{};
  const int lo[6] = {0,0,0,1,1,2}, hi[6] = {1,2,3,2,3,3};
  for (int c = 0; c < 16; ++c) t.pos[c] = c < 6 ? (lo[c] | (hi[c] << 16)) : 0;
  for (int n = 0; n < 16; ++n) {
    int P[4], k = 0;
    for (int a = 0; a < 4; ++a) if (n >> a & 1) P[k++] = a;
    t.c0[n] = t.c1[n] = -1;
    if (k == 1) t.c0[n] = P[0] < 2 ? 0 : 5;
    else if (k == 2) { for (int c = 0; c < 6; ++c) if (lo[c] == P[0] && hi[c] == P[1]) t.c0[n] = c; }
    else if (k >= 3) { t.c0[n] = 0; t.c1[n] = 5; }
  }
  return t;
}
static const CT C = make_ct();
// entries of one 32-input block: w pairs and byte offsets of the combo rows in the chunk's xC
TGT static inline int build(uint32_t m, const uint16_t*& v, int64_t blk, int32_t stride, uint32_t* w, int32_t* off) {
  const __m512i shifts = _mm512_setr_epi32(0,0,4,4,8,8,12,12,16,16,20,20,24,24,28,28);
  const __m512i sbit = _mm512_setr_epi32(0,16,0,16,0,16,0,16,0,16,0,16,0,16,0,16);
  const __m512i g4 = _mm512_setr_epi32(0,0,0x40004,0x40004,0x80008,0x80008,0xc000c,0xc000c,0x100010,0x100010,0x140014,0x140014,0x180018,0x180018,0x1c001c,0x1c001c);
  const __m512i g6 = _mm512_setr_epi32(0,0,6,6,12,12,18,18,24,24,30,30,36,36,42,42);
  const __m512i T0 = _mm512_load_si512(C.c0), T1 = _mm512_load_si512(C.c1), POS = _mm512_load_si512(C.pos);
  __m512i e = exp16(m, v);
  __m512i nib = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(m)), shifts), _mm512_set1_epi32(15));
  __m512i combo = _mm512_permutex2var_epi32(T0, _mm512_or_si512(nib, sbit), T1);
  __mmask16 valid = _mm512_cmpge_epi32_mask(combo, _mm512_setzero_si512());
  __m512i widx = _mm512_add_epi32(_mm512_permutexvar_epi32(combo, POS), g4);
  __m512i ws = _mm512_permutexvar_epi16(widx, e);
  __m512i o = _mm512_mullo_epi32(_mm512_add_epi32(_mm512_add_epi32(combo, g6), _mm512_set1_epi32(int(48 * blk))), _mm512_set1_epi32(stride));
  _mm512_storeu_si512(w, _mm512_maskz_compress_epi32(valid, ws));
  _mm512_storeu_si512(off, _mm512_maskz_compress_epi32(valid, o));
  return _mm_popcnt_u32(valid);
}

template <int NZ>
TGT static inline void consume(const uint32_t* w, const int32_t* off, int cnt, const char* xc, __m512* acc) {
  for (int i = 0; i < cnt; ++i) {
    __m512bh wb = (__m512bh)_mm512_set1_epi32(int(w[i]));
    const char* p = xc + off[i];
    for (int z = 0; z < NZ; ++z) acc[z] = _mm512_dpbf16_ps(acc[z], wb, (__m512bh)_mm512_loadu_si512(p + 64 * z));
  }
}

// xC: int32 [nch][G*6][TC]; yT: [N, nch*TC]
template <int NZ>
TGT void rows(const uint8_t* meta, const uint16_t* vals, const int64_t* rp, int64_t stride_m, int64_t nblk,
              const char* xC, int64_t nch, float* yT, int64_t ldy, int64_t o0, int64_t o1, int64_t R, int64_t KB) {
  constexpr int TC = 16 * NZ;
  const int64_t chunk_bytes = nblk * 48 * TC * 4;
  std::vector<float> yacc(R * TC);
  std::vector<const uint16_t*> vc(R);
  std::vector<uint32_t> w(16 * KB + 16); std::vector<int32_t> off(16 * KB + 16);
  for (int64_t c = 0; c < nch; ++c) {
    const char* xc = xC + c * chunk_bytes;
    for (int64_t r0 = o0; r0 < o1; r0 += R) {
      const int64_t r1 = std::min(o1, r0 + R);
      for (int64_t o = r0; o < r1; ++o) vc[o - r0] = vals + rp[o];
      for (int64_t b0 = 0; b0 < nblk; b0 += KB) {
        const int64_t b1 = std::min(nblk, b0 + KB);
        for (int64_t o = r0; o < r1; ++o) {
          __m512 acc[NZ];
          float* ya = yacc.data() + (o - r0) * TC;
          for (int z = 0; z < NZ; ++z) acc[z] = b0 ? _mm512_loadu_ps(ya + 16 * z) : _mm512_setzero_ps();
          const uint8_t* mrow = meta + o * stride_m;
          const uint16_t* v = vc[o - r0];
          int cnt = 0;
          for (int64_t b = b0; b < b1; ++b) {
            uint32_t m; std::memcpy(&m, mrow + 4 * b, 4);
            cnt += build(m, v, b, TC * 4, w.data() + cnt, off.data() + cnt);
          }
          vc[o - r0] = v;
          consume<NZ>(w.data(), off.data(), cnt, xc, acc);
          float* dst = b1 == nblk ? yT + o * ldy + c * TC : ya;
          for (int z = 0; z < NZ; ++z) _mm512_storeu_ps(dst + 16 * z, acc[z]);
        }
      }
    }
  }
}

torch::Tensor prepC(torch::Tensor x, int64_t k, int64_t tc) {
  int64_t k32 = (k + 31) / 32 * 32, B = x.size(0), nch = (B + tc - 1) / tc, Bp = nch * tc, G = k32 / 4;
  auto xs = torch::zeros({Bp, k32}, torch::kBFloat16);
  xs.narrow(0, 0, B).narrow(1, 0, k).copy_(x);
  auto g = xs.view({Bp, G, 4});
  auto lo = g.index_select(2, torch::tensor({0, 0, 0, 1, 1, 2}));
  auto hi = g.index_select(2, torch::tensor({1, 2, 3, 2, 3, 3}));
  auto pr = torch::stack({lo, hi}, 3).contiguous().view(torch::kInt32).view({nch, tc, G * 6});
  return pr.permute({0, 2, 1}).contiguous();
}

torch::Tensor mmC(torch::Tensor x, torch::Tensor meta, torch::Tensor values, torch::Tensor row_ptr, int64_t n, int64_t k,
                  int64_t tc, int64_t R, int64_t KB) {
  return run_blocked(prepC(x, k, tc), meta, values, row_ptr, n, k, x.size(0), tc, R, KB,
                     tc == 128 ? rows<8> : tc == 64 ? rows<4> : rows<2>);
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mmA", &mmA); m.def("mmB", &mmB); m.def("mmB2", &mmB2); m.def("mmC", &mmC); m.def("prepC", &prepC);
}
