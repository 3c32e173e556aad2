// The SLED math the CPU and the CUDA kernels share (docs/algorithm.md steps 1-6), written once.
//
// Everything is float32. The streaming statistics are templated on a "lanes" type so the same code
// runs on one value (ScalarLanes: CUDA threads, CPU tails, merges) or on a SIMD vector (the CPU
// kernel's VecLanes).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SLED_HD __host__ __device__ __forceinline__
#else
#define SLED_HD inline
#endif

namespace sled {

// torch.nn.functional.cosine_similarity's default eps; each norm is clamped to it separately.
constexpr float kCosineEps = 1e-8f;

struct ScalarLanes {
  using Float = float;
  using Index = int32_t;
  using Mask = bool;
  SLED_HD static Float splat(float x) { return x; }
  SLED_HD static Index splat_index(int32_t x) { return x; }
  SLED_HD static Mask greater(Float a, Float b) { return a > b; }
  SLED_HD static Float select(Mask m, Float if_true, Float if_false) { return m ? if_true : if_false; }
  SLED_HD static Index select(Mask m, Index if_true, Index if_false) { return m ? if_true : if_false; }
  SLED_HD static Float exp_neg_abs(Float x) { return expf(-fabsf(x)); }
};

// Streaming softmax statistics of one logit row z, with d = z - z_final (zero for the final row).
// The arg-max term is kept apart from the rest, so 1 - p[argmax], ||p||^2 and p.d are built from
// small terms and never cancel (docs/algorithm.md, "Numerics"). Every e_j = exp(z_j - max) <= 1.
template <class Lanes>
struct RowStatsT {
  typename Lanes::Float max;       // largest z so far; -inf while empty
  typename Lanes::Index argmax;    // its token; -1 while empty; a tie keeps the earlier push
  typename Lanes::Float d_at_max;  // d[argmax]
  typename Lanes::Float rest_sum;  // sum over j != argmax of e_j
  typename Lanes::Float rest_sq;   // sum over j != argmax of e_j^2
  typename Lanes::Float rest_dot;  // sum over j != argmax of e_j * d_j
  typename Lanes::Float d_sq;      // sum over all j of d_j^2
};
using RowStats = RowStatsT<ScalarLanes>;

template <class Lanes>
SLED_HD RowStatsT<Lanes> empty_stats() {
  const auto zero = Lanes::splat(0.f);
  return {Lanes::splat(-INFINITY), Lanes::splat_index(-1), zero, zero, zero, zero, zero};
}

template <class Lanes>
SLED_HD void push(RowStatsT<Lanes>& s, typename Lanes::Float z, typename Lanes::Float d,
                  typename Lanes::Index token) {
  const auto one = Lanes::splat(1.f);
  const auto is_new_max = Lanes::greater(z, s.max);
  // One exponential serves both cases: the new term's weight, or the factor that rescales the
  // old sums when the old maximum moves into the rest.
  const auto e = Lanes::exp_neg_abs(z - s.max);
  s.rest_sum = Lanes::select(is_new_max, (s.rest_sum + one) * e, s.rest_sum + e);
  s.rest_sq = Lanes::select(is_new_max, (s.rest_sq + one) * (e * e), s.rest_sq + e * e);
  s.rest_dot = Lanes::select(is_new_max, (s.rest_dot + s.d_at_max) * e, s.rest_dot + e * d);
  s.d_at_max = Lanes::select(is_new_max, d, s.d_at_max);
  s.argmax = Lanes::select(is_new_max, token, s.argmax);
  s.max = Lanes::select(is_new_max, z, s.max);
  s.d_sq = s.d_sq + d * d;
}

// Statistics of the union of two disjoint token sets. Ties in the maximum go to the lower token.
SLED_HD RowStats merge(RowStats a, RowStats b) {
  if (b.argmax < 0) return a;
  if (a.argmax < 0) return b;
  if (b.max > a.max || (b.max == a.max && b.argmax < a.argmax)) {
    const RowStats t = a;
    a = b;
    b = t;
  }
  const float e = expf(b.max - a.max);
  a.rest_sum += (1.f + b.rest_sum) * e;
  a.rest_sq += (1.f + b.rest_sq) * (e * e);
  a.rest_dot += (b.d_at_max + b.rest_dot) * e;
  a.d_sq += b.d_sq;
  return a;
}

// Softmax denominator relative to the maximum: sum over j of exp(z_j - max).
SLED_HD float softmax_total(const RowStats& s) { return 1.f + s.rest_sum; }

// clamp_min that keeps NaN, as torch's does.
SLED_HD float clamp_min_keep_nan(float x, float lo) { return x < lo ? lo : x; }

// m_{l,i} = max(cos(p_l - e_i, d_l), 0)^2 (algorithm.md steps 2-3) from row l's statistics and
// its logit z_i and difference d_i at candidate token i.
SLED_HD float contrast_weight(const RowStats& s, float z_i, float d_i, int64_t token) {
  const float inv_total = 1.f / softmax_total(s);
  float numerator;  // p.d - d_i
  float dist;       // ||p - e_i||
  if (token == s.argmax) {
    // 1 - p_a = rest_sum / total exactly, so neither term cancels.
    numerator = (s.rest_dot - s.rest_sum * s.d_at_max) * inv_total;
    dist = sqrtf(s.rest_sum * s.rest_sum + s.rest_sq) * inv_total;
  } else {
    // p_i <= 1/2 here, so ||p||^2 - 2 p_i + 1 >= 1/4: no cancellation either.
    const float p_i = expf(z_i - s.max) * inv_total;
    const float p_sq = (1.f + s.rest_sq) * inv_total * inv_total;
    numerator = (s.d_at_max + s.rest_dot) * inv_total - d_i;
    dist = sqrtf(p_sq - 2.f * p_i + 1.f);
  }
  const float c = numerator / (clamp_min_keep_nan(dist, kCosineEps) *
                               clamp_min_keep_nan(sqrtf(s.d_sq), kCosineEps));
  const float kept = (c > 0.f || c != c) ? c : 0.f;
  return kept * kept;
}

// algorithm.md step 3: a token's weight within its layer, and the layer's share of all layers.
SLED_HD float normalized(float weight, float layer_sum) {
  return layer_sum != 0.f ? weight / layer_sum : weight;
}
SLED_HD float layer_share(float layer_sum, float total) {
  return total != 0.f ? layer_sum / total : layer_sum;
}

// algorithm.md step 5: the step size of iteration t of T (in double, like the published Python).
SLED_HD float step_size(double rate, int64_t t, int64_t iterations) {
  return static_cast<float>(rate * (1.0 - static_cast<double>(t) / static_cast<double>(iterations)));
}
SLED_HD float evolve_step(float x, float p, float delta, float eta) { return x - eta * (p + delta); }

// Order key of the top-k restriction: a larger key ranks first; NaN ranks above everything (as in
// torch.sort) and -0 equals +0.
SLED_HD uint32_t order_key(float v) {
  if (v != v) return 0xffffffffu;
  if (v == 0.f) v = 0.f;
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __float_as_uint(v);
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
#endif
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Whether (value a, token ia) ranks before (value b, token ib): larger first, ties to the lower token.
SLED_HD bool ranks_before(float a, int64_t ia, float b, int64_t ib) {
  const uint32_t ka = order_key(a), kb = order_key(b);
  return ka != kb ? ka > kb : ia < ib;
}

}  // namespace sled
