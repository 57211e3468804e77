// SparseGPT's inner loop for one block of columns, row-parallel.
//
// Given a block W1 [R, B] of the weight, the upper Cholesky factor U [B, B] of the block's inverse
// Hessian and (for unstructured targets) the block's prune mask, process the columns one by one: each
// pruned weight's error e = w_i / U_ii is compensated in the later columns of its row,
// w_j -= e * U_ij (j > i), and the column itself becomes zero. Rows are independent given U, so each
// row runs the whole sequence on its own (no per-column launch overhead, the row stays in cache).
// For N:M targets (m > 0) the mask is chosen per row at the start of every group of m columns from
// the current weights: the n_prune smallest w^2 / U_jj^2 are pruned.
// Outputs: W1 updated in place, prune filled in (N:M), err [R, B] the per-column errors (for the
// lazy update of the columns after the block).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace {

void obs_block(torch::Tensor W1, torch::Tensor U, torch::Tensor prune, torch::Tensor err, int64_t m,
               int64_t n_prune) {
  TORCH_CHECK(W1.dtype() == torch::kFloat32 && U.dtype() == torch::kFloat32 && err.dtype() == torch::kFloat32,
              "obs_block: float32 tensors expected");
  TORCH_CHECK(prune.dtype() == torch::kBool, "obs_block: prune must be bool");
  TORCH_CHECK(W1.is_contiguous() && U.is_contiguous() && prune.is_contiguous() && err.is_contiguous(),
              "obs_block: contiguous tensors expected");
  const int64_t R = W1.size(0), B = W1.size(1);
  TORCH_CHECK(U.size(0) == B && U.size(1) == B && prune.size(0) == R && prune.size(1) == B,
              "obs_block: shape mismatch");
  TORCH_CHECK(m >= 0 && n_prune >= 0 && (m == 0 || n_prune < m), "obs_block: bad N:M");
  float* w_all = W1.data_ptr<float>();
  const float* u = U.data_ptr<float>();
  bool* p_all = prune.data_ptr<bool>();
  float* e_all = err.data_ptr<float>();
  std::vector<float> d2(B);
  for (int64_t i = 0; i < B; ++i) d2[i] = u[i * B + i] * u[i * B + i];

  at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
    std::vector<float> sal(m > 0 ? m : 1);
    for (int64_t r = r0; r < r1; ++r) {
      float* w = w_all + r * B;
      bool* p = p_all + r * B;
      float* e = e_all + r * B;
      for (int64_t i = 0; i < B; ++i) {
        if (m > 0 && i % m == 0) {
          const int64_t g = (B - i < m) ? B - i : m;
          for (int64_t j = 0; j < g; ++j) {
            sal[j] = w[i + j] * w[i + j] / d2[i + j];
            p[i + j] = false;
          }
          for (int64_t k = 0; k < n_prune && k < g; ++k) {  // n_prune smallest, first index on ties
            int64_t best = -1;
            for (int64_t j = 0; j < g; ++j)
              if (!p[i + j] && (best < 0 || sal[j] < sal[best])) best = j;
            p[i + best] = true;
          }
        }
        if (!p[i]) {
          e[i] = 0.0f;
          continue;
        }
        const float ei = w[i] / u[i * B + i];
        e[i] = ei;
        w[i] = 0.0f;
        if (ei != 0.0f) {
          const float* ui = u + i * B;
#pragma omp simd
          for (int64_t j = i + 1; j < B; ++j) w[j] -= ei * ui[j];
        }
      }
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("obs_block", &obs_block, "SparseGPT column loop over one block, row-parallel, in place");
}
