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
#include <array>
#include <utility>

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

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// float_product: the hidden rows, transposed, are the vectors and each weight row's element is
// broadcast against them, a step of depth at a time: one FMA per vector of hidden rows, token and
// step, the weight tile read in place once. MKL's sgemm of so few rows ran at under half the FMA
// peak (SmolLM2-like N = 1, 31 rows: 141 GFLOP/s of 313; Sapphire Rapids, 2 threads).
// Accumulators per block of tokens: 3/4 of the vector registers, the others hold hidden vectors.
constexpr int kFloatAccumulators = kWidth == 16 ? 24 : 12;

// Tokens weight rows (row stride ld_w) times Vecs vectors of hidden rows (step k at h[k * ld_h])
// into out [Tokens, Vecs * kWidth]. Meanwhile the Tokens rows after the block are fetched, a line
// per row every 16 steps: the hardware prefetcher alone left the FMAs waiting on the weight (12 ms
// instead of 8.2 in the case above). Prefetches past the weight are harmless: they never fault.
template <int Vecs, int Tokens>
void float_block(const float* w, int64_t ld_w, int64_t H, const float* h, int64_t ld_h,
                 float* out, int64_t ld_out) {
  Vec acc[Tokens][Vecs];
#pragma GCC unroll 24
  for (int t = 0; t < Tokens; ++t)
    for (int v = 0; v < Vecs; ++v) acc[t][v] = Vec(0.f);
  const float* next = w + Tokens * ld_w;
  for (int64_t k0 = 0; k0 < H; k0 += 16) {
#pragma GCC unroll 24
    for (int t = 0; t < Tokens; ++t) __builtin_prefetch(next + t * ld_w + k0);
    const int64_t k_end = std::min<int64_t>(k0 + 16, H);
    for (int64_t k = k0; k < k_end; ++k) {
      Vec hidden[Vecs];
      for (int v = 0; v < Vecs; ++v) hidden[v] = Vec::loadu(h + k * ld_h + v * kWidth);
#pragma GCC unroll 24
      for (int t = 0; t < Tokens; ++t) {
        const Vec x(w[t * ld_w + k]);
        for (int v = 0; v < Vecs; ++v) acc[t][v] = at::vec::fmadd(x, hidden[v], acc[t][v]);
      }
    }
  }
#pragma GCC unroll 24
  for (int t = 0; t < Tokens; ++t)
    for (int v = 0; v < Vecs; ++v) acc[t][v].store(out + t * ld_out + v * kWidth);
}

using FloatBlock = void (*)(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t);

template <int Vecs, size_t... Tokens>
constexpr std::array<FloatBlock, sizeof...(Tokens)> float_block_table(
    std::index_sequence<Tokens...>) {
  return {&float_block<Vecs, Tokens + 1>...};
}

// Vectors of hidden rows per pass over a block of tokens: with more, too few tokens share each
// hidden vector loaded (AVX2, 33 rows in 5 vectors of 8: blocks of 2 tokens made Llama-3-8B-like
// N = 1 1.2x slower than sgemm). More vectors are taken in passes over the same tokens.
constexpr int64_t kMaxPassVecs = 3;
template <int Vecs>
constexpr auto kFloatBlocks =
    float_block_table<Vecs>(std::make_index_sequence<kFloatAccumulators / Vecs>());

FloatBlock float_block_of(int64_t vecs, int64_t tokens) {
  static_assert(kMaxPassVecs == 3, "one table per vector count");
  switch (vecs) {
    case 1:
      return kFloatBlocks<1>[tokens - 1];
    case 2:
      return kFloatBlocks<2>[tokens - 1];
    default:
      return kFloatBlocks<3>[tokens - 1];
  }
}

void float_product(const float* w, int64_t ld_w, int64_t rows, int64_t H, const float* h,
                   int64_t M, int64_t ld_h, float* out, int64_t ld_out) {
  const int64_t vecs = std::clamp<int64_t>((M + kWidth - 1) / kWidth, 1,
                                           kMaxFloatProductRows / kWidth);
  const int64_t per_pass = equal_part(vecs, kMaxPassVecs), tokens = kFloatAccumulators / per_pass;
  for (int64_t t0 = 0; t0 < rows; t0 += tokens) {
    const int64_t block = std::min(tokens, rows - t0);
    for (int64_t v0 = 0; v0 < vecs; v0 += per_pass)
      float_block_of(std::min(per_pass, vecs - v0), block)(
          w + t0 * ld_w, ld_w, H, h + v0 * kWidth, ld_h, out + t0 * ld_out + v0 * kWidth, ld_out);
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// hi keeps a float's upper 16 bits (sign, exponent, 7 fraction bits): exact in bf16, as is the
// rest below them, which holds at most a half's other 3 fraction bits. Written with AVX-512
// intrinsics: at::vec's bf16 conversion rounds (and checks for NaN) where taking the upper word
// suffices. Remembers whether it met a NaN or an infinity (hi keeps it, lo is 0 there).
class HalfSplitter {
 public:
  // Splits the halves of `valid` among src[0, 32) (the others read as 0) and writes the parts
  // `written` of 32.
  void split(const c10::Half* src, __mmask32 valid, __mmask32 written, c10::BFloat16* high,
             c10::BFloat16* low) {
    const __m512i halves = _mm512_maskz_loadu_epi16(valid, src);
    const __m512 a = _mm512_cvtph_ps(_mm512_castsi512_si256(halves));
    const __m512 b = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(halves, 1));
    const __m512 high_a = _mm512_and_ps(a, high_mask_), high_b = _mm512_and_ps(b, high_mask_);
    const __mmask16 odd_a = _mm512_fpclass_ps_mask(high_a, kNonFinite);
    const __mmask16 odd_b = _mm512_fpclass_ps_mask(high_b, kNonFinite);
    non_finite_ |= odd_a | odd_b;
    const __m512 low_a = _mm512_maskz_sub_ps(static_cast<__mmask16>(~odd_a), a, high_a);
    const __m512 low_b = _mm512_maskz_sub_ps(static_cast<__mmask16>(~odd_b), b, high_b);
    _mm512_mask_storeu_epi16(high, written, pack(high_a, high_b));
    _mm512_mask_storeu_epi16(low, written, pack(low_a, low_b));
  }
  bool finite() const { return non_finite_ == 0; }

 private:
  static constexpr int kNonFinite = 0x01 | 0x08 | 0x10 | 0x80;  // vfpclassps: NaNs and infinities
  // Word i of the packed result is the upper word of float lane i of (a, b): word 2i + 1.
  __m512i pack(__m512 a, __m512 b) const {
    return _mm512_permutex2var_epi16(_mm512_castps_si512(a), upper_, _mm512_castps_si512(b));
  }
  const __m512 high_mask_ = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0xffff0000u)));
  const __m512i upper_ = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37,
                                          35, 33, 31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9,
                                          7, 5, 3, 1);
  __mmask16 non_finite_ = 0;
};

// The first `count` of 32 halves.
__mmask32 first_halves(int64_t count) {
  return count >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint32_t{1} << count) - 1);
}

// split_half streams the weight from memory and fetches this far ahead: the hardware prefetcher
// alone left its loads waiting (Llama-3.2-1B-like N = 1 went from 1.4x torch's fp16 GEMM to
// 0.8-1.0x so; Sapphire Rapids, 2 threads).
constexpr int64_t kPrefetchHalves = 2048;

bool split_half(const c10::Half* x, int64_t ld_x, int64_t rows, int64_t count,
                c10::BFloat16* hi, c10::BFloat16* lo, int64_t ld_out) {
  HalfSplitter splitter;
  for (int64_t r = 0; r < rows; ++r) {
    const c10::Half* src = x + r * ld_x;
    for (int64_t j = 0; j < count; j += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(src + j + kPrefetchHalves), _MM_HINT_T0);
      const __mmask32 valid = first_halves(count - j);
      splitter.split(src + j, valid, valid, hi + r * ld_out + j, lo + r * ld_out + j);
    }
  }
  return splitter.finite();
}

// The AMX and AVX512-BF16 code carries its instruction set per function, so that nothing else in
// this copy (which runs on every AVX-512 CPU) can be compiled to it.
#define SLED_AMX __attribute__((target("amx-tile,amx-bf16")))
#define SLED_AVX512_BF16 __attribute__((target("avx512bf16")))

// split_product on AMX. Tile registers: products 0-4 (16 rows x 16 fp32 columns each), the
// weight block's hi and lo parts 5 and 6 (16 rows x 32 bf16), the hidden rows' B tile 7 (16 pairs
// of depth x 16 columns); every tile 16 rows of 64 bytes.
constexpr int64_t kBlockRows = 16, kStepDepth = 32, kProductTiles = 5;
// Steps of depth split at a time (a chunk): 16 KiB of both parts, double-buffered, stay in L1
// (a block of rows split whole went to L2, and its stores competed with the weight's loads).
constexpr int64_t kChunkSteps = 4;

SLED_AMX void configure_tiles() {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
  } config;
  _tile_loadconfig(&config);
}

// Tile registers are named by literals (GCC's AMX intrinsics paste them into the instruction).
#define SLED_FOR_PRODUCT_TILES(tiles, STEP) \
  do {                                     \
    STEP(0);                               \
    if ((tiles) > 1) STEP(1);              \
    if ((tiles) > 2) STEP(2);              \
    if ((tiles) > 3) STEP(3);              \
    if ((tiles) > 4) STEP(4);              \
  } while (false)

SLED_AMX void zero_products(int64_t tiles) {
#define SLED_ZERO(t) _tile_zero(t)
  SLED_FOR_PRODUCT_TILES(tiles, SLED_ZERO);
#undef SLED_ZERO
}

SLED_AMX void load_products(int64_t tiles, const float* out, int64_t out_stride) {
#define SLED_LOAD(t) _tile_loadd(t, out + (t) * 16, out_stride)
  SLED_FOR_PRODUCT_TILES(tiles, SLED_LOAD);
#undef SLED_LOAD
}

SLED_AMX void store_products(int64_t tiles, float* out, int64_t out_stride) {
#define SLED_STORE(t) _tile_stored(t, out + (t) * 16, out_stride)
  SLED_FOR_PRODUCT_TILES(tiles, SLED_STORE);
#undef SLED_STORE
}

// Products t < tiles += (hi + lo) x B tile t; b's tiles lie 16 columns apart.
SLED_AMX void multiply(int64_t tiles, const c10::BFloat16* b, int64_t b_stride) {
#define SLED_MULTIPLY(t)                    \
  do {                                      \
    _tile_loadd(7, b + (t) * 32, b_stride); \
    _tile_dpbf16ps(t, 5, 7);                \
    _tile_dpbf16ps(t, 6, 7);                \
  } while (false)
  SLED_FOR_PRODUCT_TILES(tiles, SLED_MULTIPLY);
#undef SLED_MULTIPLY
}
#undef SLED_FOR_PRODUCT_TILES

// The weight is split a chunk at a time (16 rows, kChunkSteps steps of depth) into a buffer laid
// out as AMX tiles (per part and step, 16 rows of 32 bf16), double-buffered: while one chunk is
// split, the products of the one before run, a step at a time between the split's, so that the
// memory stream does not wait for the matrix unit (split first, multiplied after,
// Llama-3.2-1B-like N = 1 took 1.2x torch's fp16 GEMM). Products stay in their registers over a
// block's chunks when one pass covers all columns, else go through `out` between chunks.
SLED_AMX bool split_product(const c10::Half* w, int64_t ld_w, int64_t rows, int64_t H,
                            const c10::BFloat16* b, int64_t columns, float* out,
                            int64_t ld_out, c10::BFloat16* scratch) {
  const int64_t steps = (H + kStepDepth - 1) / kStepDepth;
  const int64_t block_chunks = (steps + kChunkSteps - 1) / kChunkSteps;
  const int64_t chunks = (rows + kBlockRows - 1) / kBlockRows * block_chunks;
  constexpr int64_t kPartSize = kChunkSteps * kBlockRows * kStepDepth;
  const int64_t column_tiles = columns / 16;
  const int64_t passes = (column_tiles + kProductTiles - 1) / kProductTiles;
  HalfSplitter splitter;
  struct Chunk {
    int64_t row0, rows, step0, steps;
    bool first, last;  // of its block
    c10::BFloat16* buffer;
  };
  const auto chunk = [&](int64_t g) {
    const int64_t row0 = g / block_chunks * kBlockRows, c = g % block_chunks;
    const int64_t step0 = c * kChunkSteps;
    return Chunk{row0, std::min(kBlockRows, rows - row0), step0,
                 std::min(kChunkSteps, steps - step0), c == 0, c + 1 == block_chunks,
                 scratch + g % 2 * 2 * kPartSize};
  };
  const auto split = [&](const Chunk& c, int64_t row, int64_t step) {
    const c10::Half* src = w + (c.row0 + row) * ld_w + (c.step0 + step) * kStepDepth;
    // the same halves of the next block's row, into L2
    _mm_prefetch(reinterpret_cast<const char*>(src + kBlockRows * ld_w), _MM_HINT_T1);
    c10::BFloat16* high = c.buffer + (step * kBlockRows + row) * kStepDepth;
    // past H, zeros: the padding of B is zero too, and garbage there could be a NaN
    splitter.split(src, first_halves(H - (c.step0 + step) * kStepDepth), ~__mmask32{0}, high,
                   high + kPartSize);
  };
  const auto multiply_step = [&](const Chunk& c, int64_t pass, int64_t step) {
    const int64_t first = pass * kProductTiles;
    const int64_t tiles = std::min(kProductTiles, column_tiles - first);
    float* products = out + c.row0 * ld_out + first * 16;
    if (step == 0 && c.first) zero_products(tiles);
    else if (step == 0 && passes > 1) load_products(tiles, products, ld_out * 4);
    _tile_loadd(5, c.buffer + step * kBlockRows * kStepDepth, 64);
    _tile_loadd(6, c.buffer + kPartSize + step * kBlockRows * kStepDepth, 64);
    multiply(tiles, b + ((c.step0 + step) * 16 * columns + first * 16) * 2, columns * 4);
    if (step + 1 == c.steps && (c.last || passes > 1))
      store_products(tiles, products, ld_out * 4);
  };
  configure_tiles();
  if (chunks > 0) {
    const Chunk c = chunk(0);
    for (int64_t row = 0; row < c.rows; ++row)
      for (int64_t step = 0; step < c.steps; ++step) split(c, row, step);
  }
  for (int64_t g = 0; g < chunks; ++g) {
    const Chunk current = chunk(g);
    const int64_t units = passes * current.steps;
    int64_t pass = 0, step = 0;  // the next product step
    const auto multiply_next = [&] {
      multiply_step(current, pass, step);
      if (++step == current.steps) step = 0, ++pass;
    };
    if (g + 1 < chunks) {
      // Bresenham: after each of the next chunk's splits, units / splits product steps.
      const Chunk next = chunk(g + 1);
      const int64_t splits = next.rows * next.steps;
      int64_t owed = 0;
      for (int64_t row = 0; row < next.rows; ++row) {
        for (int64_t s = 0; s < next.steps; ++s) {
          split(next, row, s);
          for (owed += units; owed >= splits; owed -= splits) multiply_next();
        }
      }
    }
    while (pass < passes) multiply_next();
  }
  _tile_release();
  return splitter.finite();
}

// bf16_dot_product: 16 tokens' weight rows are turned, a step of 32 deep at a time, into pairs of
// depth per token (a transpose of 32-bit words), and every hidden row's pair is broadcast against
// them: each vdpbf16ps then serves 16 tokens, where brgemm's B of hidden rows padded to 32 columns
// wasted up to half its dot products (R = 17: 15 of 32).
constexpr int64_t kDotTokens = 16, kDotRows = 24;  // accumulators per pass: 24 of 32 registers

// Accumulators for `Rows` hidden rows (pair p of row m at h[p * ld_h + m]) over all pairs of
// depth, stored for the block's tokens. Meanwhile the next block's weight rows (`next`, row
// stride ld_next bytes; null for none) are fetched into L2, a line per pair: as many as it has.
template <int Rows>
SLED_AVX512_BF16 void dot_rows(const uint32_t* turned, int64_t pairs, const uint32_t* h,
                               int64_t ld_h, float* out, int64_t ld_out, __mmask16 tokens,
                               const char* next, int64_t ld_next) {
  __m512 acc[Rows];
#pragma GCC unroll 24
  for (int m = 0; m < Rows; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    if (next) _mm_prefetch(next + p % kDotTokens * ld_next + p / kDotTokens * 64, _MM_HINT_T1);
    const __m512bh w = (__m512bh)_mm512_loadu_si512(turned + p * kDotTokens);
#pragma GCC unroll 24
    for (int m = 0; m < Rows; ++m)
      acc[m] = _mm512_dpbf16_ps(acc[m], w, (__m512bh)_mm512_set1_epi32(h[p * ld_h + m]));
  }
#pragma GCC unroll 24
  for (int m = 0; m < Rows; ++m) _mm512_mask_storeu_ps(out + m * ld_out, tokens, acc[m]);
}

template <size_t... I>
constexpr auto dot_rows_table(std::index_sequence<I...>) {
  return std::array{&dot_rows<I + 1>...};
}

void bf16_dot_product(const c10::BFloat16* w, int64_t ld_w, int64_t rows, int64_t H,
                      const c10::BFloat16* h, int64_t M, int64_t ld_h, float* out,
                      int64_t ld_out, c10::BFloat16* scratch) {
  static constexpr auto kDots = dot_rows_table(std::make_index_sequence<kDotRows>());
  const int64_t pairs = H / 2;
  const auto* words = reinterpret_cast<const float*>(w);  // pairs of depth as 32-bit words
  auto* turned = reinterpret_cast<float*>(scratch);       // [pairs, 16 tokens]
  const auto* h_words = reinterpret_cast<const uint32_t*>(h);
  const int64_t per_pass = equal_part(M, kDotRows);  // 17 rows as one pass, 33 as 17 + 16
  for (int64_t t0 = 0; t0 < rows; t0 += kDotTokens) {
    const int tokens = static_cast<int>(std::min(kDotTokens, rows - t0));
    for (int64_t p0 = 0; p0 < pairs; p0 += 16)
      at::vec::transpose_mxn_16x16(words + t0 * (ld_w / 2) + p0, ld_w / 2, turned + p0 * 16, 16,
                                   tokens, static_cast<int>(std::min<int64_t>(16, pairs - p0)));
    const __mmask16 valid = static_cast<__mmask16>((uint32_t{1} << tokens) - 1);
    const char* next = t0 + kDotTokens < rows
                           ? reinterpret_cast<const char*>(w + (t0 + kDotTokens) * ld_w)
                           : nullptr;
    for (int64_t m0 = 0; m0 < M; m0 += per_pass)
      kDots[std::min(per_pass, M - m0) - 1](reinterpret_cast<const uint32_t*>(turned), pairs,
                                            h_words + m0, ld_h, out + m0 * ld_out + t0, ld_out,
                                            valid, m0 == 0 ? next : nullptr, ld_w * 2);
  }
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
                                  split_half, fold_columns, split_product, bf16_dot_product,
#else
                                  // the split, the column fold and the library's bf16 / fp16
                                  // products need AVX-512
                                  nullptr, nullptr, nullptr, nullptr,
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
                                  float_product
#else
                                  nullptr
#endif
  };
  return kernels;
}

}  // namespace CPU_CAPABILITY
}  // namespace sled
