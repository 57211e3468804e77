// Sparse linear kernels for CPU: y = x · Wᵀ + b with W stored compactly.
//
// Layout (built by losa/inference/formats.py), for W of shape [N, K], K32 = K rounded up to 32:
//   meta    uint8, one row of `meta_stride` bytes per output row:
//             fmt 0 (bitmask): K32 bits, bit j of the row = W[o, j] != 0 (little-endian bit order)
//             fmt 1 (2:4):     two 2-bit indices per group of 4 inputs (4 indices per byte)
//             fmt 2 (1:4):     one 2-bit index per group of 4 inputs
//   values  float32 or bfloat16 (raw uint16), the kept weights row by row in input order, padded at
//           the end with >= 64 zero elements so that vector loads never leave the buffer
//   row_ptr int64 [N + 1], offset of each row's first value
// Inputs x are float32 [B, K] (all arithmetic float32; bf16 values are widened exactly) or, with bf16
// values, bfloat16 [B, K] as in a bf16 model: then bf16 x bf16 products are summed in float32
// (AVX512-BF16 vdpbf16ps where the CPU has it, else the float32 path on the widened inputs).
//
// Every format is decoded to one 32-bit lane mask per block of 32 inputs; the ISA paths (AVX-512 with
// VBMI2 expand-loads, AVX2+FMA+F16C with byte-shuffle / permute tables, portable scalar) share that
// decoding. The ISA is chosen at run time (__builtin_cpu_supports); no -march flag is needed to build.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "losa_kernels.h"
#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOSA_X86 1
#else
#define LOSA_X86 0
#endif
// The AVX512-BF16 loop needs compiler support (GCC >= 10, clang >= 9); -DLOSA_NO_BF16 leaves it out.
#if LOSA_X86 && !defined(LOSA_NO_BF16) && \
    ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define LOSA_BF16 1
#else
#define LOSA_BF16 0
#endif
// The AMX tile path needs GCC >= 11 (tile intrinsics in target attributes) and Linux (the tile state is
// requested with arch_prctl); -DLOSA_NO_AMX leaves it out.
#if LOSA_X86 && defined(__linux__) && !defined(LOSA_NO_AMX) && !defined(__clang__) && defined(__GNUC__) && \
    __GNUC__ >= 11
#define LOSA_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define LOSA_AMX 0
#endif

namespace {

enum Fmt : int { BITMASK = 0, NM24 = 1, NM14 = 2 };
enum Isa : int { SCALAR = 0, AVX2 = 1, AVX512 = 2 };

struct Tables {
  uint8_t nm24[256];   // byte of four 2-bit indices (two groups of 4) -> 8-bit lane mask
  uint16_t nm14[256];  // byte of four 2-bit indices (four groups of 4) -> 16-bit lane mask
  alignas(32) int32_t perm[256][8];   // AVX2 float32 expand: lane i takes packed element perm[m][i]
  alignas(32) int32_t zmask[256][8];  // AVX2 float32 expand: all-ones where bit i of m is set
  // AVX2 bf16 expand (vpshufb on 8 bf16 values broadcast to both 128-bit halves): for float32 lane i
  // (byte 4i of the 256-bit result, i.e. byte 4 (i % 4) of half i / 4), bytes 0-1 = 0x80 (zero: the low
  // mantissa half of the widened bf16) and bytes 2-3 = the two bytes of packed element perm[m][i], or 0x80
  // (zero lane) where bit i of m is clear
  alignas(32) uint8_t shuf16[256][32];
};

Tables make_tables() {
  Tables t{};
  for (int b = 0; b < 256; ++b) {
    int i0 = b & 3, i1 = (b >> 2) & 3, i2 = (b >> 4) & 3, i3 = (b >> 6) & 3;
    t.nm24[b] = static_cast<uint8_t>((1 << i0) | (1 << i1) | (((1 << i2) | (1 << i3)) << 4));
    t.nm14[b] = static_cast<uint16_t>((1 << i0) | (1 << (4 + i1)) | (1 << (8 + i2)) | (1 << (12 + i3)));
    int k = 0;
    for (int i = 0; i < 8; ++i) {
      bool on = (b >> i) & 1;
      t.perm[b][i] = on ? k : 0;
      t.zmask[b][i] = on ? -1 : 0;
      uint8_t* c = t.shuf16[b] + 4 * i;  // lanes 0-3: bytes 0-15 (half 0); lanes 4-7: bytes 16-31 (half 1)
      c[0] = c[1] = 0x80;
      c[2] = on ? static_cast<uint8_t>(2 * k) : 0x80;
      c[3] = on ? static_cast<uint8_t>(2 * k + 1) : 0x80;
      k += on;
    }
  }
  return t;
}

const Tables T = make_tables();

inline int64_t meta_stride(int fmt, int64_t k32) { return fmt == NM14 ? k32 / 16 : k32 / 8; }

// The AVX-512 float32-input loops' bf16 expansion (see expand32): -1 by CPU vendor; 0 widen first; 1 vpexpandw first.
std::atomic<int> g_bf16_expand{-1};  // -1: by vendor; 0: widen first; 1: vpexpandw first

bool bf16_expand16() {
  const int mode = g_bf16_expand.load(std::memory_order_relaxed);
  if (mode >= 0) return mode == 1;
#if LOSA_X86
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return intel;
#else
  return false;
#endif
}

struct Packed {
  const uint8_t* meta;
  const void* values;
  const int64_t* row_ptr;
  int64_t n, k, k32, stride;
};

template <int F>
inline uint32_t block_mask(const uint8_t* meta, int64_t blk) {
  if constexpr (F == BITMASK) {
    uint32_t m;
    std::memcpy(&m, meta + 4 * blk, 4);
    return m;
  } else if constexpr (F == NM24) {
    const uint8_t* p = meta + 4 * blk;
    return uint32_t(T.nm24[p[0]]) | (uint32_t(T.nm24[p[1]]) << 8) | (uint32_t(T.nm24[p[2]]) << 16) |
           (uint32_t(T.nm24[p[3]]) << 24);
  } else {
    const uint8_t* p = meta + 2 * blk;
    return uint32_t(T.nm14[p[0]]) | (uint32_t(T.nm14[p[1]]) << 16);
  }
}

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return losa::bf16_to_float(v); }

// ---------------------------------------------------------------- portable scalar path
template <int F, int BT, typename V>
void row_scalar(const uint8_t* meta, const V* v, const float* x, int64_t ldx, int64_t nblk, float* res) {
  float acc[BT];
  for (int b = 0; b < BT; ++b) acc[b] = 0.f;
  for (int64_t k = 0; k < nblk; ++k) {
    uint32_t m = block_mask<F>(meta, k);
    const float* xk = x + 32 * k;
    while (m) {
      int j = __builtin_ctz(m);
      m &= m - 1;
      float w = to_f32(*v++);
      for (int b = 0; b < BT; ++b) acc[b] += w * xk[b * ldx + j];
    }
  }
  for (int b = 0; b < BT; ++b) res[b] = acc[b];
}

template <int F, typename V>
void expand_scalar(const uint8_t* meta, const V* v, int64_t nblk, float* dst) {
  for (int64_t k = 0; k < nblk; ++k) {
    uint32_t m = block_mask<F>(meta, k);
    for (int j = 0; j < 32; ++j) dst[32 * k + j] = ((m >> j) & 1) ? to_f32(*v++) : 0.f;
  }
}

#if LOSA_X86
// ---------------------------------------------------------------- AVX2 + FMA path
// AVX2/FMA/F16C only (plus the scalar POPCNT): nothing here may be compiled for AVX-512, so a run with
// LOSA_SPARSE_ISA=avx2 on an AVX-512 machine executes exactly what an AVX2-only CPU (Zen 3, Haswell) would.
// tests/test_inference_kernel.py disassembles these functions to check that.
#define LOSA_AVX2 __attribute__((target("avx2,fma,f16c,popcnt")))

// Eight inputs of a block: the packed values of group q (lanes 8q..8q+7) start at v; `row` is the byte
// offset of the group's 8-bit mask's table row (mask * 32, see table_row).
// bf16 values: one broadcast load of 8 values (vbroadcasti128, a pure load) and one vpshufb that expands
// and widens them into float32 lanes (a bf16 is the high half of its float32) with zeros in the other
// lanes: a single shuffle per 8 inputs. float32 values: vpermps + a zeroing AND (two table loads).
// It replaces vpmovzxwd + vpslld + vpermps + vandps with a serial pointer update per group and 2 accumulators:
// 1.4-1.5x that loop in the lab, 2.9x through the extension, 3.3-3.4x dense fp32 decode on 1 thread (forced AVX2
// on a Sapphire Rapids core; benchmarks/results/avx2_variants.md, avx2_decode.md).
LOSA_AVX2 inline __m256 expand_group(const uint16_t* v, uint32_t row) {
  const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
  const auto* ctl = reinterpret_cast<const __m256i*>(reinterpret_cast<const char*>(T.shuf16) + row);
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(raw, _mm256_load_si256(ctl)));
}

LOSA_AVX2 inline __m256 expand_group(const float* v, uint32_t row) {
  const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const char*>(T.perm) + row));
  const __m256 keep = _mm256_load_ps(reinterpret_cast<const float*>(reinterpret_cast<const char*>(T.zmask) + row));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(v), perm), keep);
}

// Byte offset of the 32-byte table row of group q's mask (byte q of m): shift + and, no movzx/shl pair
// (0.99-1.09x over indexing with the byte itself: results/avx2_variants.md, N4 vs N9).
template <int Q>
inline uint32_t table_row(uint32_t m) {
  if constexpr (Q == 0) return (m << 5) & 0x1fe0u;
  else return (m >> (8 * Q - 5)) & 0x1fe0u;
}

LOSA_AVX2 inline float hsum256(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Row dot products for BT batch rows. Per block of 32 inputs the four groups' value offsets are prefix
// popcounts of the block mask, so the only serial dependency between blocks is one pointer add. Groups
// accumulate into NA independent chains per batch row (4 for one row: one FMA per chain and block).
template <int F, int BT, typename V>
LOSA_AVX2 void row_avx2(const uint8_t* meta, const V* v, const float* x, int64_t ldx, int64_t nblk,
                        float* res) {
  constexpr int NA = BT == 1 ? 4 : (BT <= 4 ? 2 : 1);
  __m256 acc[BT][NA];
  for (int b = 0; b < BT; ++b)
    for (int a = 0; a < NA; ++a) acc[b][a] = _mm256_setzero_ps();
  for (int64_t k = 0; k < nblk; ++k) {
    // software prefetch 3 KiB ahead of the value stream: 1.19x on a DRAM-resident LLaMA layer, 0.93x on an
    // L2-resident one; 1.5-6 KiB within noise (benchmarks/avx2_variants.cpp, results/avx2_variants.md); 6 KiB on
    // layers streamed from memory: 70 % 1.00-1.05x, 50 % and 2:4 0.97-1.01x (kernel_regression.md), not taken
    _mm_prefetch(reinterpret_cast<const char*>(v) + 3072, _MM_HINT_T0);
    const uint32_t m = block_mask<F>(meta, k);
    const V* vq[4] = {v, v + _mm_popcnt_u32(m & 0xffu), v + _mm_popcnt_u32(m & 0xffffu),
                      v + _mm_popcnt_u32(m & 0xffffffu)};
    const float* xk = x + 32 * k;
    const uint32_t rows[4] = {table_row<0>(m), table_row<1>(m), table_row<2>(m), table_row<3>(m)};
    for (int q = 0; q < 4; ++q) {
      const __m256 w = expand_group(vq[q], rows[q]);
      for (int b = 0; b < BT; ++b)
        acc[b][q % NA] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xk + b * ldx + 8 * q), acc[b][q % NA]);
    }
    v += _mm_popcnt_u32(m);
  }
  for (int b = 0; b < BT; ++b) {
    __m256 t = acc[b][0];
    for (int a = 1; a < NA; ++a) t = _mm256_add_ps(t, acc[b][a]);
    res[b] = hsum256(t);
  }
}

template <int F, typename V>
LOSA_AVX2 void expand_avx2(const uint8_t* meta, const V* v, int64_t nblk, float* dst) {
  for (int64_t k = 0; k < nblk; ++k) {
    const uint32_t m = block_mask<F>(meta, k);
    const V* vq[4] = {v, v + _mm_popcnt_u32(m & 0xffu), v + _mm_popcnt_u32(m & 0xffffu),
                      v + _mm_popcnt_u32(m & 0xffffffu)};
    const uint32_t rows[4] = {table_row<0>(m), table_row<1>(m), table_row<2>(m), table_row<3>(m)};
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(dst + 32 * k + 8 * q, expand_group(vq[q], rows[q]));
    v += _mm_popcnt_u32(m);
  }
}

// ---------------------------------------------------------------- AVX-512 (F, BW, VBMI2) path
#define LOSA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx2,fma,popcnt")))

// How bf16 values are expanded into float32 lanes on the AVX-512 level (float32 inputs): widen first, then two
// vexpandps (W16 = false), or one vpexpandw of 32 bf16 lanes, then widen each half (W16 = true). Which is faster
// depends on the CPU. On the AMX Xeon (Intel) this vpexpandw form was 1.05-1.43x faster on SmolLM2 and LLaMA-7B
// layers, 1 and 2 threads (results/bf16_expand.md). On a Zen 4, a vpexpandw-first variant that widened with
// unpacks against zero lost to widening first (variant W of results/kernel_variants.md); this exact form has not
// been timed on AMD, nor on an Ice Lake. So vpexpandw first on Intel CPUs, widen first elsewhere;
// set_bf16_expand() overrides (tests, benchmarks/bench_bf16_expand.py).
// Expand the next popcount(m) packed values into the 32 lanes set in m, as two float32 vectors.
template <typename V, bool W16 = false>
LOSA_AVX512 inline void expand32(uint32_t m, const V*& v, __m512& lo, __m512& hi) {
  if constexpr (sizeof(V) == 2 && W16) {
    __m512i r = _mm512_loadu_si512(reinterpret_cast<const void*>(v));
    asm("" : "+v"(r));  // the register form of vpexpandw (its memory form is microcoded on Zen 4)
    const __m512i e = _mm512_maskz_expand_epi16(static_cast<__mmask32>(m), r);
    lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(e)), 16));
    hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(e, 1)), 16));
  } else if constexpr (sizeof(V) == 4) {
    const float* f = reinterpret_cast<const float*>(v);
    uint32_t m0 = m & 0xffff, m1 = m >> 16;
    int c0 = _mm_popcnt_u32(m0);
    __m512 r0 = _mm512_loadu_ps(f), r1 = _mm512_loadu_ps(f + c0);
    // keep the loads in registers: the memory form of vexpandps is microcoded (slow) on AMD Zen 4
    asm("" : "+v"(r0), "+v"(r1));
    lo = _mm512_maskz_expand_ps(static_cast<__mmask16>(m0), r0);
    hi = _mm512_maskz_expand_ps(static_cast<__mmask16>(m1), r1);
  } else {
    // widen first, then expand 32-bit lanes (see bf16_expand16)
    uint32_t m0 = m & 0xffff, m1 = m >> 16;
    int c0 = _mm_popcnt_u32(m0);
    __m512 r0 = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v))), 16));
    __m512 r1 = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + c0))), 16));
    lo = _mm512_maskz_expand_ps(static_cast<__mmask16>(m0), r0);
    hi = _mm512_maskz_expand_ps(static_cast<__mmask16>(m1), r1);
  }
  v += _mm_popcnt_u32(m);
}

template <int F, int BT, typename V, bool W16 = false>
LOSA_AVX512 void row_avx512(const uint8_t* meta, const V* v, const float* x, int64_t ldx, int64_t nblk,
                            float* res) {
  __m512 a0[BT], a1[BT];
  for (int b = 0; b < BT; ++b) a0[b] = a1[b] = _mm512_setzero_ps();
  for (int64_t k = 0; k < nblk; ++k) {
    // software prefetch ahead of the value and metadata streams: 1.13-1.31x on this loop in
    // benchmarks/kernel_variants.cpp (variant A+pf); prefetches never fault, so running past the end is fine
    _mm_prefetch(reinterpret_cast<const char*>(v + 1024), _MM_HINT_T0);
    if ((k & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(meta + (F == NM14 ? 2 : 4) * k + 512), _MM_HINT_T0);
    __m512 w0, w1;
    expand32<V, W16>(block_mask<F>(meta, k), v, w0, w1);
    const float* xk = x + 32 * k;
    for (int b = 0; b < BT; ++b) {
      a0[b] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xk + b * ldx), a0[b]);
      a1[b] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xk + b * ldx + 16), a1[b]);
    }
  }
  for (int b = 0; b < BT; ++b) res[b] = _mm512_reduce_add_ps(_mm512_add_ps(a0[b], a1[b]));
}

template <int F, typename V, bool W16 = false>
LOSA_AVX512 void expand_avx512(const uint8_t* meta, const V* v, int64_t nblk, float* dst) {
  for (int64_t k = 0; k < nblk; ++k) {
    __m512 lo, hi;
    expand32<V, W16>(block_mask<F>(meta, k), v, lo, hi);
    _mm512_storeu_ps(dst + 32 * k, lo);
    _mm512_storeu_ps(dst + 32 * k + 16, hi);
  }
}
#define LOSA_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,avx2,fma,popcnt")))

// Expand the next popcount(m) bf16 values into the 32 16-bit lanes set in m (register form of
// vpexpandw: 2x faster than widen + 2x vexpandps + narrow for producing bf16 rows on Zen 4).
LOSA_AVX512 inline __m512i expand32_bf16(uint32_t m, const uint16_t*& v) {
  __m512i r = _mm512_loadu_si512(reinterpret_cast<const void*>(v));
  asm("" : "+v"(r));  // keep the load separate: the memory form of the expand is microcoded on Zen 4
  v += _mm_popcnt_u32(m);
  return _mm512_maskz_expand_epi16(static_cast<__mmask32>(m), r);
}

// Blocks [kb0, kb0 + nkb) of one row (meta: the row's metadata) expanded to bf16 into d, 32 values per block;
// v: the row's next packed value, advanced past those blocks.
template <int F>
LOSA_AVX512 inline void expand_blocks_bf16(const uint8_t* meta, int64_t kb0, int64_t nkb, const uint16_t*& v,
                                           uint16_t* d) {
  for (int64_t kb = 0; kb < nkb; ++kb)
    _mm512_storeu_si512(reinterpret_cast<void*>(d + 32 * kb), expand32_bf16(block_mask<F>(meta, kb0 + kb), v));
}

#if LOSA_BF16
// Row dot products with bf16 inputs: one vpexpandw and one vdpbf16ps (pairwise bf16 products summed
// in float32) per 32 inputs and batch row, two blocks per step into two accumulators. 1.4-1.9x faster
// than the float32-input loop (benchmarks/kernel_variants.cpp, variant X1+pf).
template <int F, int BT>
LOSA_AVX512BF16 void row_bf16dot(const uint8_t* meta, const uint16_t* v, const uint16_t* x, int64_t ldx,
                                 int64_t nblk, float* res) {
  __m512 a0[BT], a1[BT];
  for (int b = 0; b < BT; ++b) a0[b] = a1[b] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 1 < nblk; k += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(v + 1024), _MM_HINT_T0);
    if ((k & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(meta + (F == NM14 ? 2 : 4) * k + 512), _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)expand32_bf16(block_mask<F>(meta, k), v);
    const __m512bh w1 = (__m512bh)expand32_bf16(block_mask<F>(meta, k + 1), v);
    for (int b = 0; b < BT; ++b) {
      const uint16_t* xk = x + b * ldx + 32 * k;
      a0[b] = _mm512_dpbf16_ps(a0[b], w0, (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(xk)));
      a1[b] = _mm512_dpbf16_ps(a1[b], w1, (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(xk + 32)));
    }
  }
  if (k < nblk) {
    const __m512bh w0 = (__m512bh)expand32_bf16(block_mask<F>(meta, k), v);
    for (int b = 0; b < BT; ++b)
      a0[b] = _mm512_dpbf16_ps(a0[b], w0, (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(x + b * ldx + 32 * k)));
  }
  for (int b = 0; b < BT; ++b) res[b] = _mm512_reduce_add_ps(_mm512_add_ps(a0[b], a1[b]));
}

bool cpu_has_bf16dot() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
}

// Dense bf16 rows with bf16 inputs (a bf16 model's LM head or a layer kept dense, in the decode engine):
// res[o] = sum_j w[o, j] x[j] for rows [o0, o1) of w [N, K] (row stride K, not padded); x holds >= K values.
// The weights are read in place: no packed copy and no metadata. Per 64 inputs two vdpbf16ps into two
// accumulators; the last K mod 32 inputs through masked loads (zeros past K in both operands). Both cache lines
// of each step are prefetched 4 KiB ahead (one line per step left the other to the hardware prefetcher, slower:
// benchmarks/dense_rows_lab.cpp, results/dense_rows_lab.md).
LOSA_AVX512BF16 void dense_rows_bf16dot(const uint16_t* w, const uint16_t* x, int64_t K, const float* bias, float* y,
                                        int64_t o0, int64_t o1) {
  const int64_t k64 = K / 64 * 64;
  for (int64_t o = o0; o < o1; ++o) {
    const uint16_t* wo = w + o * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t k = 0;
    for (; k < k64; k += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(wo + k) + 4096, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wo + k) + 4096 + 64, _MM_HINT_T0);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(wo + k), (__m512bh)_mm512_loadu_si512(x + k));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(wo + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
    }
    for (; k < K; k += 32) {
      const int64_t r = K - k;
      const __mmask32 mk = r >= 32 ? 0xffffffffu : ((1u << r) - 1u);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(mk, wo + k),
                            (__m512bh)_mm512_maskz_loadu_epi16(mk, x + k));
    }
    y[o] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + (bias ? bias[o] : 0.f);
  }
}

// ---------------------------------------------------------------- sparse prefill (bf16, AVX512-BF16)
// Large bf16 batches at high sparsity skip the zeros instead of decompressing them: an outer-product
// GEMM over the kept weights. For each output row, the kept weights are taken two at a time (w_a, w_b);
// the inputs x[:, a] and x[:, b] of 32 tokens (rows a, b of the transposed chunk xT [K32, TC]) are
// interleaved with vpunpck{l,h}wd and one vdpbf16ps adds w_a x[t, a] + w_b x[t, b] for 16 tokens.
// Cost per kept pair and 32 tokens: two loads, two shuffles, two vdpbf16ps -- about 2x a dense GEMM's
// cost per weight, so it wins at 70 % (1.35-1.43x a dense bf16 GEMM per layer, 1 thread) and loses at
// 50 % and 2:4 (0.69-1.02x), where the decompress + GEMM path stays (kernel lab in
// benchmarks/results/prefill_kernel.md). Blocking: partial sums of kPrefillRows rows x TC tokens stay in
// L2 while kPrefillKBlocks blocks of 32 inputs of xT (64 KiB for 128 tokens) are reused by all of them.
constexpr int64_t kPrefillRows = 256;
constexpr int64_t kPrefillKBlocks = 8;
constexpr int64_t kPrefillTokens = 128;  // tokens per chunk (64 was 0.9x as fast at 128 tokens)

// Byte offsets (row index x row_bytes) of the kept inputs of one 32-input block, in input order.
template <int F>
LOSA_AVX512 inline int kept_offsets(const uint8_t* meta, int64_t blk, int32_t row_bytes, int32_t* off) {
  const uint32_t m = block_mask<F>(meta, blk);
  const __m512i i0 = _mm512_mullo_epi32(
      _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                       _mm512_set1_epi32(static_cast<int>(blk * 32))),
      _mm512_set1_epi32(row_bytes));
  const __m512i i1 = _mm512_add_epi32(i0, _mm512_set1_epi32(16 * row_bytes));
  const int c0 = _mm_popcnt_u32(m & 0xffff);
  // register-form compress + store: the memory form (vpcompressd m512) is microcoded on Zen 4
  _mm512_storeu_si512(off, _mm512_maskz_compress_epi32(static_cast<__mmask16>(m & 0xffff), i0));
  _mm512_storeu_si512(off + c0, _mm512_maskz_compress_epi32(static_cast<__mmask16>(m >> 16), i1));
  return c0 + _mm_popcnt_u32(m >> 16);
}

// acc[2g] / acc[2g + 1] hold tokens {8L + i} / {8L + 4 + i} (lane 4L + i) of token group g (32 tokens).
template <int NG>
LOSA_AVX512BF16 inline void kept_pair_dots(const int32_t* off, const uint16_t* v, int cnt, const char* xt,
                                           __m512* acc) {
  int i = 0;
  for (; i + 1 < cnt; i += 2) {
    uint32_t wp;
    std::memcpy(&wp, v + i, 4);  // (w_a, w_b): consecutive in the packed values
    const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(wp));
    const char* a = xt + off[i];
    const char* b = xt + off[i + 1];
    for (int g = 0; g < NG; ++g) {
      const __m512i xa = _mm512_loadu_si512(a + 64 * g), xb = _mm512_loadu_si512(b + 64 * g);
      acc[2 * g] = _mm512_dpbf16_ps(acc[2 * g], w, (__m512bh)_mm512_unpacklo_epi16(xa, xb));
      acc[2 * g + 1] = _mm512_dpbf16_ps(acc[2 * g + 1], w, (__m512bh)_mm512_unpackhi_epi16(xa, xb));
    }
  }
  if (i < cnt) {  // odd count: the last weight pairs with a zero
    const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(v[i]));
    const char* a = xt + off[i];
    for (int g = 0; g < NG; ++g) {
      const __m512i xa = _mm512_loadu_si512(a + 64 * g);
      acc[2 * g] = _mm512_dpbf16_ps(acc[2 * g], w, (__m512bh)_mm512_unpacklo_epi16(xa, xa));
      acc[2 * g + 1] = _mm512_dpbf16_ps(acc[2 * g + 1], w, (__m512bh)_mm512_unpackhi_epi16(xa, xa));
    }
  }
}

// yT[o, 0:32 NG] = sum_j W[o, j] xT[j, :] for rows [o0, o1); xT is bf16 [K32, 32 NG], yT float32 [N, 32 NG].
template <int F, int NG>
LOSA_AVX512BF16 void sparse_prefill_rows(const Packed& p, const uint16_t* xT, float* yT, int64_t o0, int64_t o1) {
  constexpr int TC = 32 * NG;
  const uint16_t* vals = static_cast<const uint16_t*>(p.values);
  const int64_t nblk = p.k32 / 32;
  const char* xt = reinterpret_cast<const char*>(xT);
  std::vector<float> part(kPrefillRows * TC);
  std::vector<const uint16_t*> cursor(kPrefillRows);
  std::vector<int32_t> off(32 * kPrefillKBlocks + 32);
  const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i hi = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t r0 = o0; r0 < o1; r0 += kPrefillRows) {
    const int64_t r1 = std::min(o1, r0 + kPrefillRows);
    for (int64_t o = r0; o < r1; ++o) cursor[o - r0] = vals + p.row_ptr[o];
    for (int64_t b0 = 0; b0 < nblk; b0 += kPrefillKBlocks) {
      const int64_t b1 = std::min(nblk, b0 + kPrefillKBlocks);
      for (int64_t o = r0; o < r1; ++o) {
        float* part_o = part.data() + (o - r0) * TC;
        __m512 acc[2 * NG];
        for (int z = 0; z < 2 * NG; ++z) acc[z] = b0 ? _mm512_loadu_ps(part_o + 16 * z) : _mm512_setzero_ps();
        const uint8_t* meta = p.meta + o * p.stride;
        int cnt = 0;
        for (int64_t b = b0; b < b1; ++b) cnt += kept_offsets<F>(meta, b, TC * 2, off.data() + cnt);
        kept_pair_dots<NG>(off.data(), cursor[o - r0], cnt, xt, acc);
        cursor[o - r0] += cnt;
        if (b1 < nblk) {
          for (int z = 0; z < 2 * NG; ++z) _mm512_storeu_ps(part_o + 16 * z, acc[z]);
        } else {  // undo the unpack order: tokens 0..15 and 16..31 of each group
          float* dst = yT + o * TC;
          for (int g = 0; g < NG; ++g) {
            _mm512_storeu_ps(dst + 32 * g, _mm512_permutex2var_ps(acc[2 * g], lo, acc[2 * g + 1]));
            _mm512_storeu_ps(dst + 32 * g + 16, _mm512_permutex2var_ps(acc[2 * g], hi, acc[2 * g + 1]));
          }
        }
      }
    }
  }
}

using PrefillFn = void (*)(const Packed&, const uint16_t*, float*, int64_t, int64_t);

template <int F>
PrefillFn pick_prefill(int ng) {
  switch (ng) {
    case 1: return sparse_prefill_rows<F, 1>;
    case 2: return sparse_prefill_rows<F, 2>;
    case 3: return sparse_prefill_rows<F, 3>;
    default: return sparse_prefill_rows<F, 4>;
  }
}

#else
bool cpu_has_bf16dot() { return false; }
#endif  // LOSA_BF16
#else
bool cpu_has_bf16dot() { return false; }
#endif  // LOSA_X86

// ---------------------------------------------------------------- dense bf16 rows, float32 inputs
// res[o] = sum_j w[o, j] x[j] (+ bias[o]) for rows [o0, o1) of a dense bf16 weight w [N, K] (row stride K) and
// float32 inputs x [>= K]: a float32 model's bf16 LM head copy, and a bf16 model's dense layers where the
// AVX512-BF16 loop does not run (x then holds bf16 values). Each weight widened exactly (a shift), float32
// products and sums. The packed row loop on an all-ones bitmask did the same with a per-group expansion and
// one metadata bit per weight more to read: 1.05-1.20x slower on LM head shapes (AVX-512), 1.02-1.17x with
// AVX2 forced (the AMX Xeon; results/lm_head_f32.md).
inline void dense_rows_f32x_scalar(const uint16_t* w, const float* x, int64_t K, const float* bias, float* y,
                                   int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const uint16_t* wo = w + o * K;
    float s = 0.f;
    for (int64_t k = 0; k < K; ++k) s += losa::bf16_to_float(wo[k]) * x[k];
    y[o] = s + (bias ? bias[o] : 0.f);
  }
}

#if LOSA_X86
// AVX2: 8 weights per vpmovzxwd + shift, four accumulators per 32 inputs; the last K mod 8 inputs scalar.
LOSA_AVX2 void dense_rows_f32x_avx2(const uint16_t* w, const float* x, int64_t K, const float* bias, float* y,
                                    int64_t o0, int64_t o1) {
  const int64_t k32 = K / 32 * 32, k8 = K / 8 * 8;
  for (int64_t o = o0; o < o1; ++o) {
    const uint16_t* wo = w + o * K;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t k = 0;
    for (; k < k32; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(wo + k) + 3072, _MM_HINT_T0);  // one cache line per step
      for (int q = 0; q < 4; ++q) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wo + k + 8 * q));
        const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
        acc[q] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + k + 8 * q), acc[q]);
      }
    }
    for (; k < k8; k += 8) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wo + k));
      acc[0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)),
                               _mm256_loadu_ps(x + k), acc[0]);
    }
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for (; k < K; ++k) s += losa::bf16_to_float(wo[k]) * x[k];
    y[o] = s + (bias ? bias[o] : 0.f);
  }
}

// AVX-512: 16 weights per vpmovzxwd + shift, two accumulators per 32 inputs; the last K mod 32 through masks.
LOSA_AVX512 void dense_rows_f32x_avx512(const uint16_t* w, const float* x, int64_t K, const float* bias, float* y,
                                        int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const uint16_t* wo = w + o * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(wo + k) + 4096, _MM_HINT_T0);
      const __m512i r0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wo + k)));
      const __m512i r1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wo + k + 16)));
      a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(r0, 16)), _mm512_loadu_ps(x + k), a0);
      a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(r1, 16)), _mm512_loadu_ps(x + k + 16), a1);
    }
    for (; k < K; k += 16) {
      const int64_t r = K - k;
      const __mmask16 mk = r >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << r) - 1u);
      const __m512i raw = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, wo + k));
      a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)), _mm512_maskz_loadu_ps(mk, x + k), a0);
    }
    y[o] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + (bias ? bias[o] : 0.f);
  }
}
#endif


// W16: the vpexpandw-first expansion of bf16 values on the AVX-512 level (chosen once per call: see pick_isa)
template <int ISA, int F, int BT, typename V, bool W16 = false>
inline void row_dot(const uint8_t* meta, const V* v, const float* x, int64_t ldx, int64_t nblk, float* res) {
#if LOSA_X86
  if constexpr (ISA == AVX512) return row_avx512<F, BT, V, W16>(meta, v, x, ldx, nblk, res);
  if constexpr (ISA == AVX2) return row_avx2<F, BT, V>(meta, v, x, ldx, nblk, res);
#endif
  row_scalar<F, BT, V>(meta, v, x, ldx, nblk, res);
}

// bf16 inputs (bf16 values only; selected only where the CPU has AVX512-BF16; W16 plays no part).
template <int ISA, int F, int BT, typename V, bool W16 = false>
inline void row_dot(const uint8_t* meta, const V* v, const uint16_t* x, int64_t ldx, int64_t nblk, float* res) {
#if LOSA_BF16
  if constexpr (ISA == AVX512 && sizeof(V) == 2) return row_bf16dot<F, BT>(meta, v, x, ldx, nblk, res);
#endif
  TORCH_CHECK(false, "bf16-input row loop needs bf16 values and AVX512-BF16");
}

template <int ISA, int F, typename V, bool W16 = false>
inline void expand_row(const uint8_t* meta, const V* v, int64_t nblk, float* dst) {
#if LOSA_X86
  if constexpr (ISA == AVX512) return expand_avx512<F, V, W16>(meta, v, nblk, dst);
  if constexpr (ISA == AVX2) return expand_avx2<F, V>(meta, v, nblk, dst);
#endif
  expand_scalar<F, V>(meta, v, nblk, dst);
}

// y[b, o] = sum_j W[o, j] x[b, j] (+ bias[o]) for rows o in [o0, o1); x is [B, ldx] with zero padding,
// float32 (X = float) or bf16 (X = uint16_t).
template <int ISA, int F, typename V, typename X = float, bool W16 = false>
void gemv_rows(const Packed& p, const X* x, int64_t B, int64_t ldx, const float* bias, float* y,
               int64_t o0, int64_t o1) {
  const V* vals = static_cast<const V*>(p.values);
  const int64_t nblk = p.k32 / 32;
  // AVX2 (16 vector registers) takes at most 4 batch rows per pass: 8 rows with one accumulator each were
  // slower than two passes of 4 (latency-bound FMA chains; forced AVX2, `losa bench-runtime` timings)
  constexpr bool kEight = ISA != AVX2;
  float res[8];
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* meta = p.meta + o * p.stride;
    const V* v = vals + p.row_ptr[o];
    const float bo = bias ? bias[o] : 0.f;
    int64_t b = 0;
    while (b < B) {
      const X* xb = x + b * ldx;
      int64_t r = B - b, bt;
      if (kEight && r >= 8) { row_dot<ISA, F, kEight ? 8 : 4, V, W16>(meta, v, xb, ldx, nblk, res); bt = kEight ? 8 : 4; }
      else if (r >= 4) { row_dot<ISA, F, 4, V, W16>(meta, v, xb, ldx, nblk, res); bt = 4; }
      else if (r >= 2) { row_dot<ISA, F, 2, V, W16>(meta, v, xb, ldx, nblk, res); bt = 2; }
      else { row_dot<ISA, F, 1, V, W16>(meta, v, xb, ldx, nblk, res); bt = 1; }
      for (int64_t t = 0; t < bt; ++t) y[(b + t) * p.n + o] = res[t] + bo;
      b += bt;
    }
  }
}

template <int ISA, int F, typename V, bool W16 = false>
void expand_rows(const Packed& p, float* dst, int64_t ld, int64_t o0, int64_t o1) {
  const V* vals = static_cast<const V*>(p.values);
  for (int64_t o = o0; o < o1; ++o)
    expand_row<ISA, F, V, W16>(p.meta + o * p.stride, vals + p.row_ptr[o], p.k32 / 32, dst + (o - o0) * ld);
}

using GemvFn = void (*)(const Packed&, const float*, int64_t, int64_t, const float*, float*, int64_t, int64_t);
using ExpandFn = void (*)(const Packed&, float*, int64_t, int64_t, int64_t);
using GemvBf16Fn = void (*)(const Packed&, const uint16_t*, int64_t, int64_t, const float*, float*, int64_t, int64_t);

template <int ISA, typename V, bool W16 = false>
void pick(int fmt, GemvFn& g, ExpandFn& e) {
  switch (fmt) {
    case BITMASK: g = gemv_rows<ISA, BITMASK, V, float, W16>; e = expand_rows<ISA, BITMASK, V, W16>; break;
    case NM24: g = gemv_rows<ISA, NM24, V, float, W16>; e = expand_rows<ISA, NM24, V, W16>; break;
    default: g = gemv_rows<ISA, NM14, V, float, W16>; e = expand_rows<ISA, NM14, V, W16>; break;
  }
}

template <typename V>
void pick_isa(int isa, int fmt, GemvFn& g, ExpandFn& e) {
#if LOSA_X86
  // bf16 values: the expansion is read here, once per call (or per engine layer, when the engine is built)
  if (isa == AVX512) {
    if (sizeof(V) == 2 && bf16_expand16()) return pick<AVX512, V, true>(fmt, g, e);
    return pick<AVX512, V>(fmt, g, e);
  }
  if (isa == AVX2) return pick<AVX2, V>(fmt, g, e);
#endif
  pick<SCALAR, V>(fmt, g, e);
}

int best_isa() {
#if LOSA_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("popcnt"))
    return AVX2;
#endif
  return SCALAR;
}

Packed make_packed(const torch::Tensor& meta, const torch::Tensor& values, const torch::Tensor& row_ptr,
                   int64_t n, int64_t k, int64_t fmt) {
  TORCH_CHECK(fmt >= BITMASK && fmt <= NM14, "unknown sparse format ", fmt);
  TORCH_CHECK(meta.dtype() == torch::kUInt8 && meta.is_contiguous() && meta.device().is_cpu(),
              "meta must be a contiguous CPU uint8 tensor");
  TORCH_CHECK(values.is_contiguous() && values.device().is_cpu() &&
                  (values.dtype() == torch::kFloat32 || values.dtype() == torch::kBFloat16),
              "values must be a contiguous CPU float32 or bfloat16 tensor");
  TORCH_CHECK(row_ptr.dtype() == torch::kInt64 && row_ptr.is_contiguous() && row_ptr.numel() == n + 1,
              "row_ptr must be a contiguous int64 tensor of N + 1 offsets");
  const int64_t k32 = (k + 31) / 32 * 32;
  const int64_t stride = meta_stride(static_cast<int>(fmt), k32);
  TORCH_CHECK(meta.numel() == n * stride, "meta has ", meta.numel(), " bytes, expected ", n * stride);
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[n] + 32 <= values.numel(), "values must hold row_ptr[N] + 32 (padding) elements");
  return Packed{meta.data_ptr<uint8_t>(), values.data_ptr(), rp, n, k, k32, stride};
}

#if LOSA_X86
// Expand bf16 values straight into bf16 rows (exact), for the bf16 large-batch path.
template <int F>
LOSA_AVX512 void expand_rows_bf16_avx512(const Packed& p, uint16_t* dst, int64_t ld, int64_t o0, int64_t o1) {
  const uint16_t* vals = static_cast<const uint16_t*>(p.values);
  const int64_t nblk = p.k32 / 32;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* meta = p.meta + o * p.stride;
    const uint16_t* v = vals + p.row_ptr[o];
    expand_blocks_bf16<F>(meta, 0, nblk, v, dst + (o - o0) * ld);
  }
}
#endif


using ExpandBf16Fn = void (*)(const Packed&, uint16_t*, int64_t, int64_t, int64_t);

ExpandBf16Fn select_bf16(const torch::Tensor& values, int64_t isa, int64_t fmt) {
#if LOSA_X86
  if (values.dtype() == torch::kBFloat16 && isa == AVX512) {
    switch (fmt) {
      case BITMASK: return expand_rows_bf16_avx512<BITMASK>;
      case NM24: return expand_rows_bf16_avx512<NM24>;
      default: return expand_rows_bf16_avx512<NM14>;
    }
  }
#endif
  return nullptr;
}

// The bf16-input row loop for bf16 values on AVX-512 CPUs with AVX512-BF16; nullptr elsewhere.
GemvBf16Fn select_bf16dot(const torch::Tensor& values, int64_t isa, int64_t fmt) {
#if LOSA_BF16
  if (values.dtype() == torch::kBFloat16 && isa == AVX512 && cpu_has_bf16dot()) {
    switch (fmt) {
      case BITMASK: return gemv_rows<AVX512, BITMASK, uint16_t, uint16_t>;
      case NM24: return gemv_rows<AVX512, NM24, uint16_t, uint16_t>;
      default: return gemv_rows<AVX512, NM14, uint16_t, uint16_t>;
    }
  }
#endif
  return nullptr;
}

using DenseF32xFn = void (*)(const uint16_t*, const float*, int64_t, const float*, float*, int64_t, int64_t);

DenseF32xFn select_dense_f32x(int64_t isa) {
  TORCH_CHECK(isa >= SCALAR && isa <= best_isa(), "ISA level ", isa, " is not supported by this CPU");
#if LOSA_X86
  if (isa == AVX512) return dense_rows_f32x_avx512;
  if (isa == AVX2) return dense_rows_f32x_avx2;
#endif
  return dense_rows_f32x_scalar;
}

void select(const torch::Tensor& values, int64_t isa, int64_t fmt, GemvFn& g, ExpandFn& e) {
  TORCH_CHECK(isa >= SCALAR && isa <= best_isa(), "ISA level ", isa, " is not supported by this CPU");
  if (values.dtype() == torch::kFloat32) pick_isa<float>(static_cast<int>(isa), static_cast<int>(fmt), g, e);
  else pick_isa<uint16_t>(static_cast<int>(isa), static_cast<int>(fmt), g, e);
}

torch::Tensor pad_input(const torch::Tensor& x, int64_t k, int64_t k32) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.device().is_cpu() &&
                  (x.dtype() == torch::kFloat32 || x.dtype() == torch::kBFloat16),
              "x must be a float32 or bfloat16 CPU tensor of shape [B, ", k, "]");
  if (k == k32 && x.is_contiguous()) return x;
  auto xp = torch::zeros({x.size(0), k32}, x.options());
  xp.narrow(1, 0, k).copy_(x);
  return xp;
}

// ---------------------------------------------------------------- exported functions

// the bias as float32 [N] (undefined without one)
torch::Tensor float_bias(const c10::optional<torch::Tensor>& bias, int64_t n) {
  if (!(bias.has_value() && bias->defined())) return {};
  torch::Tensor b = bias->to(torch::kFloat32).contiguous();
  TORCH_CHECK(b.numel() == n, "bias must have N elements");
  return b;
}

// Sparse GEMV/GEMM for small batches: y [B, N] = x [B, K] · Wᵀ (+ bias).
torch::Tensor spmm(const torch::Tensor& x, const torch::Tensor& meta, const torch::Tensor& values,
                   const torch::Tensor& row_ptr, const c10::optional<torch::Tensor>& bias, int64_t n, int64_t k,
                   int64_t fmt, int64_t isa) {
  Packed p = make_packed(meta, values, row_ptr, n, k, fmt);
  GemvFn g;
  ExpandFn e;
  select(values, isa, fmt, g, e);
  GemvBf16Fn gb = x.dtype() == torch::kBFloat16 ? select_bf16dot(values, isa, fmt) : nullptr;
  torch::Tensor xp = pad_input(gb ? x : x.to(torch::kFloat32), k, p.k32);
  const int64_t B = xp.size(0);
  auto y = torch::empty({B, n}, x.options().dtype(torch::kFloat32));
  const float* bp = nullptr;
  torch::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    bc = bias->to(torch::kFloat32).contiguous();
    TORCH_CHECK(bc.numel() == n, "bias must have N elements");
    bp = bc.data_ptr<float>();
  }
  float* yptr = y.data_ptr<float>();
  if (gb) {
    const uint16_t* xptr = reinterpret_cast<const uint16_t*>(xp.data_ptr<at::BFloat16>());
    at::parallel_for(0, n, 16, [&](int64_t o0, int64_t o1) { gb(p, xptr, B, p.k32, bp, yptr, o0, o1); });
  } else {
    const float* xptr = xp.data_ptr<float>();
    at::parallel_for(0, n, 16, [&](int64_t o0, int64_t o1) { g(p, xptr, B, p.k32, bp, yptr, o0, o1); });
  }
  return y;
}

// Dense float32 rows [o0, o1) of W, shape [o1 - o0, K].
torch::Tensor decompress(const torch::Tensor& meta, const torch::Tensor& values, const torch::Tensor& row_ptr,
                         int64_t n, int64_t k, int64_t fmt, int64_t isa, int64_t o0, int64_t o1) {
  Packed p = make_packed(meta, values, row_ptr, n, k, fmt);
  TORCH_CHECK(0 <= o0 && o0 <= o1 && o1 <= n, "row range out of bounds");
  GemvFn g;
  ExpandFn e;
  select(values, isa, fmt, g, e);
  auto out = torch::empty({o1 - o0, p.k32}, torch::TensorOptions().dtype(torch::kFloat32));
  float* d = out.data_ptr<float>();
  at::parallel_for(o0, o1, 16, [&](int64_t a, int64_t b) { e(p, d + (a - o0) * p.k32, p.k32, a, b); });
  return out.narrow(1, 0, k);
}

// Large batches: decompress `tile` rows at a time into a cache-resident buffer and run a dense GEMM.
// With `bf16`, the tiles are bf16 (expanded straight to bf16 on AVX-512 when the values are bf16, else
// rounded from the float32 tile) and multiply bf16 activations (torch's bf16 GEMM: oneDNN with
// AVX512-BF16/AMX where the CPU has them; float32 accumulation). The weights are exact when the values are
// stored in bf16; the activations and the output are rounded to bf16, as in a dense bf16 model.
// x is any floating dtype (converted to the GEMM's); the result [B, N] is bf16 for a bf16 GEMM without bias,
// else float32.
// x_left: each tile computes x · W_tileᵀ straight into its columns of the [B, N] result (GEMM with M = B),
// else W_tile · xᵀ into rows of an [N, B] result transposed at the end (M = tile rows). oneDNN's kernel
// choice differs between the two; which is faster depends on B and K (SparseLinear picks, see there).
torch::Tensor dense_mm_impl(const torch::Tensor& x, const torch::Tensor& meta, const torch::Tensor& values,
                            const torch::Tensor& row_ptr, const c10::optional<torch::Tensor>& bias, int64_t n,
                            int64_t k, int64_t fmt, int64_t isa, int64_t tile, bool bf16, bool x_left) {
  Packed p = make_packed(meta, values, row_ptr, n, k, fmt);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.is_floating_point(), "x must be a floating-point [B, K] tensor");
  GemvFn g;
  ExpandFn e;
  select(values, isa, fmt, g, e);
  ExpandBf16Fn eb = bf16 ? select_bf16(values, isa, fmt) : nullptr;
  tile = std::max<int64_t>(1, std::min(tile, n));
  {  // as many tiles per thread: round the tile count up to a multiple of the threads (11008 rows: 44 tiles
     // of 251 instead of 43 of 256, which left one thread a whole tile more on 2 threads)
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    int64_t count = (n + tile - 1) / tile;
    if (count > 1 && count % threads) {
      count += threads - count % threads;
      tile = std::max<int64_t>(1, (n + count - 1) / count);
    }
  }
  auto xg = x.to(bf16 ? torch::kBFloat16 : torch::kFloat32).contiguous();
  auto xt = xg.t();
  // x_left: [B, N], each tile a column slice; else Wx as [N, B], each tile a contiguous row slice
  auto out = x_left ? torch::empty({x.size(0), n}, xg.options()) : torch::empty({n, x.size(0)}, xg.options());
  const int64_t ntiles = (n + tile - 1) / tile;
  // Threads split the tiles: each decompresses its own tiles into its own buffer and multiplies them with a
  // GEMM that runs on that thread (ATen ops inside at::parallel_for are serial). No fork/join per tile, and
  // a tile stays in the cache of the core that wrote it.
  const at::ThreadLocalState caller;  // inference/grad mode of the calling thread, for the worker threads
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard tls(caller);
    auto scratch = torch::empty({eb ? 1 : tile, p.k32}, x.options().dtype(torch::kFloat32));
    auto scratch_bf = torch::empty({bf16 ? tile : 1, p.k32}, x.options().dtype(torch::kBFloat16));
    float* s = scratch.data_ptr<float>();
    uint16_t* sb = reinterpret_cast<uint16_t*>(scratch_bf.data_ptr<at::BFloat16>());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * tile, o1 = std::min(n, o0 + tile);
      if (eb) eb(p, sb, p.k32, o0, o1);
      else e(p, s, p.k32, o0, o1);
      auto w = (bf16 ? scratch_bf : scratch).narrow(0, 0, o1 - o0).narrow(1, 0, k);
      // copy the zero padding too: torch's bf16 GEMM (oneDNN) can read a strided operand's padding
      // columns, and garbage there (NaN) poisoned whole output rows
      if (bf16 && !eb) scratch_bf.narrow(0, 0, o1 - o0).copy_(scratch.narrow(0, 0, o1 - o0));
      if (x_left) {
        auto slice = out.narrow(1, o0, o1 - o0);
        at::mm_out(slice, xg, w.t());
      } else {
        auto slice = out.narrow(0, o0, o1 - o0);
        at::mm_out(slice, w, xt);
      }
    }
  });
  auto y = x_left ? out : out.t();
  if (!(bias.has_value() && bias->defined())) return y.contiguous();
  return (y.to(torch::kFloat32) + bias->to(torch::kFloat32)).contiguous();
}

torch::Tensor dense_mm(const torch::Tensor& x, const torch::Tensor& meta, const torch::Tensor& values,
                       const torch::Tensor& row_ptr, const c10::optional<torch::Tensor>& bias, int64_t n,
                       int64_t k, int64_t fmt, int64_t isa, int64_t tile, bool bf16) {
  return dense_mm_impl(x, meta, values, row_ptr, bias, n, k, fmt, isa, tile, bf16, false);
}

torch::Tensor dense_mm_xw(const torch::Tensor& x, const torch::Tensor& meta, const torch::Tensor& values,
                          const torch::Tensor& row_ptr, const c10::optional<torch::Tensor>& bias, int64_t n,
                          int64_t k, int64_t fmt, int64_t isa, int64_t tile, bool bf16) {
  return dense_mm_impl(x, meta, values, row_ptr, bias, n, k, fmt, isa, tile, bf16, true);
}

// Large bf16 batches at high sparsity: the zero-skipping sparse GEMM above (bf16 values, bf16 inputs,
// AVX512-BF16 only; bf16 products summed in float32 like a dense bf16 GEMM). Tokens go in chunks of 128
// (the last one rounded up to 32); each chunk is transposed once into xT [K32, TC] and shared by all
// rows. Returns [B, N]: bf16 sums without bias, float32 sums + bias with one.
torch::Tensor sparse_mm_bf16(const torch::Tensor& x, const torch::Tensor& meta, const torch::Tensor& values,
                             const torch::Tensor& row_ptr, const c10::optional<torch::Tensor>& bias, int64_t n,
                             int64_t k, int64_t fmt) {
  Packed p = make_packed(meta, values, row_ptr, n, k, fmt);
#if LOSA_BF16
  TORCH_CHECK(values.dtype() == torch::kBFloat16 && x.dtype() == torch::kBFloat16 && cpu_has_bf16dot() &&
                  best_isa() == AVX512,
              "sparse_mm_bf16 needs bf16 values, bf16 inputs and an AVX512-BF16 CPU");
  torch::Tensor xp = pad_input(x, k, p.k32);
  const int64_t B = xp.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  auto out = torch::empty({B, n}, x.options().dtype(has_bias ? torch::kFloat32 : torch::kBFloat16));
  PrefillFn fn_by_ng[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
  for (int ng = 1; ng <= 4; ++ng)
    fn_by_ng[ng] = fmt == BITMASK ? pick_prefill<BITMASK>(ng) : fmt == NM24 ? pick_prefill<NM24>(ng)
                                                                            : pick_prefill<NM14>(ng);
  for (int64_t t0 = 0; t0 < B; t0 += kPrefillTokens) {
    const int64_t rows = std::min<int64_t>(kPrefillTokens, B - t0);
    const int ng = static_cast<int>((rows + 31) / 32);
    auto xT = torch::zeros({p.k32, 32 * ng}, xp.options());
    xT.narrow(1, 0, rows).copy_(xp.narrow(0, t0, rows).t());
    auto yT = torch::empty({n, 32 * ng}, xp.options().dtype(torch::kFloat32));
    const uint16_t* xtp = reinterpret_cast<const uint16_t*>(xT.data_ptr<at::BFloat16>());
    float* ytp = yT.data_ptr<float>();
    PrefillFn fn = fn_by_ng[ng];
    at::parallel_for(0, n, 16, [&](int64_t o0, int64_t o1) { fn(p, xtp, ytp, o0, o1); });
    auto y = yT.narrow(1, 0, rows).t();
    if (has_bias) out.narrow(0, t0, rows).copy_(y + bias->to(torch::kFloat32));
    else out.narrow(0, t0, rows).copy_(y);
  }
  return out;
#else
  TORCH_CHECK(false, "sparse_mm_bf16 needs AVX512-BF16 compiler support (built with LOSA_NO_BF16 or an old compiler)");
#endif
}


// ---------------------------------------------------------------- AMX bf16 tiles (small batches and prompts)
// On CPUs with AMX (Sapphire Rapids and later Xeons) a tile multiply-add TDPBF16PS computes a 16 x 16 float32
// block from 16 x 32 bf16 weights and 32 x 16 bf16 inputs. The weights are expanded 32 rows at a time into a
// cache-resident buffer (vpexpandw, as for the decompressed tiles) and fed to the tiles straight from there:
// no GEMM call per tile and no buffer larger than the L2. Unlike the vdpbf16ps row loop, whose work grows with
// the batch rows, 16 (and 32) rows cost one tile multiply, so small batches cost about as much as one row.
//   C (tiles 0-3) [16 weight rows x 16 tokens] float32 += A (tiles 4, 5) [16 weight rows x 32 inputs] bf16
//                                                        x B (tiles 6, 7) [32 inputs x 16 tokens] bf16
// B is in the tiles' pair-interleaved layout: row r of a tile holds inputs 2r and 2r+1 of each of 16 tokens,
// prepared once per call (xv [token tile][input block][16 rows][16 tokens][2]).
// Up to 32 tokens the sums stay in the tiles over the whole input (amx_rows_small). Above, inputs go in chunks
// small enough that the chunk of xv all weight rows share stays in the L2, and the float32 sums yT [N32, T16]
// are stored after each chunk and loaded again for the next (amx_rows).
// What limits it (a lab on a Sapphire Rapids core): the expansion, bound by the memory like the row loop, and the
// tile loads did not overlap in time, so a batch costs more than one row of the row loop, which therefore keeps
// the smallest batches (SparseLinear's AMX_ROW_LOOP_ROWS; benchmarks/results/amx_batch.md).
// Precision: bf16 products summed in float32 as by vdpbf16ps; TDPBF16PS treats bf16 denormals as zero.
#if LOSA_AMX
#define LOSA_AMXFN \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,avx2,fma,popcnt,amx-tile,amx-bf16")))

// AMX-BF16 and AMX-TILE in CPUID, and the tile state granted by Linux (>= 5.16) for this process.
bool amx_usable() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// One block of 32 inputs: the sums (tiles 0 and 2, with NT = 2 also 1 and 3) += the two 16-row weight tiles at w
// (row stride ldw elements) times the input tile at x0 (and x1). The tile intrinsics are macros that some GCC
// versions expand without parentheses around their arguments: every argument is a plain name.
template <int NT>
LOSA_AMXFN inline void amx_step(const uint16_t* w, int64_t ldw, const uint16_t* x0, const uint16_t* x1) {
  const uint16_t* w1 = w + 16 * ldw;
  const int64_t sw = ldw * 2;
  _tile_loadd(4, w, sw);
  _tile_loadd(5, w1, sw);
  _tile_loadd(6, x0, 64);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(2, 5, 6);
  if constexpr (NT == 2) {
    _tile_loadd(7, x1, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// yT[o, 16 tt .. 16 tt + 16 NT) for weight rows [ob, ob + 32) over input blocks [kb0, kb0 + nkb) of one chunk;
// w holds the chunk's 32 expanded rows (row stride ldw elements); first: start from zero instead of yT.
template <int NT>
LOSA_AMXFN inline void amx_block(const uint16_t* w, int64_t ldw, const uint16_t* xv, int64_t nblk, int64_t kb0,
                                 int64_t nkb, float* yT, int64_t ldy, int64_t ob, int64_t tt, bool first) {
  float* c0 = yT + ob * ldy + 16 * tt;  // sums of rows 0-15 (tokens of tile tt, then tt + 1 at c0n)
  float* c1 = c0 + 16 * ldy;            // rows 16-31
  float* c0n = c0 + 16;
  float* c1n = c1 + 16;
  const int64_t sy = ldy * 4;
  if (first) {
    _tile_zero(0);
    _tile_zero(2);
    if constexpr (NT == 2) { _tile_zero(1); _tile_zero(3); }
  } else {
    _tile_loadd(0, c0, sy);
    _tile_loadd(2, c1, sy);
    if constexpr (NT == 2) { _tile_loadd(1, c0n, sy); _tile_loadd(3, c1n, sy); }
  }
  const uint16_t* x0 = xv + (tt * nblk + kb0) * 512;
  const uint16_t* x1 = NT == 2 ? x0 + nblk * 512 : x0;  // (past xv's end with one token tile: not formed then)
  for (int64_t kb = 0; kb < nkb; ++kb) amx_step<NT>(w + 32 * kb, ldw, x0 + 512 * kb, x1 + 512 * kb);
  _tile_stored(0, c0, sy);
  _tile_stored(2, c1, sy);
  if constexpr (NT == 2) { _tile_stored(1, c0n, sy); _tile_stored(3, c1n, sy); }
}

// The 32 weight rows [ob, ob + 32) (rows past N are zero) for input blocks [kb0, kb0 + nkb), bf16, into w
// (row stride ldw); vp[o] is row o's next packed value and advances past the chunk. With several chunks a row's
// part of a chunk is a short piece of its values, too short for the hardware prefetcher: each row prefetches the
// piece of the same row of the next block (pf_bytes, the average piece) when this thread expands that block too
// (another thread may be advancing its vp).
template <int F>
LOSA_AMXFN void amx_expand(const Packed& p, int64_t* vp, int64_t ob, int64_t kb0, int64_t nkb, uint16_t* w,
                           int64_t ldw, int64_t pf_bytes, bool next_is_ours) {
  const uint16_t* vals = static_cast<const uint16_t*>(p.values);
  const int64_t meta_bytes = F == NM14 ? 2 : 4;
  for (int64_t r = 0; r < 32; ++r) {
    uint16_t* d = w + r * ldw;
    const int64_t o = ob + r;
    if (o >= p.n) {
      std::memset(d, 0, nkb * 64);
      continue;
    }
    if (pf_bytes > 0 && next_is_ours && o + 32 < p.n) {
      const char* q = reinterpret_cast<const char*>(vals + vp[o + 32]);
      for (int64_t i = 0; i < pf_bytes; i += 64) _mm_prefetch(q + i, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p.meta + (o + 32) * p.stride + meta_bytes * kb0), _MM_HINT_T0);
    }
    const uint8_t* meta = p.meta + o * p.stride;
    const uint16_t* v = vals + vp[o];
    expand_blocks_bf16<F>(meta, kb0, nkb, v, d);
    vp[o] = v - vals;
  }
  // GCC's tile-load intrinsics do not declare that they read memory: the stores above must not move past them
  asm volatile("" ::: "memory");
}

// The result of one block of 32 weight rows: y[t, ob + r] = yT[ob + r, t] (+ bias), rounded to bf16 (to nearest
// even, as torch, except that float32 denormal sums flush to zero) or kept in float32, for the B tokens; 16 rows
// per gather.
struct AmxOut {
  void* y;
  const float* bias;
  int64_t B, n;
  bool bf16;
};

LOSA_AMXFN void amx_write(const float* c, int64_t ldc, int64_t ob, const AmxOut& out) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(static_cast<int>(ldc)));
  for (int64_t r0 = 0; r0 < 32 && ob + r0 < out.n; r0 += 16) {
    const int64_t cnt = std::min<int64_t>(16, out.n - ob - r0);
    const __mmask16 m = static_cast<__mmask16>((1u << cnt) - 1);
    const __m512 b = out.bias ? _mm512_maskz_loadu_ps(m, out.bias + ob + r0) : _mm512_setzero_ps();
    const float* col = c + r0 * ldc;
    for (int64_t t = 0; t < out.B; ++t) {
      const __m512 v = _mm512_add_ps(_mm512_i32gather_ps(rows, col + t, 4), b);
      if (out.bf16)
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out.y) + t * out.n + ob + r0, m,
                                 (__m256i)_mm512_cvtneps_pbh(v));
      else
        _mm512_mask_storeu_ps(static_cast<float*>(out.y) + t * out.n + ob + r0, m, v);
    }
  }
}

LOSA_AMXFN inline void amx_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  asm volatile("" ::: "memory");  // the intrinsic declares only 8 of the config's 64 bytes as read
  _tile_loadconfig(&cfg);
}

// Up to 32 tokens (NT token tiles): the four sums stay in tiles 0-3 over the whole input, and the weights are
// expanded kAmxSub blocks of 32 inputs at a time into an L1-resident buffer that the tiles read right away.
constexpr int64_t kAmxSub = 8;

template <int F, int NT>
LOSA_AMXFN void amx_rows_small(const Packed& p, const uint16_t* xv, const AmxOut& out, int64_t blk0, int64_t blk1) {
  amx_config();
  constexpr int64_t ldw = 32 * kAmxSub + 32;  // +64 bytes: rows in different cache sets
  alignas(64) uint16_t w[32 * ldw];
  alignas(64) float c[32 * 32];
  const uint16_t* vals = static_cast<const uint16_t*>(p.values);
  const int64_t nblk = p.k32 / 32;
  const int64_t meta_bytes = F == NM14 ? 2 : 4;
  for (int64_t b = blk0; b < blk1; ++b) {
    const int64_t ob = 32 * b, rows = std::min<int64_t>(32, p.n - ob);
    const uint16_t* v[32];
    for (int64_t r = 0; r < rows; ++r) v[r] = vals + p.row_ptr[ob + r];
    if (rows < 32) std::memset(w + rows * ldw, 0, sizeof(uint16_t) * (32 - rows) * ldw);
    _tile_zero(0);
    _tile_zero(2);
    if constexpr (NT == 2) { _tile_zero(1); _tile_zero(3); }
    for (int64_t s0 = 0; s0 < nblk; s0 += kAmxSub) {
      asm volatile("" ::: "memory");  // the tile loads of the previous sub-block read w before it is overwritten
      const int64_t ns = std::min(kAmxSub, nblk - s0);
      for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* meta = p.meta + (ob + r) * p.stride;
        _mm_prefetch(reinterpret_cast<const char*>(v[r]) + 1024, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(meta + meta_bytes * s0) + 256, _MM_HINT_T0);
        expand_blocks_bf16<F>(meta, s0, ns, v[r], w + r * ldw);
      }
      asm volatile("" ::: "memory");  // the expanded rows (and the zeroed ones) are in memory before the tile loads
      const uint16_t* x0 = xv + s0 * 512;
      const uint16_t* x1 = NT == 2 ? x0 + nblk * 512 : x0;
      for (int64_t kb = 0; kb < ns; ++kb) amx_step<NT>(w + 32 * kb, ldw, x0 + 512 * kb, x1 + 512 * kb);
    }
    float* c1 = c + 16 * 32;  // rows 16-31; c0n, c1n: the second token tile
    float* c0n = c + 16;
    float* c1n = c1 + 16;
    _tile_stored(0, c, 128);
    _tile_stored(2, c1, 128);
    if constexpr (NT == 2) { _tile_stored(1, c0n, 128); _tile_stored(3, c1n, 128); }
    amx_write(c, 32, ob, out);
  }
  _tile_release();
}

template <int F>
LOSA_AMXFN void amx_rows(const Packed& p, int64_t* vp, const uint16_t* xv, int64_t ntt, float* yT, int64_t ldy,
                         int64_t kb0, int64_t nkb, int64_t pf_bytes, const AmxOut* out, int64_t blk0, int64_t blk1) {
  amx_config();
  const int64_t nblk = p.k32 / 32, ldw = 32 * nkb + 32;  // +64 bytes: rows in different cache sets
  std::vector<uint16_t> w(32 * ldw);
  for (int64_t b = blk0; b < blk1; ++b) {
    const int64_t ob = 32 * b;
    amx_expand<F>(p, vp, ob, kb0, nkb, w.data(), ldw, pf_bytes, b + 1 < blk1);
    int64_t tt = 0;
    for (; tt + 1 < ntt; tt += 2) amx_block<2>(w.data(), ldw, xv, nblk, kb0, nkb, yT, ldy, ob, tt, kb0 == 0);
    if (tt < ntt) amx_block<1>(w.data(), ldw, xv, nblk, kb0, nkb, yT, ldy, ob, tt, kb0 == 0);
    if (out) amx_write(yT + ob * ldy, ldy, ob, *out);
  }
  _tile_release();
}
#endif

bool amx_available() {
#if LOSA_AMX
  return best_isa() == AVX512 && cpu_has_bf16dot() && amx_usable();
#else
  return false;
#endif
}

// y [B, N] = x [B, K] · Wᵀ (+ bias) on AMX tiles (bf16 values, bf16 inputs, float32 sums). Returns bf16 sums
// without bias, float32 sums + bias with one (as sparse_mm_bf16).
torch::Tensor amx_mm_bf16(const torch::Tensor& x, const torch::Tensor& meta, const torch::Tensor& values,
                          const torch::Tensor& row_ptr, const c10::optional<torch::Tensor>& bias, int64_t n,
                          int64_t k, int64_t fmt) {
  Packed p = make_packed(meta, values, row_ptr, n, k, fmt);
#if LOSA_AMX
  TORCH_CHECK(values.dtype() == torch::kBFloat16 && x.dtype() == torch::kBFloat16 && amx_available(),
              "amx_mm_bf16 needs bf16 values, bf16 inputs and a CPU with AMX-BF16");
  torch::Tensor xp = pad_input(x, k, p.k32);
  const int64_t B = xp.size(0), nblk = p.k32 / 32, ntt = (B + 15) / 16, ldy = 16 * ntt;
  const int64_t n32 = (n + 31) / 32 * 32;
  const bool has_bias = bias.has_value() && bias->defined();
  if (B == 0 || n == 0 || nblk == 0) {  // no rows, no outputs, or no inputs: the bias (or zeros) alone
    auto z = torch::zeros({B, n}, x.options().dtype(has_bias ? torch::kFloat32 : torch::kBFloat16));
    return has_bias ? z + float_bias(bias, n) : z;
  }
  // xv[tt][kb][r][t] (pairs of bf16 as one uint32) = x[16 tt + t][32 kb + 2 r .. + 1]; zero past B
  auto xv = torch::empty({ntt * nblk * 256}, xp.options().dtype(torch::kInt32));
  const char* x8 = reinterpret_cast<const char*>(xp.data_ptr<at::BFloat16>());
  uint32_t* v32 = reinterpret_cast<uint32_t*>(xv.data_ptr<int32_t>());
  const int64_t ld32 = p.k32 / 2;
  at::parallel_for(0, ntt * nblk, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t tt = i / nblk, kb = i % nblk;
      uint32_t* d = v32 + i * 256;
      for (int64_t t = 0; t < 16; ++t) {
        const int64_t row = 16 * tt + t;
        for (int64_t r = 0; r < 16; ++r) {
          uint32_t pair = 0;  // two bf16 inputs; memcpy: x may start at an odd bf16 offset
          if (row < B) std::memcpy(&pair, x8 + 4 * (row * ld32 + 16 * kb + r), 4);
          d[16 * r + t] = pair;
        }
      }
    }
  });
  const torch::Tensor bias32 = float_bias(bias, n);
  auto y = torch::empty({B, n}, x.options().dtype(has_bias ? torch::kFloat32 : torch::kBFloat16));
  const AmxOut out{y.data_ptr(), has_bias ? bias32.data_ptr<float>() : nullptr, B, n, !has_bias};
  const uint16_t* xvp = reinterpret_cast<const uint16_t*>(v32);
  if (ntt <= 2) {
    at::parallel_for(0, n32 / 32, 1, [&](int64_t b0, int64_t b1) {
      const bool two = ntt == 2;
      switch (fmt) {
        case BITMASK: two ? amx_rows_small<BITMASK, 2>(p, xvp, out, b0, b1) : amx_rows_small<BITMASK, 1>(p, xvp, out, b0, b1); break;
        case NM24: two ? amx_rows_small<NM24, 2>(p, xvp, out, b0, b1) : amx_rows_small<NM24, 1>(p, xvp, out, b0, b1); break;
        default: two ? amx_rows_small<NM14, 2>(p, xvp, out, b0, b1) : amx_rows_small<NM14, 1>(p, xvp, out, b0, b1);
      }
    });
    return y;
  }
  auto yT = torch::empty({n32, ldy}, xp.options().dtype(torch::kFloat32));
  std::vector<int64_t> vp(p.row_ptr, p.row_ptr + n);
  float* ytp = yT.data_ptr<float>();
  // inputs per chunk: the chunk of xv (1 KiB per token tile and block of 32 inputs) within 256 KiB
  const int64_t chunk_blocks = std::max<int64_t>(8, std::min<int64_t>(nblk, 256 / ntt));
  const double bytes_per_block = 2.0 * static_cast<double>(p.row_ptr[n]) / static_cast<double>(std::max<int64_t>(1, n * nblk));
  for (int64_t kb0 = 0; kb0 < nblk; kb0 += chunk_blocks) {
    const int64_t nkb = std::min(chunk_blocks, nblk - kb0);
    const bool last = kb0 + nkb >= nblk;
    const int64_t pf_bytes = nkb < nblk ? static_cast<int64_t>(bytes_per_block * nkb) + 64 : 0;
    at::parallel_for(0, n32 / 32, 1, [&](int64_t b0, int64_t b1) {
      const AmxOut* o = last ? &out : nullptr;
      switch (fmt) {
        case BITMASK: amx_rows<BITMASK>(p, vp.data(), xvp, ntt, ytp, ldy, kb0, nkb, pf_bytes, o, b0, b1); break;
        case NM24: amx_rows<NM24>(p, vp.data(), xvp, ntt, ytp, ldy, kb0, nkb, pf_bytes, o, b0, b1); break;
        default: amx_rows<NM14>(p, vp.data(), xvp, ntt, ytp, ldy, kb0, nkb, pf_bytes, o, b0, b1);
      }
    });
  }
  return y;
#else
  TORCH_CHECK(false, "amx_mm_bf16 needs AMX compiler support (GCC >= 11; built with LOSA_NO_AMX or another compiler)");
#endif
}

int64_t cpu_isa() { return best_isa(); }


// 2 MiB-aligned memory of n bytes with its whole 2 MiB pages advised for transparent huge pages (Linux, n >= 2
// MiB), or nullptr (smaller, another OS, or no memory): the caller then keeps torch's own memory. The decode loop
// streams each weight once per token; with 4 KiB pages every 4 KiB of values is a TLB miss, and with THP in
// "madvise" mode (the common default) torch's allocator never asks for huge pages. Only whole 2 MiB pages inside
// the buffer are advised, so no memory is wasted. Freed with std::free.
void* hugepage_buffer(size_t n) {
#if defined(__linux__)
  constexpr size_t kHuge = size_t(2) << 20;
  void* p = nullptr;
  if (n < kHuge || posix_memalign(&p, kHuge, n) != 0) return nullptr;
  madvise(p, n / kHuge * kHuge, MADV_HUGEPAGE);  // advice only: ignored where THP is off
  return p;
#else
  (void)n;
  return nullptr;
#endif
}

// A copy of `t` in huge-page memory (hugepage_buffer; contiguous CPU tensors of >= 2 MiB, else `t` itself).
torch::Tensor hugepage_copy(const torch::Tensor& t) {
  if (!t.is_contiguous() || !t.device().is_cpu()) return t;
  void* p = hugepage_buffer(t.nbytes());
  if (p == nullptr) return t;
  std::memcpy(p, t.data_ptr(), t.nbytes());
  return torch::from_blob(p, t.sizes(), [](void* q) { std::free(q); }, t.options());
}

}  // namespace

namespace losa {

torch::Tensor hugepage_zeros(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto options = torch::TensorOptions().dtype(dtype);
  int64_t numel = 1;
  for (int64_t d : sizes) numel *= d;
  const size_t n = static_cast<size_t>(numel) * c10::elementSize(dtype);
  void* p = hugepage_buffer(n);
  if (p == nullptr) return torch::zeros(sizes, options);
  std::memset(p, 0, n);
  return torch::from_blob(p, sizes, [](void* q) { std::free(q); }, options);
}

GemvCall prepare_gemv(const torch::Tensor& meta, const torch::Tensor& values, const torch::Tensor& row_ptr,
                      const c10::optional<torch::Tensor>& bias, int64_t n, int64_t k, int64_t fmt, int64_t isa) {
  Packed p = make_packed(meta, values, row_ptr, n, k, fmt);
  GemvFn g;
  ExpandFn e;
  select(values, isa, fmt, g, e);
  const torch::Tensor b = float_bias(bias, n);
  // the tensors travel with the callable: the packed pointers stay valid as long as it lives
  return [p, g, b, meta, values, row_ptr](const float* x, float* y, int64_t o0, int64_t o1) {
    g(p, x, 1, p.k32, b.defined() ? b.data_ptr<float>() : nullptr, y, o0, o1);
  };
}

GemvCallBf16 prepare_gemv_bf16(const torch::Tensor& meta, const torch::Tensor& values, const torch::Tensor& row_ptr,
                               const c10::optional<torch::Tensor>& bias, int64_t n, int64_t k, int64_t fmt,
                               int64_t isa) {
  Packed p = make_packed(meta, values, row_ptr, n, k, fmt);
  GemvBf16Fn gb = select_bf16dot(values, isa, fmt);
  if (!gb) return {};
  const torch::Tensor b = float_bias(bias, n);
  return [p, gb, b, meta, values, row_ptr](const uint16_t* x, float* y, int64_t o0, int64_t o1) {
    gb(p, x, 1, p.k32, b.defined() ? b.data_ptr<float>() : nullptr, y, o0, o1);
  };
}

GemvCallBf16 prepare_dense_gemv_bf16(const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                                     int64_t isa) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16 && weight.is_contiguous() &&
                  weight.device().is_cpu(), "weight must be a contiguous bfloat16 CPU tensor [N, K]");
#if LOSA_BF16
  if (isa != AVX512 || !cpu_has_bf16dot()) return {};
  const int64_t n = weight.size(0), k = weight.size(1);
  const torch::Tensor b = float_bias(bias, n);
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  // the weight travels with the callable (read in place, not copied)
  return [weight, b, w, k](const uint16_t* x, float* y, int64_t o0, int64_t o1) {
    dense_rows_bf16dot(w, x, k, b.defined() ? b.data_ptr<float>() : nullptr, y, o0, o1);
  };
#else
  (void)bias;
  (void)isa;
  return {};
#endif
}

GemvCall prepare_dense_gemv_f32x(const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16 && weight.is_contiguous() &&
                  weight.device().is_cpu(), "weight must be a contiguous bfloat16 CPU tensor [N, K]");
  const DenseF32xFn fn = select_dense_f32x(isa);
  const int64_t n = weight.size(0), k = weight.size(1);
  const torch::Tensor b = float_bias(bias, n);
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  return [weight, b, w, k, fn](const float* x, float* y, int64_t o0, int64_t o1) {
    fn(w, x, k, b.defined() ? b.data_ptr<float>() : nullptr, y, o0, o1);
  };
}

}  // namespace losa

// y [1, N] float32 = x [1, K] (float32) · Wᵀ (+ bias) for a dense bf16 weight W [N, K], read in place (each
// weight widened exactly, float32 products and sums): see prepare_dense_gemv_f32x.
torch::Tensor dense_gemv_f32x(const torch::Tensor& x, const torch::Tensor& weight,
                              const c10::optional<torch::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(weight.dim() == 2 && x.dim() == 2 && x.size(0) == 1 && x.size(1) == weight.size(1) &&
                  x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              "x must be a float32 CPU tensor [1, K] for a weight [N, K]");
  losa::GemvCall call = losa::prepare_dense_gemv_f32x(weight, bias, isa);
  torch::Tensor xc = x.contiguous();
  auto y = torch::empty({1, weight.size(0)}, x.options());
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, weight.size(0), 16, [&](int64_t o0, int64_t o1) { call(xp, yp, o0, o1); });
  return y;
}

// y [1, N] float32 = x [1, K] (bf16) · Wᵀ (+ bias) for a dense bf16 weight W [N, K], read in place: the
// AVX512-BF16 dense row loop (a bf16 model's LM head at batch 1; see prepare_dense_gemv_bf16).
torch::Tensor dense_gemv_bf16(const torch::Tensor& x, const torch::Tensor& weight,
                              const c10::optional<torch::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(weight.dim() == 2 && x.dim() == 2 && x.size(0) == 1 && x.size(1) == weight.size(1) &&
                  x.scalar_type() == torch::kBFloat16 && x.device().is_cpu(),
              "x must be a bfloat16 CPU tensor [1, K] for a weight [N, K]");
  losa::GemvCallBf16 call = losa::prepare_dense_gemv_bf16(weight, bias, isa);
  TORCH_CHECK(call, "the dense bf16 row loop needs AVX512-BF16 at the AVX-512 level");
  torch::Tensor xc = x.contiguous();
  auto y = torch::empty({1, weight.size(0)}, x.options().dtype(torch::kFloat32));
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, weight.size(0), 16, [&](int64_t o0, int64_t o1) { call(xp, yp, o0, o1); });
  return y;
}

// spmm as a dispatcher op as well (namespace = the extension's name), returning x's dtype: torch.compile'd
// decode steps call it straight from the generated code, without the Python custom op and dispatch of
// sparse_matmul around it. The rounding of a bf16/fp16 result happens here, inside the opaque op, so the
// compiler cannot fuse it away. Its fake (shape) function is registered from Python (losa/inference/kernel.py).
torch::Tensor spmm_as_input(const torch::Tensor& x, const torch::Tensor& meta, const torch::Tensor& values,
                            const torch::Tensor& row_ptr, const c10::optional<torch::Tensor>& bias, int64_t n,
                            int64_t k, int64_t fmt, int64_t isa) {
  torch::Tensor y = spmm(x, meta, values, row_ptr, bias, n, k, fmt, isa);
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("spmm(Tensor x, Tensor meta, Tensor values, Tensor row_ptr, Tensor? bias, int n, int k, int fmt, "
        "int isa) -> Tensor");
}
TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) { m.impl("spmm", &spmm_as_input); }

// SiLU of a float32 tensor as the decode engine computes it (losa::silu_inplace: the vector form where
// losa::attention_avx2(isa)), for tests against a float64 reference.
torch::Tensor silu_f32(const torch::Tensor& x, int64_t isa) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.device().is_cpu(), "silu_f32 takes a float32 CPU tensor");
  torch::Tensor y = x.contiguous().clone();
  losa::silu_inplace(y.data_ptr<float>(), y.numel(), losa::attention_avx2(isa));
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("spmm", &spmm, "sparse y = x W^T + b for small batches");
  m.def("dense_mm", &dense_mm, "tiled decompress + dense GEMM (float32 or bf16) for large batches");
  m.def("dense_mm_xw", &dense_mm_xw, "dense_mm with x · W_tileᵀ per tile (GEMM rows = batch rows)");
  m.def("decompress", &decompress, "dense float32 rows of a packed weight");
  m.def("dense_gemv_bf16", &dense_gemv_bf16, "dense bf16 weight times one bf16 row, read in place (AVX512-BF16)");
  m.def("dense_gemv_f32x", &dense_gemv_f32x, "dense bf16 weight times one float32 row, read in place");
  m.def("sparse_mm_bf16", &sparse_mm_bf16, "zero-skipping bf16 GEMM for large batches at high sparsity");
  m.def("amx_mm_bf16", &amx_mm_bf16, "bf16 sparse x dense on AMX tiles (small batches and prompts)");
  m.def("amx_available", &amx_available, "whether the AMX tile path runs on this CPU (AMX-BF16, tile state granted)");
  m.def("set_bf16_expand", [](int64_t mode) {
          TORCH_CHECK(mode >= -1 && mode <= 1, "set_bf16_expand takes -1 (by vendor), 0 or 1, got ", mode);
          g_bf16_expand.store(static_cast<int>(mode));
        },
        "how the AVX-512 float32-input loops expand bf16 values: -1 by CPU vendor (default), 0 widen first, "
        "1 vpexpandw first (for tests and benchmarks; read when a call starts and when a decode engine is built)");
  m.def("bf16_expand16", &bf16_expand16, "whether the AVX-512 float32-input loops expand bf16 values with vpexpandw");
  m.def("cpu_has_bf16dot", &cpu_has_bf16dot, "whether the bf16-input loop (AVX512-BF16) runs on this CPU");
  m.def("hugepage_copy", &hugepage_copy, "copy a CPU tensor into transparent-huge-page memory (Linux)");
  m.def("silu_f32", &silu_f32, "SiLU of a float32 tensor as the decode engine computes it (isa: vector form on AVX2)");
  losa::register_decode_engine(m);
  m.def("cpu_isa", &cpu_isa, "best ISA level: 0 scalar, 1 AVX2+FMA+F16C, 2 AVX-512 (F/BW/VL/VBMI2)");
}
