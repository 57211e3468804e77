#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,bmi,bmi2,popcnt,avx2,fma")))

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

// ---- B: nnz pairs with unpack. xT bf16 [K32, Tp]; list of byte offsets of the nnz rows
TGT int listB(const uint8_t* meta, int64_t nblk, int32_t kstride, int32_t* off) {
  const __m512i iota = _mm512_setr_epi32(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15);
  int cnt = 0;
  for (int64_t b = 0; b < nblk; ++b) {
    uint32_t m; std::memcpy(&m, meta + 4*b, 4);
    __m512i i0 = _mm512_mullo_epi32(_mm512_add_epi32(iota, _mm512_set1_epi32(int(b*32))), _mm512_set1_epi32(kstride));
    __m512i i1 = _mm512_add_epi32(i0, _mm512_set1_epi32(16*kstride));
    _mm512_storeu_si512(off + cnt, _mm512_maskz_compress_epi32((__mmask16)(m & 0xffff), i0)); cnt += _mm_popcnt_u32(m & 0xffff);
    _mm512_storeu_si512(off + cnt, _mm512_maskz_compress_epi32((__mmask16)(m >> 16), i1)); cnt += _mm_popcnt_u32(m >> 16);
  }
  return cnt;
}
template <int NG>  // NG groups of 32 tokens
TGT void rowB(const int32_t* off, const uint16_t* v, int cnt, const char* xT, float* out) {
  __m512 acc[2*NG];
  for (int z = 0; z < 2*NG; ++z) acc[z] = _mm512_setzero_ps();
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
  // lo lane 4L+i = token 8L+i ; hi lane 4L+i = token 8L+4+i
  const __m512i p0 = _mm512_setr_epi32(0,1,2,3,16,17,18,19,4,5,6,7,20,21,22,23);
  const __m512i p1 = _mm512_setr_epi32(8,9,10,11,24,25,26,27,12,13,14,15,28,29,30,31);
  for (int g = 0; g < NG; ++g) {
    _mm512_storeu_ps(out + 32*g, _mm512_permutex2var_ps(acc[2*g], p0, acc[2*g+1]));
    _mm512_storeu_ps(out + 32*g + 16, _mm512_permutex2var_ps(acc[2*g], p1, acc[2*g+1]));
  }
}
torch::Tensor mmB(torch::Tensor x, torch::Tensor meta, torch::Tensor values, torch::Tensor row_ptr, int64_t n, int64_t k) {
  int64_t k32 = (k+31)/32*32, B = x.size(0), Tp = (B+31)/32*32;
  auto xs = torch::zeros({Tp, k32}, torch::kBFloat16);
  xs.narrow(0,0,B).narrow(1,0,k).copy_(x);
  auto xT = xs.t().contiguous();  // [K32, Tp]
  auto yT = torch::empty({n, Tp}, torch::kFloat32);
  const uint8_t* mp = meta.data_ptr<uint8_t>(); const uint16_t* vp = (const uint16_t*)values.data_ptr(); const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const char* xtp = (const char*)xT.data_ptr(); float* yp = yT.data_ptr<float>();
  int64_t stride = k32/8;
  at::parallel_for(0, n, 16, [&](int64_t o0, int64_t o1) {
    std::vector<int32_t> off(k32 + 32);
    for (int64_t o = o0; o < o1; ++o) {
      int cnt = listB(mp + o*stride, k32/32, int32_t(Tp*2), off.data());
      int64_t t = 0;
      for (; t + 128 <= Tp; t += 128) rowB<4>(off.data(), vp + rp[o], cnt, xtp + t*2, yp + o*Tp + t);
      for (; t + 64 <= Tp; t += 64) rowB<2>(off.data(), vp + rp[o], cnt, xtp + t*2, yp + o*Tp + t);
      for (; t + 32 <= Tp; t += 32) rowB<1>(off.data(), vp + rp[o], cnt, xtp + t*2, yp + o*Tp + t);
    }
  });
  return yT;
}

torch::Tensor mmBL1(torch::Tensor x, torch::Tensor meta, torch::Tensor values, torch::Tensor row_ptr, int64_t n, int64_t k, int64_t maskbits) {
  int64_t k32 = (k+31)/32*32, B = x.size(0), Tp = (B+31)/32*32;
  auto xs = torch::zeros({Tp, k32}, torch::kBFloat16);
  xs.narrow(0,0,B).narrow(1,0,k).copy_(x);
  auto xT = xs.t().contiguous();
  auto yT = torch::empty({n, Tp}, torch::kFloat32);
  const uint8_t* mp = meta.data_ptr<uint8_t>(); const uint16_t* vp = (const uint16_t*)values.data_ptr(); const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const char* xtp = (const char*)xT.data_ptr(); float* yp = yT.data_ptr<float>();
  int64_t stride = k32/8; int32_t msk = int32_t(maskbits);
  at::parallel_for(0, n, 16, [&](int64_t o0, int64_t o1) {
    std::vector<int32_t> off(k32 + 32);
    for (int64_t o = o0; o < o1; ++o) {
      int cnt = listB(mp + o*stride, k32/32, int32_t(Tp*2), off.data());
      for (int i = 0; i < cnt; ++i) off[i] &= msk;
      int64_t t = 0;
      for (; t + 128 <= Tp; t += 128) rowB<4>(off.data(), vp + rp[o], cnt, xtp + t*2, yp + o*Tp + t);
      for (; t + 64 <= Tp; t += 64) rowB<2>(off.data(), vp + rp[o], cnt, xtp + t*2, yp + o*Tp + t);
      for (; t + 32 <= Tp; t += 32) rowB<1>(off.data(), vp + rp[o], cnt, xtp + t*2, yp + o*Tp + t);
    }
  });
  return yT;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("mmA", &mmA); m.def("mmB", &mmB); m.def("mmBL1", &mmBL1); }
