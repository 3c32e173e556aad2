// The CPU kernel's vectorised inner loops (row_kernels.h), compiled once per instruction-set level
// with -DCPU_CAPABILITY=<level> and that level's flags. Everything here lives in sled::<level>, as
// ATen's at::vec::<level>, so the copies never meet; include nothing that defines out-of-line code.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX512)
#include <c10/util/bit_cast.h>
#include <immintrin.h>

#include <cmath>
#endif

#include <algorithm>

#include "../row_kernels.h"

namespace sled {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kWidth = Vec::size();

// ScalarLanes' SIMD twin, so push() folds a vector of tokens at once. Tokens are carried as floats
// relative to the chunk's first token (exact below 2^24).
struct VecLanes {
  using Float = Vec;
  using Index = Vec;
  using Mask = Vec;
  static Vec splat(float x) { return Vec(x); }
  static Vec splat_index(int32_t x) { return Vec(static_cast<float>(x)); }
  static Vec greater(const Vec& a, const Vec& b) { return a > b; }
  static Vec select(const Vec& m, const Vec& if_true, const Vec& if_false) {
    return Vec::blendv(if_false, if_true, m);
  }
  // at::vec's faster exp (20 ulp: ~1e-6 relative, far inside the op's tolerance; the fold of
  // SmolLM2-like N = 8 spent a third of the op in Sleef's 1-ulp exp). It clamps a NaN to a
  // number, so NaNs are put back.
  static Vec exp_neg_abs(const Vec& x) {
    return Vec::blendv(x.abs().neg().exp_u20(), x, x != x);
  }
  static Vec minimum(const Vec& a, const Vec& b) { return at::vec::minimum(a, b); }  // keep NaN
  static Vec maximum(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
};

#if defined(CPU_CAPABILITY_AVX512)
// VecLanes with AVX-512's mask registers: at::vec's comparisons return vectors, which each select
// turns back into a mask, and its NaN-keeping minimum takes four instructions where two do.
struct FoldLanes : VecLanes {
  using Mask = __mmask16;
  static Mask greater(const Vec& a, const Vec& b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static Vec select(Mask m, const Vec& if_true, const Vec& if_false) {
    return _mm512_mask_blend_ps(m, if_false, if_true);
  }
  static Vec exp_neg_abs(const Vec& x) {
    const Vec minus_abs = _mm512_or_ps(x, _mm512_set1_ps(-0.f));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), minus_abs.exp_u20(), x);
  }
  // A NaN in a is kept; otherwise vminps, which returns b when b is a NaN.
  static Vec minimum(const Vec& a, const Vec& b) {
    return _mm512_mask_min_ps(a, _mm512_cmp_ps_mask(a, a, _CMP_ORD_Q), a, b);
  }
  static Vec maximum(const Vec& a, const Vec& b) {
    return _mm512_mask_max_ps(a, _mm512_cmp_ps_mask(a, a, _CMP_ORD_Q), a, b);
  }
};
#else
using FoldLanes = VecLanes;
#endif
using LaneStats = RowStatsT<FoldLanes>;
constexpr int kLaneFields = 10;  // the fields of RowStatsT, in declaration order
static_assert(sizeof(LaneStats) == kLaneFields * sizeof(Vec), "kLaneFields must match RowStatsT");

LaneStats load_lanes(const float* s) {
  return {Vec::loadu(s), Vec::loadu(s + kWidth), Vec::loadu(s + 2 * kWidth),
          Vec::loadu(s + 3 * kWidth), Vec::loadu(s + 4 * kWidth), Vec::loadu(s + 5 * kWidth),
          Vec::loadu(s + 6 * kWidth), Vec::loadu(s + 7 * kWidth), Vec::loadu(s + 8 * kWidth),
          Vec::loadu(s + 9 * kWidth)};
}

void store_lanes(const LaneStats& l, float* s) {
  l.max.store(s);
  l.argmax.store(s + kWidth);
  l.d_at_max.store(s + 2 * kWidth);
  l.rest_sum.store(s + 3 * kWidth);
  l.rest_sq.store(s + 4 * kWidth);
  l.rest_dot.store(s + 5 * kWidth);
  l.d_sq.store(s + 6 * kWidth);
  l.z_min.store(s + 7 * kWidth);
  l.d_min.store(s + 8 * kWidth);
  l.d_max.store(s + 9 * kWidth);
}

void clear_lanes(float* lanes, int64_t rows) {
  const LaneStats empty = empty_stats<FoldLanes>();
  for (int64_t m = 0; m < rows; ++m) store_lanes(empty, lanes + m * kLaneFields * kWidth);
}

void fold_row(float* lanes, RowStats& stats, const float* z, const float* final_row,
              int64_t count, int64_t tile_offset, int32_t first_token) {
  LaneStats s = load_lanes(lanes);
  Vec token = Vec::arange(static_cast<float>(tile_offset), 1.f);
  int64_t j = 0;
  for (; j + kWidth <= count; j += kWidth, token = token + Vec(static_cast<float>(kWidth))) {
    const Vec zv = Vec::loadu(z + j);
    push(s, zv, zv - Vec::loadu(final_row + j), token);
  }
  store_lanes(s, lanes);
  for (; j < count; ++j) {
    RowStats one = empty_stats<ScalarLanes>();
    push(one, z[j], z[j] - final_row[j], first_token + static_cast<int32_t>(j));
    stats = merge(stats, one);
  }
}

void merge_lanes(const float* lanes, int64_t first_lane, int64_t lane_count, RowStats& stats,
                 int32_t chunk_first_token) {
  for (int64_t lane = first_lane; lane < first_lane + lane_count; ++lane) {
    const auto field = [&](int f) { return lanes[f * kWidth + lane]; };
    // A lane without a maximum (argmax -1) may still hold NaNs, which merge keeps.
    const int32_t argmax =
        field(1) < 0 ? -1 : chunk_first_token + static_cast<int32_t>(field(1));
    stats = merge(stats, RowStats{field(0), argmax, field(2), field(3), field(4), field(5),
                                  field(6), field(7), field(8), field(9)});
  }
}

void postprocess(float* z, int64_t count, const float* bias, bool one_bias, float scale,
                 float softcap) {
  const bool scaled = scale != 1.f;
  if (bias == nullptr && !scaled && softcap == 0.f) return;
  for (int64_t j = 0; j < count; j += kWidth) {
    const int64_t n = std::min<int64_t>(kWidth, count - j);
    Vec x = Vec::loadu(z + j, n);
    if (bias != nullptr) x = x + (one_bias ? Vec(*bias) : Vec::loadu(bias + j, n));
    if (scaled) x = x * Vec(scale);
    if (softcap != 0.f) x = (x / Vec(softcap)).tanh() * Vec(softcap);
    x.store(z + j, n);
  }
}

void softmax_stats(const float* x, int64_t count, float& max, float& total) {
  max = at::vec::reduce_all<float>(
      [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, x, count);
  const Vec m(max);
  total = at::vec::map_reduce_all<float>([m](const Vec& a) { return (a - m).exp(); },
                                         [](const Vec& a, const Vec& b) { return a + b; }, x,
                                         count);
}

void evolve_row(float* x, int64_t count, float max, float total, float eta) {
  const Vec m(max), sum(total), step(eta);
  at::vec::map([=](Vec v) { return v - step * ((v - m).exp() / sum); }, x, x, count);
}

void transpose(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows,
               int64_t cols) {
  at::vec::transpose_mxn<float>(src, ld_src, dst, ld_dst, static_cast<int>(rows),
                                static_cast<int>(cols));
}

#if defined(CPU_CAPABILITY_AVX512)
// hi keeps a float's upper 16 bits (sign, exponent, 7 fraction bits): exact in bf16, as is the
// rest below them, which holds at most a half's other 3 fraction bits. Written with AVX-512
// intrinsics: at::vec's bf16 conversion rounds (and checks for NaN) where taking the upper word
// suffices. The loop streams the weight from memory, and the hardware prefetcher alone left its
// loads waiting: fetching 4 KiB ahead took Llama-3.2-1B-like N = 1 from 1.4x torch's fp16 GEMM
// to 0.8-1.0x (Sapphire Rapids, 2 threads).
bool split_half(const c10::Half* x, int64_t ld_x, int64_t rows, int64_t count,
                c10::BFloat16* hi, c10::BFloat16* lo, int64_t ld_out) {
  constexpr uint32_t kHighBits = 0xffff0000u;
  constexpr int kNonFinite = 0x01 | 0x08 | 0x10 | 0x80;  // vfpclassps: NaNs and infinities
  constexpr int64_t kPrefetchHalves = 2048;
  const __m512 high_mask = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(kHighBits)));
  // Word i of the packed result is the upper word of float lane i of (a, b): word 2i + 1.
  const __m512i upper = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37,
                                         35, 33, 31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9,
                                         7, 5, 3, 1);
  const auto pack = [&](__m512 a, __m512 b) {
    return _mm512_permutex2var_epi16(_mm512_castps_si512(a), upper, _mm512_castps_si512(b));
  };
  __mmask16 non_finite = 0;
  bool finite = true;
  for (int64_t r = 0; r < rows; ++r) {
    const c10::Half* src = x + r * ld_x;
    c10::BFloat16 *high = hi + r * ld_out, *low = lo + r * ld_out;
    int64_t j = 0;
    for (; j + 32 <= count; j += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(src + j + kPrefetchHalves), _MM_HINT_T0);
      const __m512i halves = _mm512_loadu_si512(src + j);
      const __m512 a = _mm512_cvtph_ps(_mm512_castsi512_si256(halves));
      const __m512 b = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(halves, 1));
      const __m512 high_a = _mm512_and_ps(a, high_mask), high_b = _mm512_and_ps(b, high_mask);
      const __mmask16 odd_a = _mm512_fpclass_ps_mask(high_a, kNonFinite);
      const __mmask16 odd_b = _mm512_fpclass_ps_mask(high_b, kNonFinite);
      non_finite |= odd_a | odd_b;
      const __m512 low_a = _mm512_maskz_sub_ps(static_cast<__mmask16>(~odd_a), a, high_a);
      const __m512 low_b = _mm512_maskz_sub_ps(static_cast<__mmask16>(~odd_b), b, high_b);
      _mm512_storeu_si512(high + j, pack(high_a, high_b));
      _mm512_storeu_si512(low + j, pack(low_a, low_b));
    }
    for (; j < count; ++j) {
      const float v = src[j];
      const float top = c10::bit_cast<float>(c10::bit_cast<uint32_t>(v) & kHighBits);
      finite = finite && std::isfinite(top);
      high[j] = c10::BFloat16(top);
      low[j] = c10::BFloat16(std::isfinite(top) ? v - top : 0.f);
    }
  }
  return finite && non_finite == 0;
}

// Lanes over rows instead of tokens: each lane folds one row's tokens in order, 16 rows at a time,
// straight from the [token, row] layout brgemm writes when the hidden rows are its packed operand
// (folding row-major needed that product transposed: a tenth of SmolLM2-like N = 8 in bf16).
// Each lane's d needs its position's final row at the same token, which lies at most R - 1
// columns on: for R <= 17 within the two vectors from the block's first row (one permute), else
// the block holds at most two positions (two broadcasts).
void fold_columns(float* lanes, const float* z, int64_t ld, int64_t rows, int64_t R,
                  int64_t count, int64_t tile_offset) {
  for (int64_t m0 = 0; m0 < rows; m0 += kWidth) {
    float* block_lanes = lanes + m0 / kWidth * kLaneFields * kWidth;
    LaneStats s = load_lanes(block_lanes);
    alignas(64) int32_t final_of[kWidth];  // each lane's final row (a padding lane's: the last's)
    for (int64_t i = 0; i < kWidth; ++i) {
      const int64_t m = std::min(m0 + i, rows - 1);
      final_of[i] = static_cast<int32_t>(m / R * R + R - 1);
    }
    const int32_t first_final = final_of[0], last_final = final_of[kWidth - 1];
    const auto fold = [&](auto final_at) {
      Vec token(static_cast<float>(tile_offset));
      for (int64_t j = 0; j < count; ++j, token = token + Vec(1.f)) {
        const float* zj = z + j * ld;
        const Vec zv = Vec::loadu(zj + m0);
        push(s, zv, zv - final_at(zj, zv), token);
      }
    };
    if (last_final - m0 < 2 * kWidth) {
      const __m512i index = _mm512_sub_epi32(_mm512_load_si512(final_of),
                                             _mm512_set1_epi32(static_cast<int32_t>(m0)));
      // The second vector may reach past ld; no real lane reads there.
      const int64_t beyond = std::clamp<int64_t>(ld - m0 - kWidth, 0, kWidth);
      const __mmask16 in_bounds = static_cast<__mmask16>((uint32_t{1} << beyond) - 1);
      fold([&](const float* zj, const Vec& zv) {
        return Vec(_mm512_permutex2var_ps(zv, index,
                                          _mm512_maskz_loadu_ps(in_bounds, zj + m0 + kWidth)));
      });
    } else {
      const __mmask16 second = _mm512_cmpeq_epi32_mask(_mm512_load_si512(final_of),
                                                       _mm512_set1_epi32(last_final));
      fold([&](const float* zj, const Vec&) {
        return Vec(_mm512_mask_blend_ps(second, _mm512_set1_ps(zj[first_final]),
                                        _mm512_set1_ps(zj[last_final])));
      });
    }
    store_lanes(s, block_lanes);
  }
}
#endif

}  // namespace

#define SLED_STRINGIFY_(x) #x
#define SLED_STRINGIFY(x) SLED_STRINGIFY_(x)

const RowKernels& row_kernels() {
  static const RowKernels kernels{SLED_STRINGIFY(CPU_CAPABILITY), kWidth, kLaneFields * kWidth,
                                  clear_lanes, fold_row, merge_lanes, postprocess,
                                  softmax_stats, evolve_row, transpose,
#if defined(CPU_CAPABILITY_AVX512)
                                  split_half, fold_columns
#else
                                  // only brgemm splits halves or leaves the logits
                                  // column-wise, and it needs AVX-512
                                  nullptr, nullptr
#endif
  };
  return kernels;
}

}  // namespace CPU_CAPABILITY
}  // namespace sled
