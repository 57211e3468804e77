// Decode engine: one whole decode step of a LLaMA-style decoder (LLaMA, Mistral, Qwen2) in C++, for one
// sequence, float32 or bf16 models (float32 arithmetic). Part of the losa_sparse_kernels extension; losa/inference/engine.py builds
// it from a Hugging Face model and attaches it to `generate`.
//
// Why: a small model's decode step is hundreds of tiny operations (norms, rotary, cache writes, attention,
// seven linears per layer); through Python modules each costs far more than its arithmetic, so a sparse
// SmolLM2 decoded at several times its bandwidth floor. Here a step is one call: the sparse row loops
// (sparse_linear.cpp) and the decode attention (decode_attention.cpp) run back to back on float32 buffers.
//
// Per layer, for hidden state h [H] at position p (Touvron et al. 2023, LLaMA; the Hugging Face modelling
// code of LlamaDecoderLayer is the reference the tests compare with):
//   x = RMSNorm(h) · w_in                 RMSNorm(h) = h / sqrt(mean(h²) + eps)     (Zhang & Sennrich 2019)
//   q, k, v = W_q x (+b), W_k x (+b), W_v x (+b)          heads: q [nh, D], k, v [nkv, D]
//   q, k = RoPE(q, p), RoPE(k, p)   rotate-half form: y_i = x_i cos_i - x_{i+D/2} sin_i (i < D/2),
//                                   y_i = x_i cos_i + x_{i-D/2} sin_i (i >= D/2)     (Su et al. 2021)
//   K[p], V[p] = k, v;   a = softmax(scale · q Kᵀ) V over positions 0..p, query head j reads KV head j / G
//   h += W_o a (+b)
//   x = RMSNorm(h) · w_post;   h += W_down (SiLU(W_gate x) ⊙ W_up x)   (Shazeer 2020, SwiGLU)
// then logits = W_head (RMSNorm(h) · w_final). cos/sin come from the model's own rotary embedding (so rope
// scaling variants are the model's), per position, as tables [max_len, D].
//
// bf16 models (bf16 = true): arithmetic stays float32, and every value a bf16 model stores in bf16 is rounded
// to bf16 (round to nearest even) where the Hugging Face modules round it: each linear's output, the
// normalised hidden state and its product with the norm weight, both products and the sum of the rotary
// embedding, the attention output, SiLU(gate) and its product with up, every residual sum, the logits. The
// linears then take bf16 inputs (the AVX512-BF16 loop where the CPU has it, else the float32 loop on the same
// rounded values). Sums inside a linear or the attention run in another order than torch's, so the result is
// close to the module's, not bit-identical.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "losa_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOSA_ENGINE_X86 1
#else
#define LOSA_ENGINE_X86 0
#endif

namespace {

inline int64_t pad32(int64_t k) { return (k + 31) / 32 * 32; }

// Attention work per thread chunk at least (multiply-adds over the cached positions): below it the heads stay on
// one thread.
constexpr int64_t kAttnGrain = int64_t{1} << 16;

// float32 -> the nearest bf16 (ties to even), returned as float32; and its 16 bits
inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float round_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) u = (u | 0x00400000u) & 0xffff0000u;  // NaN stays a (quiet) NaN
  else u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  float r;
  std::memcpy(&r, &u, sizeof r);
  return r;
}

// One linear layer: the packed row loop (float32 inputs, and bf16 inputs where the AVX512-BF16 loop runs), or
// a dense weight [N, K] for layers kept dense and the LM head: bf16 weights (a bf16 model's, or a float32
// model's bf16 head copy) through the AVX512-BF16 dense row loop where it runs, else the float32-input dense
// loop on the widened weights; float32 weights through at::linear.
struct Linear {
  losa::GemvCall call;
  losa::GemvCallBf16 call16;
  torch::Tensor weight, bias;
  int64_t n = 0, k = 0;

  // y[o0:o1] for x: float32 [K32] (zero padded); xb: the same values as bf16 bits, or nullptr (float32 model).
  // Serial: the step splits rows over threads.
  void rows(const float* x, const uint16_t* xb, float* y, int64_t o0, int64_t o1) const {
    if (o0 >= o1) return;
    if (xb && call16) {
      call16(xb, y, o0, o1);
      return;
    }
    if (call) {
      call(x, y, o0, o1);
      return;
    }
    // a float32 dense weight: at::linear on the rows' slice, as nn.Linear computes it; an ATen op inside
    // at::parallel_for runs on the calling thread
    auto yv = torch::from_blob(y + o0, {1, o1 - o0}, torch::kFloat32);
    auto xv = torch::from_blob(const_cast<float*>(x), {1, k}, torch::kFloat32);
    yv.copy_(at::linear(xv, weight.narrow(0, o0, o1 - o0),
                        bias.defined() ? c10::optional<torch::Tensor>(bias.narrow(0, o0, o1 - o0)) : c10::nullopt));
  }
};

struct Layer {
  torch::Tensor in_norm, post_norm;  // float32 [H]
  Linear q, k, v, o, gate, up, down;
};

// R(v): v itself (float32 model) or v rounded to bf16 (bf16 model)
template <bool B>
inline float R(float v) {
  if constexpr (B) return round_bf16(v);
  return v;
}

// y[0:n] = x / sqrt(mean(x²) + eps) · w   (x and y may not alias)
template <bool B>
void rms_norm(const float* x, const float* w, int64_t n, float eps, float* y) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float r = 1.f / std::sqrt(float(ss / double(n)) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = R<B>(w[i] * R<B>(x[i] * r));
}

// Rotary embedding of `heads` heads of D values in place (rotate-half form, see the top of the file).
template <bool B>
void rope(float* x, int64_t heads, int64_t D, const float* cos, const float* sin) {
  const int64_t h2 = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* xh = x + h * D;
    for (int64_t i = 0; i < h2; ++i) {
      const float a = xh[i], b = xh[i + h2];
      xh[i] = R<B>(R<B>(a * cos[i]) + R<B>(-b * sin[i]));
      xh[i + h2] = R<B>(R<B>(b * cos[i + h2]) + R<B>(a * sin[i + h2]));
    }
  }
}

template <bool B>
inline void round_all(float* x, int64_t n) {
  if constexpr (B)
    for (int64_t i = 0; i < n; ++i) x[i] = round_bf16(x[i]);
}

// bf16 bits of n values that are already bf16 (exact), for the bf16-input loop
inline void to_bits(const float* x, uint16_t* xb, int64_t n) {
  for (int64_t i = 0; i < n; ++i) xb[i] = static_cast<uint16_t>(f32_bits(x[i]) >> 16);
}

class DecodeEngine {
 public:
  // embed [V, H] float32 or bf16 (bf16: a bf16 model, see the top of the file); cos, sin [max_len, D] float32;
  // final_norm [H]; isa: the sparse kernel's level.
  DecodeEngine(torch::Tensor embed, torch::Tensor cos, torch::Tensor sin, torch::Tensor final_norm,
               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale, int64_t isa)
      : embed_(embed.contiguous()), cos_(cos.contiguous()), sin_(sin.contiguous()),
        final_norm_(final_norm.to(torch::kFloat32).contiguous()), nh_(num_heads), nkv_(num_kv_heads),
        D_(head_dim), eps_(float(eps)), scale_(float(scale)), isa_(isa), attn_level_(losa::attention_level(isa)),
        avx2_(attn_level_ >= 1) {
    TORCH_CHECK(embed_.dim() == 2 && (embed_.scalar_type() == torch::kFloat32 ||
                                      embed_.scalar_type() == torch::kBFloat16),
                "embed must be float32 or bfloat16 [V, H]");
    bf16_ = embed_.scalar_type() == torch::kBFloat16;
    TORCH_CHECK(cos_.dim() == 2 && cos_.sizes() == sin_.sizes() && cos_.size(1) == D_ &&
                    cos_.scalar_type() == torch::kFloat32 && sin_.scalar_type() == torch::kFloat32,
                "cos and sin must be float32 [max_len, head_dim]");
    TORCH_CHECK(nh_ > 0 && nkv_ > 0 && nh_ % nkv_ == 0 && D_ % 2 == 0, "heads must divide: num_heads ", nh_,
                ", num_kv_heads ", nkv_, ", head_dim ", D_);
    H_ = embed_.size(1);
    max_len_ = cos_.size(0);
    TORCH_CHECK(final_norm_.numel() == H_, "final_norm must have H elements");
  }

  // Queue one linear (order per layer: q, k, v, o, gate, up, down); packed when meta is given, else dense.
  void add_packed(torch::Tensor meta, torch::Tensor values, torch::Tensor row_ptr, c10::optional<torch::Tensor> bias,
                  int64_t n, int64_t k, int64_t fmt) {
    Linear l;
    l.call = losa::prepare_gemv(meta, values, row_ptr, bias, n, k, fmt, isa_);
    if (bf16_) l.call16 = losa::prepare_gemv_bf16(meta, values, row_ptr, bias, n, k, fmt, isa_);
    l.n = n;
    l.k = k;
    pending_.push_back(std::move(l));
  }

  // A dense weight in the model's dtype, or a bf16 weight in a float32 model (a bf16 LM head copy); the bias in
  // the weight's dtype (float32 for a bf16 copy).
  void add_dense(torch::Tensor weight, c10::optional<torch::Tensor> bias) {
    const bool b16 = weight.scalar_type() == torch::kBFloat16;
    TORCH_CHECK(weight.dim() == 2 && (b16 || (!bf16_ && weight.scalar_type() == torch::kFloat32)),
                "a dense weight must be [N, K] in the model's dtype (float32 or bfloat16), or bfloat16 in a "
                "float32 model");
    Linear l;
    l.weight = weight.contiguous();
    l.n = weight.size(0);
    l.k = weight.size(1);
    const bool has_bias = bias.has_value() && bias->defined();
    if (b16) {
      // bf16 weights, read in place: the AVX512-BF16 loop for a bf16 model's bf16 inputs where it runs, and the
      // float32-input loop on the widened weights (a float32 model, or a CPU without AVX512-BF16)
      const c10::optional<torch::Tensor> bias32 =
          has_bias ? c10::optional<torch::Tensor>(bias->to(torch::kFloat32).contiguous()) : c10::nullopt;
      if (bf16_) l.call16 = losa::prepare_dense_gemv_bf16(l.weight, bias32, isa_);
      l.call = losa::prepare_dense_gemv_f32x(l.weight, bias32, isa_);
    } else if (has_bias) {
      l.bias = bias->to(torch::kFloat32).contiguous();  // float32 weights: at::linear
    }
    pending_.push_back(std::move(l));
  }

  // Close a layer: its norms and the seven linears queued since the last layer.
  void add_layer(torch::Tensor in_norm, torch::Tensor post_norm) {
    TORCH_CHECK(pending_.size() == 7, "a layer needs 7 linears (q, k, v, o, gate, up, down), got ", pending_.size());
    Layer L;
    L.in_norm = in_norm.to(torch::kFloat32).contiguous();
    L.post_norm = post_norm.to(torch::kFloat32).contiguous();
    TORCH_CHECK(L.in_norm.numel() == H_ && L.post_norm.numel() == H_, "norm weights must have H elements");
    Linear* slots[7] = {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down};
    for (int i = 0; i < 7; ++i) *slots[i] = std::move(pending_[i]);
    pending_.clear();
    const int64_t qd = nh_ * D_, kd = nkv_ * D_, I = L.gate.n;
    TORCH_CHECK(L.q.n == qd && L.k.n == kd && L.v.n == kd && L.q.k == H_ && L.k.k == H_ && L.v.k == H_,
                "q/k/v projections do not match the heads");
    TORCH_CHECK(L.o.n == H_ && L.o.k == qd && L.up.n == I && L.gate.k == H_ && L.up.k == H_ && L.down.n == H_ &&
                    L.down.k == I, "o/gate/up/down projections do not match the hidden size");
    I_ = std::max(I_, I);
    layers_.push_back(std::move(L));
  }

  // The LM head: the last linear queued.
  void set_head() {
    TORCH_CHECK(pending_.size() == 1 && pending_[0].k == H_, "set_head takes exactly one queued linear of K = H");
    head_ = std::move(pending_[0]);
    pending_.clear();
  }

  // Allocate the KV cache, [layers, num_kv_heads, max_len, head_dim] each in the model's dtype (a bf16 model's
  // keys and values are bf16 values: stored as such, half the bytes); returns (K, V), sharing memory.
  // hugepages: the cache in transparent-huge-page memory (hugepage_zeros), read every step like a weight
  std::vector<torch::Tensor> allocate_cache(bool hugepages) {
    TORCH_CHECK(!layers_.empty() && head_.n > 0, "add the layers and the head first");
    const int64_t L = static_cast<int64_t>(layers_.size());
    const auto dt = bf16_ ? torch::kBFloat16 : torch::kFloat32;
    const std::vector<int64_t> shape{L, nkv_, max_len_, D_};
    kc_ = hugepages ? losa::hugepage_zeros(shape, dt) : torch::zeros(shape, dt);
    vc_ = hugepages ? losa::hugepage_zeros(shape, dt) : torch::zeros(shape, dt);
    return {kc_, vc_};
  }

  // One decode step: token at position pos (the cache holds positions 0..pos-1); returns logits float32 [V].
  torch::Tensor step(int64_t token, int64_t pos) { return bf16_ ? step_impl<true>(token, pos) : step_impl<false>(token, pos); }

 private:
  template <bool B>
  torch::Tensor step_impl(int64_t token, int64_t pos) {
    TORCH_CHECK(kc_.defined(), "allocate_cache() first");
    TORCH_CHECK(0 <= pos && pos < max_len_, "position ", pos, " is outside the cache (", max_len_, " positions)");
    TORCH_CHECK(0 <= token && token < embed_.size(0), "token id ", token, " is outside the vocabulary");
    const int64_t H = H_, D = D_, G = nh_ / nkv_, qd = nh_ * D, kd = nkv_ * D;
    const int64_t Hp = pad32(H), Ap = pad32(qd), Ip = pad32(I_);
    // scratch (zero padded inputs of the row loops)
    std::vector<float> h(H), xn(Hp, 0.f), q(qd), k(kd), v(kd), attn(Ap, 0.f), tmp(H), g(I_), act(Ip, 0.f);
    // bf16 copies of the linears' inputs (bf16 model only)
    std::vector<uint16_t> xnb(B ? Hp : 0, 0), attnb(B ? Ap : 0, 0), actb(B ? Ip : 0, 0);
    uint16_t* xnp = B ? xnb.data() : nullptr;
    uint16_t* attnp = B ? attnb.data() : nullptr;
    uint16_t* actp = B ? actb.data() : nullptr;
    if constexpr (B) {
      const uint16_t* e = reinterpret_cast<const uint16_t*>(embed_.data_ptr<at::BFloat16>()) + token * H;
      for (int64_t i = 0; i < H; ++i) h[i] = losa::bf16_to_float(e[i]);
    } else {
      std::memcpy(h.data(), embed_.data_ptr<float>() + token * H, sizeof(float) * H);
    }
    const float* cs = cos_.data_ptr<float>() + pos * D;
    const float* sn = sin_.data_ptr<float>() + pos * D;
    const int64_t S = pos + 1;
    const int64_t layer_stride = nkv_ * max_len_ * D;
    // Per layer five parallel phases (q/k/v, attention, o, gate/up, down), each one at::parallel_for over output
    // rows (heads for the attention) that also does the elementwise work on its own rows (rounding, residual
    // sums, SiLU ⊙ up); only the norms, rotary and cache writes run on one thread between them.
    constexpr int64_t kGrain = 16;  // output rows per chunk at least (as the kernel's own row split)
    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& L = layers_[li];
      rms_norm<B>(h.data(), L.in_norm.data_ptr<float>(), H, eps_, xn.data());
      if constexpr (B) to_bits(xn.data(), xnp, H);
      // q, k, v: one row range [0, qd + 2 kd) over the three projections (same input, same K)
      at::parallel_for(0, qd + 2 * kd, kGrain, [&](int64_t a, int64_t b) {
        const Linear* ls[3] = {&L.q, &L.k, &L.v};
        float* ys[3] = {q.data(), k.data(), v.data()};
        int64_t off = 0;
        for (int i = 0; i < 3; ++i) {
          const int64_t n = ls[i]->n, o0 = std::max<int64_t>(a - off, 0), o1 = std::min<int64_t>(b - off, n);
          ls[i]->rows(xn.data(), xnp, ys[i], o0, o1);
          if (o0 < o1) round_all<B>(ys[i] + o0, o1 - o0);
          off += n;
        }
      });
      rope<B>(q.data(), nh_, D, cs, sn);
      rope<B>(k.data(), nkv_, D, cs, sn);
      using C = std::conditional_t<B, uint16_t, float>;  // cache element: bf16 bits or float32
      C* K = static_cast<C*>(kc_.data_ptr()) + li * layer_stride;
      C* V = static_cast<C*>(vc_.data_ptr()) + li * layer_stride;
      for (int64_t j = 0; j < nkv_; ++j) {
        C* kslot = K + (j * max_len_ + pos) * D;
        C* vslot = V + (j * max_len_ + pos) * D;
        if constexpr (B) {
          to_bits(k.data() + j * D, kslot, D);
          to_bits(v.data() + j * D, vslot, D);
        } else {
          std::memcpy(kslot, k.data() + j * D, sizeof(float) * D);
          std::memcpy(vslot, v.data() + j * D, sizeof(float) * D);
        }
      }
      // query heads over threads, each chunk at least kAttnGrain multiply-adds; a chunk takes the query rows
      // of each KV head it touches (the blocked attention reads a KV head's cache once per call, for all those rows)
      const int64_t hgrain = std::max<int64_t>(1, kAttnGrain / std::max<int64_t>(1, S * 2 * D));
      at::parallel_for(0, nh_, hgrain, [&](int64_t h0, int64_t h1) {
        std::unique_ptr<float[]> sc(new float[static_cast<size_t>(losa::attend_scratch(S, G))]);
        for (int64_t j = h0 / G; j * G < h1; ++j) {
          const int64_t g0 = std::max(h0, j * G), g1 = std::min(h1, (j + 1) * G);
          if constexpr (B)
            losa::attend_bf16(q.data() + g0 * D, K + j * max_len_ * D, V + j * max_len_ * D, g1 - g0, S, D, scale_,
                              attn.data() + g0 * D, sc.get(), attn_level_);
          else
            losa::attend_f32(q.data() + g0 * D, K + j * max_len_ * D, V + j * max_len_ * D, g1 - g0, S, D, scale_,
                             attn.data() + g0 * D, sc.get(), attn_level_);
        }
        round_all<B>(attn.data() + h0 * D, (h1 - h0) * D);
        if constexpr (B) to_bits(attn.data() + h0 * D, attnp + h0 * D, (h1 - h0) * D);
      });
      // o, then the residual sum of its rows
      at::parallel_for(0, H, kGrain, [&](int64_t a, int64_t b) {
        L.o.rows(attn.data(), attnp, tmp.data(), a, b);
        for (int64_t i = a; i < b; ++i) h[i] = R<B>(h[i] + R<B>(tmp[i]));
      });
      rms_norm<B>(h.data(), L.post_norm.data_ptr<float>(), H, eps_, xn.data());
      if constexpr (B) to_bits(xn.data(), xnp, H);
      // gate and up over the same rows, then SiLU(gate) ⊙ up of those rows
      const int64_t I = L.gate.n;
      at::parallel_for(0, I, kGrain, [&](int64_t a, int64_t b) {
        L.gate.rows(xn.data(), xnp, g.data(), a, b);
        L.up.rows(xn.data(), xnp, act.data(), a, b);
        round_all<B>(g.data() + a, b - a);
        losa::silu_inplace(g.data() + a, b - a, avx2_);  // vector exp: a scalar std::exp per row was visible
        for (int64_t i = a; i < b; ++i) act[i] = R<B>(R<B>(g[i]) * R<B>(act[i]));
        if constexpr (B) to_bits(act.data() + a, actp + a, b - a);
      });
      std::fill(act.begin() + I, act.end(), 0.f);
      if constexpr (B) std::fill(actb.begin() + I, actb.end(), uint16_t{0});
      at::parallel_for(0, H, kGrain, [&](int64_t a, int64_t b) {
        L.down.rows(act.data(), actp, tmp.data(), a, b);
        for (int64_t i = a; i < b; ++i) h[i] = R<B>(h[i] + R<B>(tmp[i]));
      });
    }
    rms_norm<B>(h.data(), final_norm_.data_ptr<float>(), H, eps_, xn.data());
    if constexpr (B) to_bits(xn.data(), xnp, H);
    auto logits = torch::empty({head_.n}, torch::kFloat32);
    float* lp = logits.data_ptr<float>();
    at::parallel_for(0, head_.n, kGrain, [&](int64_t a, int64_t b) {
      head_.rows(xn.data(), xnp, lp, a, b);
      round_all<B>(lp + a, b - a);
    });
    return logits;
  }

  torch::Tensor embed_, cos_, sin_, final_norm_, kc_, vc_;
  int64_t nh_, nkv_, D_;
  float eps_, scale_;
  int64_t isa_;
  int attn_level_;
  bool avx2_, bf16_ = false;
  int64_t H_ = 0, I_ = 0, max_len_ = 0;
  std::vector<Layer> layers_;
  std::vector<Linear> pending_;
  Linear head_;
};

// The index of the first largest element of p [n], as torch.argmax gives it: the first NaN if there is one, else
// the first position of the maximum. Greedy decoding picks the next token with it (torch.argmax over a
// vocabulary's logits is a generic reduction that takes several times longer). Two passes: the maximum and a NaN
// flag, then the first element equal to it (or the first NaN). On x86-64, SSE (every x86-64 CPU has it) with
// four independent running maxima: one running maximum is a serial chain of compares, which compilers do not
// vectorise for floats.
int64_t first_argmax_scalar(const float* p, int64_t n) {
  float m = p[0];
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    m = p[i] > m ? p[i] : m;
    nan |= p[i] != p[i];
  }
  for (int64_t i = 0; i < n; ++i)
    if (nan ? p[i] != p[i] : p[i] == m) return i;
  return 0;  // not reached: some element is NaN or equals the maximum
}

#if LOSA_ENGINE_X86
int64_t first_argmax_sse(const float* p, int64_t n) {
  const __m128 ninf = _mm_set1_ps(-std::numeric_limits<float>::infinity());
  __m128 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf, unord = _mm_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128 a = _mm_loadu_ps(p + i), b = _mm_loadu_ps(p + i + 4), c = _mm_loadu_ps(p + i + 8),
                 d = _mm_loadu_ps(p + i + 12);
    m0 = _mm_max_ps(a, m0);  // a > m0 ? a : m0: a NaN leaves the maximum as it was
    m1 = _mm_max_ps(b, m1);
    m2 = _mm_max_ps(c, m2);
    m3 = _mm_max_ps(d, m3);
    unord = _mm_or_ps(unord, _mm_or_ps(_mm_cmpunord_ps(a, b), _mm_cmpunord_ps(c, d)));
  }
  float lanes[4];
  _mm_storeu_ps(lanes, _mm_max_ps(_mm_max_ps(m0, m1), _mm_max_ps(m2, m3)));
  float m = lanes[0];
  for (float v : lanes) m = v > m ? v : m;
  bool nan = _mm_movemask_ps(unord) != 0;
  for (; i < n; ++i) {
    m = p[i] > m ? p[i] : m;
    nan |= p[i] != p[i];
  }
  const __m128 vm = _mm_set1_ps(m);
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    const __m128 v = _mm_loadu_ps(p + k);
    const int bits = _mm_movemask_ps(nan ? _mm_cmpunord_ps(v, v) : _mm_cmpeq_ps(v, vm));
    if (bits) return k + __builtin_ctz(static_cast<unsigned>(bits));
  }
  for (; k < n; ++k)
    if (nan ? p[k] != p[k] : p[k] == m) return k;
  return 0;  // not reached
}
#endif

// isa: the kernel's ISA level (0 = the portable scalar loop, as LOSA_SPARSE_ISA=scalar asks; above it SSE on x86-64).
int64_t first_argmax(const torch::Tensor& x, int64_t isa) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.numel() > 0,
              "first_argmax takes a non-empty contiguous 1-D float32 tensor");
#if LOSA_ENGINE_X86
  if (isa > 0) return first_argmax_sse(x.data_ptr<float>(), x.numel());
#endif
  (void)isa;
  return first_argmax_scalar(x.data_ptr<float>(), x.numel());
}

}  // namespace

namespace losa {

void register_decode_engine(pybind11::module& m) {
  m.def("first_argmax", &first_argmax, "index of the first maximum of a float32 vector (NaN first), as torch.argmax",
        pybind11::arg("x"), pybind11::arg("isa") = 1);
  namespace py = pybind11;
  py::class_<DecodeEngine>(m, "DecodeEngine", "one decode step of a LLaMA-style decoder in C++ (decode_engine.cpp)")
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t, int64_t, double,
                    double, int64_t>())
      .def("add_packed", &DecodeEngine::add_packed)
      .def("add_dense", &DecodeEngine::add_dense)
      .def("add_layer", &DecodeEngine::add_layer)
      .def("set_head", &DecodeEngine::set_head)
      .def("allocate_cache", &DecodeEngine::allocate_cache, py::arg("hugepages") = false)
      .def("step", &DecodeEngine::step, py::call_guard<py::gil_scoped_release>());
}

}  // namespace losa
