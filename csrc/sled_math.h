// The SLED math the CPU and the CUDA kernels share (docs/algorithm.md steps 1-6), written once.
//
// Everything is float32. The streaming statistics are templated on a "lanes" type so the same code
// runs on one value (ScalarLanes: CUDA threads, CPU tails, merges) or on a SIMD vector (the CPU
// kernel's VecLanes).
#pragma once

#include <cmath>
#include <cstddef>
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

// The noise floor (docs/algorithm.md, "Noise floor"): a premature layer has no contrast when its
// logits differ from the final row's by a constant plus at most this fraction of the two rows'
// largest |logit|. Step 3 normalises each layer's weights, then the layers' shares, so any nonzero
// contrast comes out at full strength, and a float32 projection rounds one hidden vector
// differently in different rows of a batch. Measured (bench/noise_floor_margins.py), that
// rounding spreads over at most 4.6e-6 of the largest |logit| (SmolLM2-135M; random data up to
// H = 16384), and the closest real layer of SmolLM2-135M on 100 TruthfulQA items over 0.42 of it:
// 2^-12 = 2.4e-4 is 53x above the one, 1700x below the other.
constexpr float kNoiseFloor = 1.f / 4096.f;

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
  SLED_HD static Float minimum(Float a, Float b) { return (a < b || a != a) ? a : b; }
  SLED_HD static Float maximum(Float a, Float b) { return (a > b || a != a) ? a : b; }
};

// Streaming softmax statistics of one logit row z, with d = z - z_final (zero for the final row).
// The arg-max term is kept apart from the rest, so 1 - p[argmax], ||p||^2 and p.d are built from
// small terms and never cancel (docs/algorithm.md, "Numerics"). Every e_j = exp(z_j - max) <= 1.
// z_min, d_min and d_max serve the noise floor; like every sum here they keep a NaN once seen.
template <class Lanes>
struct RowStatsT {
  typename Lanes::Float max;       // largest z so far; -inf while empty
  typename Lanes::Index argmax;    // its token; -1 while empty; a tie keeps the earlier push
  typename Lanes::Float d_at_max;  // d[argmax]
  typename Lanes::Float rest_sum;  // sum over j != argmax of e_j
  typename Lanes::Float rest_sq;   // sum over j != argmax of e_j^2
  typename Lanes::Float rest_dot;  // sum over j != argmax of e_j * d_j
  typename Lanes::Float d_sq;      // sum over all j of d_j^2
  typename Lanes::Float z_min;     // smallest z; +inf while empty
  typename Lanes::Float d_min;     // smallest d; +inf while empty
  typename Lanes::Float d_max;     // largest d; -inf while empty
};
using RowStats = RowStatsT<ScalarLanes>;

template <class Lanes>
SLED_HD RowStatsT<Lanes> empty_stats() {
  const auto zero = Lanes::splat(0.f), inf = Lanes::splat(INFINITY);
  const auto minus_inf = Lanes::splat(-INFINITY);
  return {minus_inf, Lanes::splat_index(-1), zero, zero, zero, zero, zero, inf, inf, minus_inf};
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
  s.z_min = Lanes::minimum(s.z_min, z);
  s.d_min = Lanes::minimum(s.d_min, d);
  s.d_max = Lanes::maximum(s.d_max, d);
}

// The noise floor's statistics of the union of two token sets (NaN once either saw one).
SLED_HD void merge_extremes(RowStats& a, const RowStats& b) {
  a.z_min = ScalarLanes::minimum(a.z_min, b.z_min);
  a.d_min = ScalarLanes::minimum(a.d_min, b.d_min);
  a.d_max = ScalarLanes::maximum(a.d_max, b.d_max);
}

// Statistics of the union of two disjoint token sets. Ties in the maximum go to the lower token.
SLED_HD RowStats merge(RowStats a, RowStats b) {
  if (a.argmax < 0 || b.argmax < 0) {
    // A side without a maximum saw no tokens (zero sums) or only NaNs (NaN sums): it adds
    // nothing but its NaNs, which must not vanish with it.
    RowStats& kept = a.argmax < 0 ? b : a;
    const RowStats& other = a.argmax < 0 ? a : b;
    kept.rest_sum += other.rest_sum;
    kept.rest_sq += other.rest_sq;
    kept.rest_dot += other.rest_dot;
    kept.d_sq += other.d_sq;
    merge_extremes(kept, other);
    return kept;
  }
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
  merge_extremes(a, b);
  return a;
}

// What sled.partials hands over per row: RowStats without argmax, as kRecordFloats floats (the
// extension exports the count to Python as _C.RECORD_FLOATS). RowStats is laid out as the record
// with the int32 argmax after its first kArgmaxAfter floats, so sled.combine on CUDA can read a
// record with the argmax bits spliced in as RowStats.
constexpr int kRecordFloats = 9;
constexpr int kArgmaxAfter = 1;
static_assert(sizeof(int32_t) == sizeof(float) &&
                  sizeof(RowStats) == (kRecordFloats + 1) * sizeof(float),
              "RowStats must be the record plus a 4-byte argmax, without padding");
// Where record field i sits in RowStats: store_record's order, shifted past the argmax.
constexpr std::size_t record_offset(int i) {
  return (i < kArgmaxAfter ? i : i + 1) * sizeof(float);
}
static_assert(offsetof(RowStats, argmax) == kArgmaxAfter * sizeof(float) &&
                  offsetof(RowStats, max) == record_offset(0) &&
                  offsetof(RowStats, d_at_max) == record_offset(1) &&
                  offsetof(RowStats, rest_sum) == record_offset(2) &&
                  offsetof(RowStats, rest_sq) == record_offset(3) &&
                  offsetof(RowStats, rest_dot) == record_offset(4) &&
                  offsetof(RowStats, d_sq) == record_offset(5) &&
                  offsetof(RowStats, z_min) == record_offset(6) &&
                  offsetof(RowStats, d_min) == record_offset(7) &&
                  offsetof(RowStats, d_max) == record_offset(8),
              "RowStats must keep store_record's order, with argmax after max");
SLED_HD void store_record(const RowStats& s, float* record) {
  const float fields[kRecordFloats] = {s.max,  s.d_at_max, s.rest_sum, s.rest_sq, s.rest_dot,
                                       s.d_sq, s.z_min,    s.d_min,    s.d_max};
  for (int i = 0; i < kRecordFloats; ++i) record[i] = fields[i];
}
SLED_HD RowStats load_record(const float* f, int32_t argmax) {
  return {f[0], argmax, f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8]};
}

// Softmax denominator relative to the maximum: sum over j of exp(z_j - max).
SLED_HD float softmax_total(const RowStats& s) { return 1.f + s.rest_sum; }

// clamp_min that keeps NaN, as torch's does.
SLED_HD float clamp_min_keep_nan(float x, float lo) { return x < lo ? lo : x; }

// The largest |z| of a row (NaN once it saw one).
SLED_HD float largest_magnitude(const RowStats& s) { return ScalarLanes::maximum(s.max, -s.z_min); }

// Whether layer l's logits are the final row's up to a constant and rounding (kNoiseFloor):
// max d - min d <= kNoiseFloor * (the largest |z| of either row). A row with a NaN or an infinity
// never is (nor is one of NaNs only, which looks empty), so such rows keep their position NaN.
SLED_HD bool within_noise_floor(const RowStats& layer, const RowStats& final_row) {
  if (layer.argmax < 0 || final_row.argmax < 0) return false;
  const float size = ScalarLanes::maximum(largest_magnitude(layer), largest_magnitude(final_row));
  return layer.d_max - layer.d_min <= kNoiseFloor * size && size < INFINITY;
}

// m_{l,i} = max(cos(p_l - e_i, d_l), 0)^2 (algorithm.md steps 2-3) from layer l's statistics `s` and its
// logit z_i and difference d_i at candidate token i; 0 within the noise floor.
SLED_HD float contrast_weight(const RowStats& s, const RowStats& final_row, float z_i, float d_i,
                              int64_t token) {
  if (within_noise_floor(s, final_row)) return 0.f;
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
