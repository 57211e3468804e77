// The blocked decode attention of decode_attention.cpp, written once against a vector type and included there
// twice: in namespace attn_avx2 with 8 float32 lanes (AVX2+FMA only, what AVX2-only CPUs run) and in namespace
// attn_avx512 with 16 lanes (AVX-512F), each under its own target pragma. Not a standalone header (and so no include
// guard): the including file provides `Vec` (the lane operations below), kPrefetch, prefetch_row, block_positions,
// attend_rows, <immintrin.h> (scores stores 4 sums at a time as __m128) and the standard headers.
//
// Vec: static constexpr int W (lanes); type V; zero(), set1(f), load(const float*) and load(const uint16_t*) (bf16
// widened exactly), storef(float*, V), fmadd(a, b, c), add, sub, max; exp_nonpositive(V) (lanes <= 0);
// type Flag with no_nan(), nan_seen(Flag, V) (flags a NaN lane), any(Flag); hsum(V), hmax(V) -> float;
// sums4(a0, a1, a2, a3) -> __m128 (the four lane sums, in order).

// Scores of GN (1 or 2) query rows q [GN, D] (D a multiple of W) against the keys of positions pos(i), i in
// [i0, i1): s[g][i] = scale · q[g] · k[pos(i)]. Four positions per pass share each q load, and each key load (widened
// once) feeds the GN rows: 4·GN independent accumulators, reduced once per pass. pf: prefetch the keys kPrefetch
// positions ahead (up to n, the last position + 1), for the call that reads this range first.
template <int GN, typename T, typename Pos>
void scores(const float* q, const T* k, int64_t D, int64_t i0, int64_t i1, int64_t n, bool pf, Pos pos, float scale,
            float* s0, float* s1) {
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  float* out[2] = {s0, s1};
  const __m128 sc4 = _mm_set1_ps(scale);
  int64_t i = i0;
  for (; i + 4 <= i1; i += 4) {
    if (pf && i + kPrefetch + 4 <= n)
      for (int p = 0; p < 4; ++p) prefetch_row(k + pos(i + kPrefetch + p) * D, D);
    const T* kr[4] = {k + pos(i) * D, k + pos(i + 1) * D, k + pos(i + 2) * D, k + pos(i + 3) * D};
    V acc[GN][4];
    for (int g = 0; g < GN; ++g)
      for (int p = 0; p < 4; ++p) acc[g][p] = Vec::zero();
    for (int64_t c = 0; c < D; c += W) {
      V qv[GN];
      for (int g = 0; g < GN; ++g) qv[g] = Vec::load(q + g * D + c);
      for (int p = 0; p < 4; ++p) {
        const V kv = Vec::load(kr[p] + c);
        for (int g = 0; g < GN; ++g) acc[g][p] = Vec::fmadd(qv[g], kv, acc[g][p]);
      }
    }
    for (int g = 0; g < GN; ++g)
      _mm_storeu_ps(out[g] + i, _mm_mul_ps(Vec::sums4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]), sc4));
  }
  for (; i < i1; ++i) {
    const T* kr = k + pos(i) * D;
    for (int g = 0; g < GN; ++g) {
      V a = Vec::zero();
      for (int64_t c = 0; c < D; c += W) a = Vec::fmadd(Vec::load(q + g * D + c), Vec::load(kr + c), a);
      out[g][i] = Vec::hsum(a) * scale;
    }
  }
}

// s[0:n] <- exp(s - max s) in place; returns the sum (n >= 1), 0 when every score is -inf (nothing to attend),
// or -1 (s unchanged) when a score is NaN or +inf: the caller then runs the plain loop, which passes those on as
// torch does.
inline float softmax_numerators(float* s, int64_t n) {
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  V mv = Vec::set1(-kInf);
  typename Vec::Flag nan = Vec::no_nan();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V x = Vec::load(s + i);
    mv = Vec::max(mv, x);
    nan = Vec::nan_seen(nan, x);
  }
  float mx = Vec::hmax(mv);
  bool bad = Vec::any(nan);
  for (; i < n; ++i) {
    mx = s[i] > mx ? s[i] : mx;
    bad = bad || std::isnan(s[i]);
  }
  if (bad || mx == kInf) return -1.f;
  if (mx == -kInf) return 0.f;  // every score -inf: nothing attended
  const V mxv = Vec::set1(mx);
  V sum = Vec::zero();
  for (i = 0; i + W <= n; i += W) {
    const V e = Vec::exp_nonpositive(Vec::sub(Vec::load(s + i), mxv));
    Vec::storef(s + i, e);
    sum = Vec::add(sum, e);
  }
  float total = Vec::hsum(sum);
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - mx);
    total += s[i];
  }
  return total;
}

// out[g][c:c+W·NV] += Σ_{i in [i0, i1)} p[g][i] · v[pos(i)][c:c+W·NV] for GN rows: W·NV outputs per row in
// registers over the range (one load and store of them per call), each value load (widened once) feeding the GN
// rows. pf: prefetch whole value rows kPrefetch positions ahead (up to n), for the call that reads the range first.
template <int GN, int NV, typename T, typename Pos>
void pv(const float* const* p, const T* v, int64_t Dv, int64_t c, int64_t i0, int64_t i1, int64_t n, bool pf,
        Pos pos, float* const* out) {
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  V acc[GN][NV];
  for (int g = 0; g < GN; ++g)
    for (int t = 0; t < NV; ++t) acc[g][t] = Vec::load(out[g] + c + W * t);
  for (int64_t i = i0; i < i1; ++i) {
    if (pf && i + kPrefetch < n) prefetch_row(v + pos(i + kPrefetch) * Dv, Dv);
    const T* vr = v + pos(i) * Dv + c;
    V w[GN];
    for (int g = 0; g < GN; ++g) w[g] = Vec::set1(p[g][i]);
    for (int t = 0; t < NV; ++t) {
      const V vv = Vec::load(vr + W * t);
      for (int g = 0; g < GN; ++g) acc[g][t] = Vec::fmadd(w[g], vv, acc[g][t]);
    }
  }
  for (int g = 0; g < GN; ++g)
    for (int t = 0; t < NV; ++t) Vec::storef(out[g] + c + W * t, acc[g][t]);
}

// attend() with D and Dv multiples of W: query rows in pairs, scores of four positions per pass, a vectorised
// softmax, and P·V with the outputs in registers; both products go over the positions a block at a time with
// every row pair inside the block, so that each KV head's keys and values stream from memory once per call
// whatever the number of query rows (G) and the head size. scratch: losa::attend_scratch(S, G) floats (a score row
// per query row). A row with a NaN or +inf score goes through attend_rows (the plain loop), which passes them on.
// With a mask (keep), ix lists the n attended positions in order (the batch row's, listed once for all its heads);
// without, n = S. out [G, Dv] must be zero on entry.
template <typename T>
void attend_blocked(const float* q, const T* k, const T* v, const bool* keep, const int32_t* ix, int64_t n, int64_t G,
                    int64_t S, int64_t D, int64_t Dv, float scale, float* out, float* scratch) {
  constexpr int W = Vec::W;
  if (n == 0) return;  // nothing attended: the rows stay 0
  const int64_t bk = block_positions(D * static_cast<int64_t>(sizeof(T)));
  const int64_t bv = block_positions(Dv * static_cast<int64_t>(sizeof(T)));
  std::vector<float> inv(static_cast<size_t>(G), 0.f);
  std::vector<char> plain(static_cast<size_t>(G), 0);
  auto run = [&](auto pos) {
    // scores of every row (row g in scratch + g S)
    for (int64_t i0 = 0; i0 < n; i0 += bk) {
      const int64_t i1 = std::min(n, i0 + bk);
      for (int64_t g0 = 0; g0 < G; g0 += 2) {
        float* s0 = scratch + g0 * S;
        if (G - g0 >= 2) scores<2>(q + g0 * D, k, D, i0, i1, n, g0 == 0, pos, scale, s0, s0 + S);
        else scores<1>(q + g0 * D, k, D, i0, i1, n, g0 == 0, pos, scale, s0, s0);
      }
    }
    bool any = false;
    for (int64_t g = 0; g < G; ++g) {
      float* sg = scratch + g * S;
      const float sum = softmax_numerators(sg, n);
      plain[g] = sum < 0.f;
      if (sum > 0.f) {
        inv[g] = 1.f / sum;
        any = true;
      } else {
        std::fill(sg, sg + n, 0.f);  // every score -inf (the row stays 0), or left to the plain loop
      }
    }
    if (any) {
      for (int64_t i0 = 0; i0 < n; i0 += bv) {
        const int64_t i1 = std::min(n, i0 + bv);
        for (int64_t g0 = 0; g0 < G; g0 += 2) {
          const bool two = G - g0 >= 2;
          const float* pp[2] = {scratch + g0 * S, scratch + (two ? g0 + 1 : g0) * S};
          float* o[2] = {out + g0 * Dv, out + (two ? g0 + 1 : g0) * Dv};
          int64_t c = 0;
          for (; c + 4 * W <= Dv; c += 4 * W) {
            const bool pf = g0 == 0 && c == 0;
            if (two) pv<2, 4>(pp, v, Dv, c, i0, i1, n, pf, pos, o);
            else pv<1, 4>(pp, v, Dv, c, i0, i1, n, pf, pos, o);
          }
          for (; c < Dv; c += W) {
            const bool pf = g0 == 0 && c == 0;
            if (two) pv<2, 1>(pp, v, Dv, c, i0, i1, n, pf, pos, o);
            else pv<1, 1>(pp, v, Dv, c, i0, i1, n, pf, pos, o);
          }
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < Dv; ++c) out[g * Dv + c] *= inv[g];
    }
    for (int64_t g = 0; g < G; ++g)
      if (plain[g]) {
        std::fill(out + g * Dv, out + (g + 1) * Dv, 0.f);
        attend_rows<true, T>(q + g * D, k, v, keep, 1, S, D, Dv, scale, out + g * Dv, scratch + g * S);
      }
  };
  if (keep) run([ix](int64_t i) { return static_cast<int64_t>(ix[i]); });
  else run([](int64_t i) { return i; });
}
