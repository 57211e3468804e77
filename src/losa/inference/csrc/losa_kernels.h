// Entry points shared between the sources of the losa_sparse_kernels extension (sparse_linear.cpp,
// decode_attention.cpp, decode_engine.cpp): the decode engine calls the sparse row loop and the decode
// attention directly, without a tensor round trip or a dispatcher call per layer.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <functional>

namespace losa {

// A bf16 value (its 16 bits: the upper half of a float32) widened to float32, exactly.
inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// y[o0:o1] = W[o0:o1] · x (+ bias) for one input row: x is float32 [K32] (K rounded up to 32, zero padded), y
// float32 [N]; only output rows o0 <= o < o1 are computed, on the calling thread (callers split rows over
// threads, e.g. inside at::parallel_for). The callable keeps the packed tensors alive.
using GemvCall = std::function<void(const float* x, float* y, int64_t o0, int64_t o1)>;

// The row loop of the packed weight (layout: sparse_linear.cpp) at ISA level `isa` (0 scalar, 1 AVX2,
// 2 AVX-512); checks the layout like spmm does.
GemvCall prepare_gemv(const torch::Tensor& meta, const torch::Tensor& values, const torch::Tensor& row_ptr,
                      const c10::optional<torch::Tensor>& bias, int64_t n, int64_t k, int64_t fmt, int64_t isa);

// The same with bf16 inputs (raw bf16 bits, [K32], zero padded): the AVX512-BF16 loop (bf16 products, float32
// sums). An empty callable where it does not run (float32 values, another ISA, no AVX512-BF16).
using GemvCallBf16 = std::function<void(const uint16_t* x, float* y, int64_t o0, int64_t o1)>;
GemvCallBf16 prepare_gemv_bf16(const torch::Tensor& meta, const torch::Tensor& values, const torch::Tensor& row_ptr,
                               const c10::optional<torch::Tensor>& bias, int64_t n, int64_t k, int64_t fmt,
                               int64_t isa);

// A dense bf16 weight [N, K] (contiguous, read in place) times bf16 inputs x [>= K] (raw bits): the AVX512-BF16
// loop (bf16 products, float32 sums). An empty callable where it does not run (another ISA, no AVX512-BF16).
GemvCallBf16 prepare_dense_gemv_bf16(const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                                     int64_t isa);

// Decode attention of one KV head, float32: G query rows q [G, D] over the first S cached positions of
// k [S, D] and v [S, D]; out [G, D] is overwritten. scratch holds attend_scratch(S) floats. avx2: use the AVX2+FMA
// loops.
inline int64_t attend_scratch(int64_t S) { return 2 * S; }
void attend_f32(const float* q, const float* k, const float* v, int64_t G, int64_t S, int64_t D, float scale,
                float* out, float* scratch, bool avx2);

// The same over a bf16 cache (raw bf16 bits k [S, D], v [S, D]; widened exactly, float32 arithmetic).
void attend_bf16(const float* q, const uint16_t* k, const uint16_t* v, int64_t G, int64_t S, int64_t D, float scale,
                 float* out, float* scratch, bool avx2);

// Whether the AVX2+FMA attention loops may run at ISA level `isa` on this CPU.
bool attention_avx2(int64_t isa);

// Registers the DecodeEngine class (decode_engine.cpp) on the extension's Python module.
void register_decode_engine(pybind11::module& m);

}  // namespace losa
