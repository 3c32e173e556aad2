// The CPU kernel's vectorised inner loops, compiled once per x86 instruction-set level (DEFAULT,
// AVX2, AVX512: simd/row_kernels_simd.cpp, each copy in namespace sled::<level>) and chosen once
// at load time from the CPU, as ATen's DispatchStub does; ATEN_CPU_CAPABILITY forces a lower level.
// Only those copies are built with ISA flags, so the rest of the library runs on any x86-64 CPU.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../sled_math.h"

namespace sled {

// The size of the fewest equal parts of at most `most` that `count` splits into (the last part
// may be less): 17 in parts of at most 24 is one of 17, 33 is 17 + 16; 0 for nothing to split.
constexpr int64_t equal_part(int64_t count, int64_t most) {
  const int64_t parts = (count + most - 1) / most;
  return parts > 0 ? (count + parts - 1) / parts : 0;
}

// bf16 elements of split_product's scratch: two chunks of 16 rows x 128 depth, both parts.
constexpr int64_t kSplitProductScratch = 2 * 2 * 16 * 128;
// bf16 elements of bf16_dot_product's scratch for depth H: 16 tokens' pairs of depth, the pairs
// rounded up to 16.
constexpr int64_t dot_product_scratch(int64_t H) { return (H / 2 + 15) / 16 * 16 * 32; }
// Hidden rows float_product multiplies at most: three AVX-512 vectors of them, six AVX2 ones.
constexpr int64_t kMaxFloatProductRows = 48;

struct RowKernels {
  const char* level;  // "DEFAULT", "AVX2" or "AVX512"
  int64_t lanes;  // floats per SIMD vector
  // Floats of one record of vector-lane statistics (RowStatsT over SIMD lanes, kept across
  // tiles): one row's, or one per lane (fold_columns).
  int64_t lane_state_floats;

  // Sets `rows` rows of lane statistics to empty.
  void (*clear_lanes)(float* lanes, int64_t rows);
  // Folds tokens [0, count) of logit row z (d = z - final_row) into the row's lane statistics.
  // The tile's first token is `tile_offset` tokens after the chunk's first one (< 2^24, so lane
  // tokens stay exact as floats); a tail narrower than a vector goes straight into `stats`, whose
  // tokens are global (`first_token` is the tile's first one).
  void (*fold_row)(float* lanes, RowStats& stats, const float* z, const float* final_row,
                   int64_t count, int64_t tile_offset, int32_t first_token);
  // Merges lanes [first_lane, first_lane + lane_count) of lane statistics into `stats`;
  // `chunk_first_token` is the global id of token 0.
  void (*merge_lanes)(const float* lanes, int64_t first_lane, int64_t lane_count, RowStats& stats,
                      int32_t chunk_first_token);
  // z = softcap * tanh(scale * (z + bias) / softcap) in place: bias per element, or `one_bias`
  // for all (bias may be null, softcap 0: off).
  void (*postprocess)(float* z, int64_t count, const float* bias, bool one_bias, float scale,
                      float softcap);
  // The maximum of x and the sum over j of exp(x_j - max).
  void (*softmax_stats)(const float* x, int64_t count, float& max, float& total);
  // One evolution step on a whole row (SPEC step 5): x -= eta * exp(x - max) / total.
  void (*evolve_row)(float* x, int64_t count, float max, float total, float eta);
  // dst[j * ld_dst + i] = src[i * ld_src + j] for a [rows, cols] matrix of 32-bit words (floats
  // carry the bits: only moves and shuffles touch them).
  void (*transpose)(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows,
                    int64_t cols);
  // Splits each half of the [rows, count] matrix x into bf16 hi and lo with hi + lo == x
  // exactly (a half's 11 significant bits: hi keeps 8, lo the rest, within bf16's range).
  // Returns false if x holds a NaN or an infinity (hi keeps it; lo is 0 there). AVX512 only (null
  // below it): brgemm needs AVX-512.
  bool (*split_half)(const c10::Half* x, int64_t ld_x, int64_t rows, int64_t count,
                     c10::BFloat16* hi, c10::BFloat16* lo, int64_t ld_out);
  // fold_row over `rows` rows held column-wise (row m's logit of token j at z[j * ld + m], ld a
  // multiple of the lane count at least rows), one lane per row: lane statistics record m / lanes
  // holds rows from m rounded down, row m in lane m % lanes. Rows are positions' R rows in order,
  // each position's last row its final one. Tokens [0, count) in order; the first is
  // `tile_offset` tokens after the chunk's first (< 2^24). AVX512 only (null below it).
  void (*fold_columns)(float* lanes, const float* z, int64_t ld, int64_t rows, int64_t R,
                       int64_t count, int64_t tile_offset);
  // out [rows, columns] (row stride ld_out) = the fp16 weight rows w [rows, H] (unit column
  // stride, row stride ld_w), each split into bf16 hi + lo as split_half does, times b, bf16
  // packed as brgemm's B ([depth / 2, columns, 2], depth H rounded up to 32 and zero-padded;
  // columns a multiple of 16), on AMX in fp32. out has room for rows rounded up to 16 (the rows
  // past `rows` are overwritten). `scratch` holds kSplitProductScratch bf16. Returns false if w
  // holds a NaN or an infinity (out is then not the product). AVX512 only (null below it); needs
  // AMX-BF16, its tile data enabled for the process (as oneDNN does).
  bool (*split_product)(const c10::Half* w, int64_t ld_w, int64_t rows, int64_t H,
                        const c10::BFloat16* b, int64_t columns, float* out, int64_t ld_out,
                        c10::BFloat16* scratch);
  // out [M, rows] (row stride ld_out) = the bf16 hidden rows h, packed as brgemm's B ([H / 2,
  // ld_h, 2]: row m's pair p of depth at word p * ld_h + m), times the bf16 weight rows w [rows,
  // H] (unit column stride, row stride ld_w; H and ld_w even), transposed, on AVX512-BF16 dot
  // products in fp32. `scratch` holds dot_product_scratch(H) bf16. AVX512 only (null below it);
  // needs AVX512-BF16.
  void (*bf16_dot_product)(const c10::BFloat16* w, int64_t ld_w, int64_t rows, int64_t H,
                           const c10::BFloat16* h, int64_t M, int64_t ld_h, float* out,
                           int64_t ld_out, c10::BFloat16* scratch);
  // out [rows, M rounded up to the lanes] (row stride ld_out) = the fp32 weight rows w [rows, H]
  // (unit column stride, row stride ld_w) times M <= kMaxFloatProductRows hidden rows, transposed
  // and padded: h [H, ld_h], row m's element k at h[k * ld_h + m], the columns past M up to the
  // lanes readable (their zeros give zeros). AVX2 and AVX512 (null at DEFAULT).
  void (*float_product)(const float* w, int64_t ld_w, int64_t rows, int64_t H, const float* h,
                        int64_t M, int64_t ld_h, float* out, int64_t ld_out);
};

// The copies that were compiled (row_kernels_simd.cpp) and the one this CPU runs.
namespace DEFAULT { const RowKernels& row_kernels(); }
#if defined(SLED_X86_LEVELS)
namespace AVX2 { const RowKernels& row_kernels(); }
namespace AVX512 { const RowKernels& row_kernels(); }
#endif
const RowKernels& row_kernels();

}  // namespace sled
