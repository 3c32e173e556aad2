// CPU backend: one pass over the vocab in tiles, chunks of tiles in parallel.
//
// Per tile: the logits of all R*N rows for the tile's tokens come from a matrix product (or are
// copied from the logits input), every row is folded into its streaming statistics (sled_math.h)
// and each position's best final-row tokens are kept with the premature rows' logits there. Chunks
// are merged in a fixed order, so results do not depend on thread scheduling. [R, N, V] never
// exists; W is read once. The vectorised loops live in row_kernels.h, one copy per x86 level.
//
// The algorithm's steps, named as in the CUDA backend: fold_tile (per tile), merge_stats and
// select_topk (a shard's partials), compute_contrast (combine: steps 2-4), evolve (step 5).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "../sled_math.h"
#include "../sled_problem.h"
#include "row_kernels.h"

// ATen's OpenMP parallel_for is a pragma in its headers: compiled without OpenMP it silently runs
// every chunk on the calling thread.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "build the CPU kernel with -fopenmp (torch's parallel backend is OpenMP)"
#endif

namespace sled {
namespace {

int64_t round_up(int64_t x, int64_t step) { return (x + step - 1) / step * step; }

// The best `capacity` tokens of one position's final row seen so far (worst on top of a heap),
// each with the premature rows' logits at that token.
class CandidateHeap {
 public:
  struct Entry {
    float value;
    int32_t token;
    int32_t slot;  // where its premature logits live in `carried`
  };

  CandidateHeap(int64_t capacity, int64_t premature_rows)
      : capacity_(capacity), premature_rows_(premature_rows) {
    heap_.reserve(capacity);
    carried_.resize(capacity * premature_rows);
  }

  // Offers tokens [0, count) of the tile; the final row's logit of token j is at
  // final_row[j * token_stride], premature row r's at premature[r * row_stride + j * token_stride].
  void offer(const float* final_row, const float* premature, int64_t row_stride,
             int64_t token_stride, int64_t count, int32_t token0) {
    for (int64_t j = 0; j < count; ++j) {
      const float v = final_row[j * token_stride];
      const int32_t token = token0 + static_cast<int32_t>(j);
      int32_t slot;
      if (static_cast<int64_t>(heap_.size()) < capacity_) {
        slot = static_cast<int32_t>(heap_.size());
        heap_.push_back({v, token, slot});
      } else {
        if (v < heap_.front().value || !ranks_before(v, token, heap_.front().value,
                                                     heap_.front().token))
          continue;
        std::pop_heap(heap_.begin(), heap_.end(), worse_last);
        slot = heap_.back().slot;
        heap_.back() = {v, token, slot};
      }
      std::push_heap(heap_.begin(), heap_.end(), worse_last);
      float* dst = carried_.data() + static_cast<int64_t>(slot) * premature_rows_;
      for (int64_t r = 0; r < premature_rows_; ++r)
        dst[r] = premature[r * row_stride + j * token_stride];
    }
  }

  const std::vector<Entry>& entries() const { return heap_; }
  const float* carried(int32_t slot) const {
    return carried_.data() + static_cast<int64_t>(slot) * premature_rows_;
  }

  static bool worse_last(const Entry& a, const Entry& b) {
    return ranks_before(a.value, a.token, b.value, b.token);
  }

 private:
  int64_t capacity_, premature_rows_;
  std::vector<Entry> heap_;
  std::vector<float> carried_;
};

// What one chunk of tiles leaves behind.
struct ChunkResult {
  std::vector<RowStats> stats;       // [R * N], row r of position n at r * N + n
  std::vector<CandidateHeap> heaps;  // [N]
};

// brgemm (oneDNN's micro-kernel behind at::native::cpublas) multiplies 16-bit A [m, depth] by B
// [depth, n] packed in pairs, [depth / 2, n, 2] (VNNI: each pair of neighbours along depth in one
// 32-bit word), accumulating in fp32 on the CPU's matrix or dot-product instructions (AMX,
// AVX512-BF16). Writes `rows` [n, depth] (16-bit, unit column stride, even depth and row stride)
// packed into the contiguous `out`: a transpose of 32-bit words.
void pack_b(const at::Tensor& rows, at::Tensor& out) {
  const int64_t n = rows.size(0), depth = rows.size(1);
  row_kernels().transpose(reinterpret_cast<const float*>(rows.const_data_ptr()),
                          rows.stride(0) / 2, reinterpret_cast<float*>(out.data_ptr()), n, n,
                          depth / 2);
}

// out [m, n] (row stride n) = a [m, depth] (row stride lda) times b [depth, n] as pack_b wrote
// it, both `dtype`; `accumulate` adds the product to out instead.
void brgemm_fp32(at::ScalarType dtype, int64_t m, int64_t n, int64_t depth, const void* a,
                 int64_t lda, const void* b, float* out, bool accumulate) {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(CPUBLAS_BRGEMM_F16F16F32)
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "sled_brgemm", [&] {
    at::native::cpublas::brgemm(m, n, depth, lda, n, n, accumulate,
                                static_cast<const scalar_t*>(a), static_cast<const scalar_t*>(b),
                                out, /*is_vnni=*/true);
  });
#else
  (void)dtype, (void)m, (void)n, (void)depth, (void)a, (void)lda, (void)b, (void)out;
  (void)accumulate;
  TORCH_CHECK(false, "sled: this build of torch has no brgemm");
#endif
}

// Whether brgemm multiplies `dtype` (bf16 or fp16) here in pairs on the CPU's matrix or
// dot-product instructions. Checked once on a small product whose every term and sum is exact, so
// a torch whose oneDNN lacks the micro-kernel (or reads B otherwise) falls back to the fp32
// projection instead of failing or computing something else.
bool brgemm_multiplies(at::ScalarType dtype) {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(CPUBLAS_BRGEMM_F16F16F32) && \
    defined(SLED_X86_LEVELS)
  const auto check = [](at::ScalarType dtype) {
    if (std::strcmp(row_kernels().level, "AVX512") != 0) return false;  // oneDNN's needs
    if (!at::native::cpublas::could_pack(dtype) &&
        !(dtype == at::kBFloat16 && __builtin_cpu_supports("avx512bf16")))
      return false;
    constexpr int64_t m = 3, n = 40, depth = 6;
    const at::Tensor a = (at::arange(m * depth).view({m, depth}).remainder(5) - 2).to(dtype);
    const at::Tensor b_rows = (at::arange(n * depth).view({n, depth}).remainder(7) - 3).to(dtype);
    at::Tensor b = at::empty({depth, n}, b_rows.options());
    at::Tensor out = at::empty({m, n}, at::kFloat);
    try {
      pack_b(b_rows, b);
      brgemm_fp32(dtype, m, n, depth, a.const_data_ptr(), depth, b.const_data_ptr(),
                  out.data_ptr<float>(), false);
      at::native::cpublas::brgemm_release();
    } catch (const std::exception&) {
      return false;
    }
    return at::equal(out, at::mm(a.to(at::kFloat), b_rows.to(at::kFloat).t()));
  };
  static const bool bf16 = check(at::kBFloat16), fp16 = check(at::kHalf);
  return dtype == at::kBFloat16 ? bf16 : dtype == at::kHalf && fp16;
#else
  (void)dtype;
  return false;
#endif
}

// fp16 where brgemm multiplies bf16 on AMX but not fp16 (Sapphire and Emerald Rapids: no
// AMX-FP16): each half is split into bf16 hi + lo (split_half, exact), so x . y is the sum of four
// bf16 products (hi.hi, hi.lo, lo.hi, lo.lo), every term exact in fp32. On AMX that beats fp32
// FMAs on widened halves, which is what oneDNN's fp16 brgemm does on AVX512-FP16: Sapphire
// Rapids, 2 threads, the README's shapes took 0.53-1.01x torch's fp16 GEMM split (04b4414),
// 1.04-1.71x through that brgemm (5feb924).
bool splits_halves() {
  static const bool split = !brgemm_multiplies(at::kHalf) && brgemm_multiplies(at::kBFloat16) &&
                            at::native::cpublas::could_pack(at::kBFloat16);
  return split;
}

// Writes `rows` [n, H] into the first n rows of `out` [parts, rows, depth >= H] as the products
// read them: converted to out's dtype, or split into bf16 hi and lo parts (splits_halves). The
// depth padding is left as it is (zero). False when a split met a NaN or an infinity.
bool write_operands(const at::Tensor& rows, at::Tensor& out) {
  const int64_t n = rows.size(0), H = rows.size(1);
  if (out.size(0) == 1) {
    out[0].narrow(0, 0, n).narrow(1, 0, H).copy_(rows);
    return true;
  }
  const at::Tensor x = rows.stride(1) == 1 ? rows : rows.contiguous();
  const c10::Half* src = x.const_data_ptr<c10::Half>();
  c10::BFloat16* hi = out.data_ptr<c10::BFloat16>();
  c10::BFloat16* lo = hi + out.stride(0);
  return row_kernels().split_half(src, x.stride(0), n, H, hi, lo, out.stride(1));
}

// Whether split fp16 weight rows streamed past packed hidden rows are split and multiplied in
// one pass (split_product, on AMX) rather than split into a buffer, then multiplied by brgemm:
// where halves are split, the process may use AMX's tile data (Linux grants it on request, as
// oneDNN asks), and a small product, exact in fp32, comes out right.
bool splits_in_product() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(SLED_X86_LEVELS) && defined(__linux__)
  static const bool ok = [] {
    if (!splits_halves() || row_kernels().split_product == nullptr) return false;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XTILEDATA
    if (syscall(SYS_arch_prctl, kRequestPermission, kTileData) != 0) return false;
    // Halves with lo parts (k / 1024, |k| < 2^11) times small integers: every sum exact. Two
    // blocks of weight rows, the second partial, and a partial step of depth.
    constexpr int64_t rows = 20, H = 40, n = 3, depth = 64, columns = 32;
    const at::Tensor w = (at::arange(rows * H).mul(37).remainder(4093) - 2046)
                             .div(1024.)
                             .view({rows, H})
                             .to(at::kHalf);
    const at::Tensor h = (at::arange(n * H).view({n, H}).remainder(7) - 3).to(at::kHalf);
    at::Tensor parts = at::zeros({2, n, depth}, at::kBFloat16);
    write_operands(h, parts);
    at::Tensor b = at::empty({depth / 2, columns, 2}, at::kBFloat16);
    pack_b(at::cat({parts[0], parts[1], at::zeros({columns - 2 * n, depth}, at::kBFloat16)}), b);
    at::Tensor scratch = at::full({kSplitProductScratch}, NAN, at::kBFloat16);  // all written
    at::Tensor out = at::empty({round_up(rows, 16), columns}, at::kFloat);
    const bool finite = row_kernels().split_product(
        w.const_data_ptr<c10::Half>(), H, rows, H, b.const_data_ptr<c10::BFloat16>(), columns,
        out.data_ptr<float>(), columns, scratch.data_ptr<c10::BFloat16>());
    // brgemm reloads its tile configuration on its next call here, which it tracks per thread
    at::native::cpublas::brgemm_release();
    return finite && at::equal(out.narrow(0, 0, rows).narrow(1, 0, n) +
                                   out.narrow(0, 0, rows).narrow(1, n, n),
                               at::mm(w.to(at::kFloat), h.to(at::kFloat).t()));
  }();
  return ok;
#else
  return false;
#endif
}

// Whether bf16 weights streamed past few hidden rows go through the library's AVX512-BF16 dot
// products (bf16_dot_product) rather than brgemm: where brgemm multiplies bf16 on AVX512-BF16 but
// not AMX (AMD Zen 4, Intel Cooper Lake; oneDNN capped at AVX512_CORE_BF16), and a small product,
// exact in fp32, comes out right. brgemm there takes the hidden rows as B, padded to 32 columns.
bool dots_bf16() {
#if defined(SLED_X86_LEVELS)
  static const bool ok = [] {
    if (row_kernels().bf16_dot_product == nullptr || !__builtin_cpu_supports("avx512bf16") ||
        !brgemm_multiplies(at::kBFloat16) || at::native::cpublas::could_pack(at::kBFloat16))
      return false;
    // Small integers: every sum exact. Two blocks of tokens, the second partial; two groups of
    // hidden rows, the second partial; a partial step of depth.
    constexpr int64_t rows = 20, H = 40, M = 30;
    const at::Tensor w =
        (at::arange(rows * H).mul(37).remainder(17) - 8).view({rows, H}).to(at::kBFloat16);
    const at::Tensor h = (at::arange(M * H).view({M, H}).remainder(7) - 3).to(at::kBFloat16);
    constexpr int64_t columns = 32;
    at::Tensor packed = at::empty({H / 2, columns, 2}, at::kBFloat16);
    pack_b(at::cat({h, at::zeros({columns - M, H}, at::kBFloat16)}), packed);
    at::Tensor scratch = at::empty({dot_product_scratch(H)}, at::kBFloat16);
    at::Tensor out = at::full({M, rows}, NAN, at::kFloat);
    row_kernels().bf16_dot_product(w.const_data_ptr<c10::BFloat16>(), H, rows, H,
                                   packed.const_data_ptr<c10::BFloat16>(), M, columns,
                                   out.data_ptr<float>(), rows,
                                   scratch.data_ptr<c10::BFloat16>());
    return at::equal(out, at::mm(h.to(at::kFloat), w.to(at::kFloat).t()));
  }();
  return ok;
#else
  return false;
#endif
}

// How the logits of a tile come about: copied from the logits input, or a product of the hidden
// rows [M, H] with the tile's weight rows in one of three ways.
enum class Source {
  kLogits,   // the logits form: copied
  kFloat,    // fp32 weights read in place by BLAS (sgemm), or by float_product for few rows
  kWidened,  // other weights widened to fp32 one tile at a time, then as kFloat
  kPacked,   // bf16/fp16 weights and hidden rows multiplied by brgemm (see Projection)
};

// The [rows, tile] logits of one product should stay in cache (64K floats), and so should the
// weight panel: 4 MiB read in place, 1 MiB when a thread converts or packs it into a buffer.
constexpr int64_t kLogitsBudget = 64 * 1024;
constexpr int64_t kPanelBytesInPlace = 4 << 20, kPanelBytesBuffered = 1 << 20;
// Many positions are projected in groups, so that tiles stay wide: a narrow tile re-reads all the
// hidden rows for few tokens (at R * N = 2883 rows, 16-column tiles made the op twice the GEMM).
// sgemm prefers more rows per product and narrower tiles: 256 columns took TinyLlama-like N = 8
// in fp32 from 1.11x torch's GEMM to 1.00x, Llama-3.2-1B-like from 1.00x to 0.84x (paired, one
// session); for brgemm they made SmolLM2-like N = 93 in bf16 0.94x instead of 0.83x.
constexpr int64_t kMinGroupColumns = 512, kMinSgemmGroupColumns = 256;
// A chunk's tokens are carried as floats in the vector lanes (row_kernels.h): at most 2^24.
constexpr int64_t kMaxChunkTokens = int64_t{1} << 24;
// Packed hidden rows are padded to a multiple of an AMX tile of brgemm's B (16 columns), and to
// two tiles at least: with one, each tile of weight rows loaded served a single product, and
// R = 8, N = 1 in bf16 took 1.8x torch's bf16 GEMM instead of 0.9x (Sapphire Rapids, one thread).
constexpr int64_t kBrgemmBlock = 16;
// Packed hidden rows are multiplied a block of depth at a time, small enough to stay in cache
// while the weight tile streams past it; the products accumulate over the blocks. Up to twice
// the block they run whole: so few rows are bound by streaming the weight, which more passes over
// its rows slow down. Blocks are a multiple of an AMX tile's depth (32 bf16). Sapphire Rapids,
// 2 threads: Llama-3-8B-like N = 8 took 1.28x torch's bf16 GEMM in 512 KiB blocks, 1.02x in 256.
constexpr int64_t kHiddenBlockBytes = 256 * 1024, kDepthStep = 32;
// Packed hidden rows share each product's logits budget with the tile: past this many columns
// the tile would be too narrow, and the weight tiles are packed instead.
constexpr int64_t kMaxPackedColumns = kLogitsBudget / 128;
// bf16_dot_product takes up to 24 hidden rows per pass over a block of weight rows; past 64 rows
// brgemm's padding of them wastes little.
constexpr int64_t kMaxDotRows = 64;

// Whether the product of `rows` packed hidden rows, which comes out [tile, rows], is folded as it
// is, a lane per row (fold_columns), rather than transposed and folded a lane per token. The
// transpose saved costs about half the fold; lanes idle past the last row cost their share of it,
// so at most a quarter may. Sapphire Rapids, 2 threads, paired runs: 248 rows in 256 lanes
// (SmolLM2-like N = 8) and 31 in 32 (N = 1) 10-25% faster so, 17 in 32 (H = 2048) slower.
bool fold_a_lane_per_row(int64_t rows) {
  const RowKernels& kernels = row_kernels();
  return kernels.fold_columns != nullptr && 4 * rows >= 3 * round_up(rows, kernels.lanes);
}

int64_t packed_columns(int64_t rows) {
  return round_up(std::max(rows, 2 * kBrgemmBlock), kBrgemmBlock);
}

// Positions per group: all of them when their rows leave tiles wide enough, else as many as do.
// Equal groups, so no group is a narrow remainder.
int64_t group_positions(int64_t R, int64_t N, int64_t min_columns) {
  const int64_t most =
      std::clamp<int64_t>(kLogitsBudget / (R * min_columns), 1, std::max<int64_t>(N, 1));
  return std::max<int64_t>(equal_part(N, most), 1);
}

// Columns per tile for `rows` rows per product and a weight panel of `column_bytes` per column.
int64_t tile_columns(int64_t rows, int64_t column_bytes, bool buffered) {
  const int64_t by_logits = kLogitsBudget / std::max<int64_t>(rows, 1);
  const int64_t panel = buffered ? kPanelBytesBuffered : kPanelBytesInPlace;
  const int64_t by_weight = column_bytes > 0 ? panel / column_bytes : 4096;
  const int64_t cols = std::min(by_logits, by_weight) / 16 * 16;
  return std::clamp<int64_t>(cols, 16, 4096);
}

// How a call's products are laid out: the tile size and, for brgemm, which operand is packed.
// brgemm reads its A operand in place and B packed (a transpose of 32-bit words), so the smaller
// one is packed:
//  - fewer padded hidden rows than H / 2 and kMaxPackedColumns (decoding): all hidden rows are
//    packed once per call, in one group, and the weight tile is A, streamed from memory once, a
//    depth block at a time (kHiddenBlockBytes); the product comes out [tile, rows] and is turned
//    back (rows * tile words per tile instead of H / 2 * tile). On Sapphire Rapids (AMX, one
//    thread) packing the hidden rows made R = 17-23, N = 1 0.9x torch's bf16 GEMM instead of 2x;
//  - many rows (scoring): each weight tile is packed once and serves every group.
// fp16 split into bf16 parts (splits_halves) multiplies every part of A by every part of B. Packed
// hidden rows hold their parts side by side as columns, so that one product per part of the
// weight serves both and less padding is multiplied (R = 33: 80 columns instead of 2 x 48); the
// two halves of its result are then added. With packed hidden rows, two of the library's kernels
// take brgemm's place where they run (each one-time checked): split_product for fp16 split on
// AMX, bf16_dot_product for at most kMaxDotRows bf16 rows without AMX. In fp32, sgemm gives way
// to float_product for at most kMaxFloatProductRows rows, all in one group: the hidden rows are
// transposed once per call ([H, columns]) and the product comes out [tile, columns].
struct Projection {
  Source source;
  int64_t group;   // positions per product
  int64_t groups;  // products per tile: ceil(N / group), 0 for an empty batch
  int64_t depth;   // H, rounded up for brgemm (to even) and split_product (to 32), zero-padded
  int64_t tile;    // weight rows per tile
  at::ScalarType operand = at::kFloat;  // what the products multiply: fp32, bf16 or fp16
  int64_t parts = 1;                    // operands per matrix: 2 for fp16 split into bf16
  bool packs_hidden = false;
  bool splits_in_product = false;  // fp16 weight tiles split as they stream (split_product)
  bool dots = false;               // bf16 weight tiles read in place by bf16_dot_product
  bool float_product = false;      // fp32 weight tiles times few hidden rows by float_product
  bool folds_columns = false;      // the products' [tile, columns] logits folded as they are
  int64_t columns = 0;      // packed hidden rows per group, every part's (see packed_columns)
  int64_t depth_block = 0;  // depth per product of packed hidden rows (the last block less)

  explicit Projection(const Problem& p) {
    const int64_t R = p.num_rows, N = p.positions, H = p.rows.size(2);
    const at::ScalarType dtype = p.projects() ? p.weight.scalar_type() : at::kFloat;
    if (!p.projects()) {
      source = Source::kLogits;
    } else if (dtype == at::kFloat) {
      source = p.weight.stride(1) == 1 ? Source::kFloat : Source::kWidened;
    } else {
      // A non-finite value times a part that is zero gives NaN where the product is +-inf (which
      // softcap maps to a number): hidden rows holding one are widened instead.
      const bool split =
          dtype == at::kHalf && splits_halves() && at::isfinite(p.rows).all().item<bool>();
      // oneDNN refuses an empty depth (sgemm gives the zero product).
      source = H > 0 && (split || brgemm_multiplies(dtype)) ? Source::kPacked : Source::kWidened;
      if (source == Source::kPacked) {
        operand = split ? at::kBFloat16 : dtype;
        parts = split ? 2 : 1;
        const int64_t all_columns = packed_columns(parts * N * R);
        packs_hidden = all_columns * 2 <= H + H % 2 && all_columns <= kMaxPackedColumns;
        splits_in_product =
            split && packs_hidden && p.weight.stride(1) == 1 && sled::splits_in_product();
        dots = dtype == at::kBFloat16 && packs_hidden && N * R <= kMaxDotRows && H % 2 == 0 &&
               p.weight.stride(1) == 1 && p.weight.stride(0) % 2 == 0 && dots_bf16();
      }
    }
    const bool sgemm = source == Source::kFloat || source == Source::kWidened;
    group = packs_hidden ? N
                         : std::min(N, group_positions(R, N, sgemm ? kMinSgemmGroupColumns
                                                                   : kMinGroupColumns));
    const int64_t rows = group * R;
    float_product = sgemm && group == N && rows <= kMaxFloatProductRows &&
                    row_kernels().float_product != nullptr;
    columns = float_product ? round_up(rows, row_kernels().lanes) : packed_columns(parts * rows);
    folds_columns = fold_a_lane_per_row(rows) && ((packs_hidden && !dots) || float_product);
    groups = group > 0 ? (N + group - 1) / group : 0;
    depth = splits_in_product        ? round_up(H, kDepthStep)
            : source == Source::kPacked ? H + H % 2
                                        : H;
    // Bytes of one weight row's operands.
    const int64_t row_bytes = parts * depth * at::elementSize(operand);
    if (packs_hidden) {
      const int64_t block_bytes = columns * depth * at::elementSize(operand);
      const int64_t blocks = block_bytes <= 2 * kHiddenBlockBytes
                                 ? 1
                                 : (block_bytes + kHiddenBlockBytes - 1) / kHiddenBlockBytes;
      depth_block = std::min(depth, round_up((depth + blocks - 1) / blocks, kDepthStep));
    }
    switch (source) {
      case Source::kLogits:
        tile = tile_columns(rows, 0, false);
        break;
      case Source::kFloat:
      case Source::kWidened:
        tile = tile_columns(rows, row_bytes, source == Source::kWidened);
        break;
      case Source::kPacked:
        if (splits_in_product)  // the fp16 weight is read in place
          tile = tile_columns(columns, H * 2, false);
        else if (dots)
          tile = tile_columns(rows, H * 2, false);
        else
          tile = packs_hidden ? tile_columns(columns, row_bytes, parts > 1)
                              : tile_columns(rows, row_bytes, true);
        break;
    }
  }
};

// The hidden rows [M, H] position-major (row r of position n at n * R + r), so that a group of
// positions is a block of consecutive rows.
at::Tensor position_major(const Problem& p) {
  return p.rows.transpose(0, 1).reshape({p.num_rows * p.positions, p.rows.size(2)});
}

// The hidden rows as the products read them, position-major: [M, H] fp32 for sgemm, transposed
// and zero-padded [H, columns] for float_product; for brgemm [parts, M, depth], or, when they are
// the packed operand, each group's rows packed as B, [groups, depth / 2, columns, 2]: part p's
// rows from column p * group * R, zero-padded.
at::Tensor hidden_rows(const Problem& p, const Projection& how) {
  if (how.source == Source::kLogits) return at::Tensor();
  const int64_t R = p.num_rows, M = R * p.positions;
  const at::Tensor rows = position_major(p);
  if (how.float_product) {
    at::Tensor transposed =
        at::zeros({rows.size(1), how.columns}, rows.options().dtype(at::kFloat));
    transposed.narrow(1, 0, M).copy_(rows.t());
    return transposed;
  }
  if (how.source != Source::kPacked) return rows.to(at::kFloat).contiguous();
  const auto options = rows.options().dtype(how.operand);
  at::Tensor operands = at::zeros({how.parts, M, how.depth}, options);
  write_operands(rows, operands);
  if (!how.packs_hidden) return operands;
  at::Tensor padded = at::empty({how.columns, how.depth}, options);
  at::Tensor packed = at::empty({how.groups, how.depth / 2, how.columns, 2}, options);
  for (int64_t i = 0; i < how.groups; ++i) {
    const int64_t first = i * how.group * R, count = std::min(how.group * R, M - first);
    padded.zero_();
    for (int64_t part = 0; part < how.parts; ++part)
      padded.narrow(0, part * how.group * R, count)
          .copy_(operands[part].narrow(0, first, count));
    at::Tensor out = packed[i];
    pack_b(padded, out);
  }
  return packed;
}

// The logits of the tile [v0, v0 + cols) for the rows of one group of positions, written as
// [rows, cols], or [cols, columns] when they are folded column-wise (Projection::folds_columns).
// One per thread: it owns the thread's buffers.
class TileProjector {
 public:
  TileProjector(const Problem& p, const Projection& how, const at::Tensor& hidden)
      : p_(p), how_(how), hidden_(hidden) {
    const int64_t tile = how.tile, H = p.rows.size(2);
    const auto options = p.rows.options().dtype(how.operand);
    switch (how.source) {
      case Source::kWidened:
        weight_rows_ = at::empty({1, tile, H}, options);
        [[fallthrough]];
      case Source::kFloat:
        if (how.float_product && !how.folds_columns)
          transposed_ = at::empty({tile, how.columns}, at::kFloat);
        break;
      case Source::kPacked:
        // The weight rows are read in place unless they are split into a buffer, their depth
        // must be padded or their stride does not allow it; the library's kernels read them in
        // place into their own scratch.
        if (how.splits_in_product)
          kernel_scratch_ = at::empty({kSplitProductScratch}, options);
        else if (how.dots)
          kernel_scratch_ = at::empty({dot_product_scratch(H)}, options);
        else if (how.parts > 1 || how.depth != H || p.weight.stride(1) != 1 ||
                 p.weight.stride(0) % 2 != 0)
          weight_rows_ = at::zeros({how.parts, tile, how.depth}, options);
        if (how.packs_hidden && !how.folds_columns && !how.dots)
          transposed_ = at::empty({tile, how.columns}, at::kFloat);
        else if (!how.packs_hidden)
          packed_weight_ = at::empty({how.parts, how.depth * tile}, options);
        break;
      case Source::kLogits:
        break;
    }
  }

  ~TileProjector() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
    if (how_.source == Source::kPacked) at::native::cpublas::brgemm_release();
#endif
  }

  // Prepares the weight rows [v0, v0 + cols) for the products of this tile.
  void load_tile(int64_t v0, int64_t cols) {
    v0_ = v0;
    cols_ = cols;
    if (how_.source == Source::kLogits) return;
    const at::Tensor w = p_.weight.narrow(0, v0, cols);
    if (weight_rows_.defined()) {
      finite_split_ = write_operands(w, weight_rows_);
      if (!finite_split_) widen_tile();
      weight_ = weight_rows_.narrow(1, 0, cols);
    } else {
      weight_ = w.unsqueeze(0);
    }
    if (how_.source == Source::kPacked && !how_.packs_hidden && finite_split_) {
      for (int64_t part = 0; part < how_.parts; ++part) {
        at::Tensor out = packed_weight_[part].narrow(0, 0, how_.depth * cols);
        pack_b(weight_[part], out);
      }
    }
  }

  // Group `group` of positions: rows [row0, row0 + rows) of the position-major hidden rows.
  void project(int64_t group, int64_t row0, int64_t rows, float* out) {
    switch (how_.source) {
      case Source::kLogits: {
        const int64_t R = p_.num_rows;
        at::from_blob(out, {rows / R, R, cols_}, at::kFloat)
            .copy_(p_.rows.narrow(1, row0 / R, rows / R).narrow(2, v0_, cols_).transpose(0, 1));
        break;
      }
      case Source::kFloat:
      case Source::kWidened:
        if (how_.float_product)
          multiply_floats(rows, out);
        else
          sgemm(weight_[0], hidden_.narrow(0, row0, rows), out);
        break;
      case Source::kPacked:
        if (!finite_split_)
          project_widened(row0, rows, out);
        else if (how_.dots)  // the weight tile read in place, the logits [rows, tile]
          row_kernels().bf16_dot_product(
              weight_[0].const_data_ptr<c10::BFloat16>(), weight_.stride(1), cols_, how_.depth,
              hidden_[group].const_data_ptr<c10::BFloat16>(), rows, how_.columns, out, cols_,
              kernel_scratch_.data_ptr<c10::BFloat16>());
        else if (how_.packs_hidden)
          project_onto_packed_hidden(group, rows, out);
        else
          project_onto_packed_tile(row0, rows, out);
        break;
    }
  }

 private:
  // Part `part` of a [parts, rows, depth] tensor, from depth k0 on.
  static const char* part_from(const at::Tensor& t, int64_t part, int64_t k0) {
    return static_cast<const char*>(t.const_data_ptr()) +
           (part * t.stride(0) + k0) * t.element_size();
  }

  // The weight tile widened to fp32 for a product with the widened hidden rows (made once per
  // thread), where a split met a NaN or an infinity.
  void widen_tile() {
    widened_tile_ = p_.weight.narrow(0, v0_, cols_).to(at::kFloat);
    if (!widened_hidden_.defined()) widened_hidden_ = position_major(p_).to(at::kFloat);
  }

  // The weight tile is A, read in place (or from its buffer) a depth block at a time, or split
  // as it streams (Projection::splits_in_product); the product [tile, columns] has its parts'
  // columns added, then is turned back into [rows, tile] unless it is folded as it is.
  void project_onto_packed_hidden(int64_t group, int64_t rows, float* out) {
    float* product = how_.folds_columns ? out : transposed_.data_ptr<float>();
    const at::Tensor packed = hidden_[group];  // [depth / 2, columns, 2]
    const int64_t columns = how_.columns;
    if (!how_.splits_in_product) {
      for (int64_t k0 = 0; k0 < how_.depth; k0 += how_.depth_block) {
        const int64_t block = std::min(how_.depth_block, how_.depth - k0);
        for (int64_t a = 0; a < how_.parts; ++a)  // depth k0 of B starts at element k0 * columns
          brgemm_fp32(how_.operand, cols_, columns, block, part_from(weight_, a, k0),
                      weight_.stride(1), part_from(packed, 0, k0 * columns), product,
                      k0 > 0 || a > 0);
      }
    } else if (!row_kernels().split_product(
                   weight_[0].const_data_ptr<c10::Half>(), weight_.stride(1), cols_,
                   p_.rows.size(2), packed.const_data_ptr<c10::BFloat16>(), columns, product,
                   columns, kernel_scratch_.data_ptr<c10::BFloat16>())) {
      widen_tile();
      return project_widened(0, rows, out);
    }
    const int64_t part_offset = how_.group * p_.num_rows;
    for (int64_t part = 1; part < how_.parts; ++part) {
      for (int64_t j = 0; j < cols_; ++j) {
        float* row = product + j * columns;
        for (int64_t m = 0; m < rows; ++m) row[m] += row[part * part_offset + m];
      }
    }
    if (!how_.folds_columns) row_kernels().transpose(product, columns, out, cols_, cols_, rows);
  }

  // A tile the split cannot take (load_tile), widened, in the layout the other products write.
  void project_widened(int64_t row0, int64_t rows, float* out) const {
    sgemm(widened_tile_, widened_hidden_.narrow(0, row0, rows), out);
  }

  // out = the fp32 weight tile [cols, H] times the fp32 hidden rows [rows, H] by sgemm, in the
  // layout the fold reads: [rows, tile], or [tile, columns] when it folds a lane per row.
  void sgemm(const at::Tensor& tile, const at::Tensor& hidden, float* out) const {
    const int64_t rows = hidden.size(0);
    if (how_.folds_columns) {
      at::Tensor columns = at::from_blob(out, {cols_, rows}, {how_.columns, 1}, at::kFloat);
      at::mm_out(columns, tile, hidden.t());
    } else {
      at::Tensor logits = at::from_blob(out, {rows, cols_}, at::kFloat);
      at::mm_out(logits, hidden, tile.t());
    }
  }

  // The fp32 weight tile, read in place, times all hidden rows (transposed) by float_product,
  // whose [tile, columns] product is turned back into [rows, tile] unless it is folded as it is.
  void multiply_floats(int64_t rows, float* out) const {
    float* product = how_.folds_columns ? out : transposed_.data_ptr<float>();
    row_kernels().float_product(weight_[0].const_data_ptr<float>(), weight_.stride(1), cols_,
                                p_.rows.size(2), hidden_.const_data_ptr<float>(), rows,
                                how_.columns, product, how_.columns);
    if (!how_.folds_columns)
      row_kernels().transpose(product, how_.columns, out, cols_, cols_, rows);
  }

  // The hidden rows are A, read in place; the tile was packed by load_tile.
  void project_onto_packed_tile(int64_t row0, int64_t rows, float* out) const {
    for (int64_t a = 0; a < how_.parts; ++a)
      for (int64_t b = 0; b < how_.parts; ++b)
        brgemm_fp32(how_.operand, rows, cols_, how_.depth,
                    part_from(hidden_, a, row0 * hidden_.stride(1)), hidden_.stride(1),
                    part_from(packed_weight_, b, 0), out, a > 0 || b > 0);
  }

  const Problem& p_;
  const Projection& how_;
  at::Tensor hidden_;
  at::Tensor weight_rows_, packed_weight_, transposed_, kernel_scratch_;  // this thread's buffers
  at::Tensor weight_;                                    // the current tile: [parts, cols, depth]
  // False for a tile whose split met a NaN or an infinity (write_operands): it is multiplied
  // widened to fp32 instead.
  bool finite_split_ = true;
  at::Tensor widened_tile_, widened_hidden_;
  int64_t v0_ = 0, cols_ = 0;
};

// One thread's pass over chunks of tiles: each tile projected (TileProjector), then folded.
class ChunkFolder {
 public:
  ChunkFolder(const Problem& p, const Projection& how, const at::Tensor& hidden,
              const at::Tensor& bias, int64_t vocab_offset, at::Tensor& final_rows)
      : p_(p), how_(how), kernels_(row_kernels()), projector_(p, how, hidden),
        bias_(bias.defined() ? bias.data_ptr<float>() : nullptr), vocab_offset_(vocab_offset),
        final_rows_(final_rows.numel() > 0 ? final_rows.data_ptr<float>() : nullptr),
        logits_((how.folds_columns ? how.columns : how.group * p.num_rows) * how.tile),
        lanes_(p.num_rows * p.positions * kernels_.lane_state_floats) {}

  // Tiles [first_tile, last_tile) into `result`.
  void fold_chunk(int64_t first_tile, int64_t last_tile, ChunkResult& result) {
    const int64_t R = p_.num_rows, N = p_.positions, V = p_.vocab, tile = how_.tile;
    const int64_t chunk_v0 = first_tile * tile;
    const int64_t chunk_tokens = std::min(V, last_tile * tile) - chunk_v0;
    result.stats.assign(R * N, empty_stats<ScalarLanes>());
    result.heaps.clear();
    for (int64_t n = 0; n < N; ++n) result.heaps.emplace_back(std::min(p_.k, chunk_tokens), R - 1);
    kernels_.clear_lanes(lanes_.data(), R * N);
    for (int64_t t = first_tile; t < last_tile; ++t) {
      const int64_t v0 = t * tile, cols = std::min(tile, V - v0);
      projector_.load_tile(v0, cols);
      for (int64_t n0 = 0; n0 < N; n0 += how_.group) {
        const int64_t g = std::min(how_.group, N - n0);
        projector_.project(n0 / how_.group, n0 * R, g * R, logits_.data());
        fold_tile(n0, g, v0, cols, v0 - chunk_v0, result);
      }
    }
    const int32_t chunk_token0 = static_cast<int32_t>(vocab_offset_ + chunk_v0);
    const int64_t lanes = kernels_.lanes;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t r = 0; r < R; ++r) {
        const int64_t m = n * R + r;
        if (how_.folds_columns)  // row m in lane m % lanes of record m / lanes
          kernels_.merge_lanes(lanes_.data() + m / lanes * kernels_.lane_state_floats,
                               m % lanes, 1, result.stats[r * N + n], chunk_token0);
        else
          kernels_.merge_lanes(lanes_.data() + m * kernels_.lane_state_floats, 0, lanes,
                               result.stats[r * N + n], chunk_token0);
      }
    }
  }

 private:
  // The logits of positions [n0, n0 + g) on tokens [v0, v0 + cols) (row r of position n at
  // ((n - n0) * R + r) * cols): the epilogue, every row folded into its statistics, each
  // position's final-row tokens offered to its candidates (algorithm.md step 1).
  void fold_tile(int64_t n0, int64_t g, int64_t v0, int64_t cols, int64_t chunk_offset,
                 ChunkResult& result) {
    if (how_.folds_columns) return fold_tile_columns(v0, cols, chunk_offset, result);
    const int64_t R = p_.num_rows, N = p_.positions;
    float* z = logits_.data();
    for (int64_t m = 0; m < g * R; ++m)
      kernels_.postprocess(z + m * cols, cols, bias_ ? bias_ + v0 : nullptr, false,
                           static_cast<float>(p_.logit_scale), static_cast<float>(p_.softcap));
    const int32_t token0 = static_cast<int32_t>(vocab_offset_ + v0);
    for (int64_t n = n0; n < n0 + g; ++n) {
      const float* position = z + (n - n0) * R * cols;
      const float* final_row = position + (R - 1) * cols;
      for (int64_t r = 0; r < R; ++r)
        kernels_.fold_row(lanes_.data() + (n * R + r) * kernels_.lane_state_floats,
                          result.stats[r * N + n], position + r * cols, final_row, cols,
                          chunk_offset, token0);
      result.heaps[n].offer(final_row, position, cols, 1, cols, token0);
      if (final_rows_) std::copy(final_row, final_row + cols, final_rows_ + n * p_.vocab + v0);
    }
  }

  // fold_tile for the logits of all positions as [cols, columns] (row m of the position-major
  // rows at column m): folded a lane per row.
  void fold_tile_columns(int64_t v0, int64_t cols, int64_t chunk_offset, ChunkResult& result) {
    const int64_t R = p_.num_rows, N = p_.positions, ld = how_.columns;
    float* z = logits_.data();
    for (int64_t j = 0; j < cols; ++j)
      kernels_.postprocess(z + j * ld, N * R, bias_ ? bias_ + v0 + j : nullptr, true,
                           static_cast<float>(p_.logit_scale), static_cast<float>(p_.softcap));
    kernels_.fold_columns(lanes_.data(), z, ld, N * R, R, cols, chunk_offset);
    const int32_t token0 = static_cast<int32_t>(vocab_offset_ + v0);
    for (int64_t n = 0; n < N; ++n) {
      const float* position = z + n * R;
      const float* final_row = position + R - 1;
      result.heaps[n].offer(final_row, position, 1, ld, cols, token0);
      if (final_rows_)
        for (int64_t j = 0; j < cols; ++j) final_rows_[n * p_.vocab + v0 + j] = final_row[j * ld];
    }
  }

  const Problem& p_;
  const Projection& how_;
  const RowKernels& kernels_;
  TileProjector projector_;
  const float* bias_;
  int64_t vocab_offset_;
  float* final_rows_;         // [N, V] when kept, else null
  std::vector<float> logits_;  // one group's [rows, tile] logits (or [tile, columns])
  // Every row's vector-lane statistics over the current chunk: a record per row, or per `lanes`
  // rows when they are folded a lane per row.
  std::vector<float> lanes_;
};

// Chunks merge in chunk order, so the statistics do not depend on which thread ran which chunk.
void merge_stats(const std::vector<ChunkResult>& results, int64_t R, int64_t N, Partials& out) {
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t r = 0; r < R; ++r) {
      RowStats s = empty_stats<ScalarLanes>();
      for (const ChunkResult& result : results) s = merge(s, result.stats[r * N + n]);
      store_record(s, out.stats.data_ptr<float>() + (n * R + r) * kRecordFloats);
      out.argmax.data_ptr<int64_t>()[n * R + r] = s.argmax;
    }
  }
}

// A shard's top-k is inside the union of its chunks' top-ks; fewer than k tokens pad with -1.
void select_topk(const std::vector<ChunkResult>& results, int64_t k, int64_t L, Partials& out) {
  const int64_t N = out.values.size(0);
  at::parallel_for(0, N, 1, [&](int64_t n_begin, int64_t n_end) {
    struct Pick {
      CandidateHeap::Entry entry;
      const CandidateHeap* heap;
    };
    std::vector<Pick> picks;
    for (int64_t n = n_begin; n < n_end; ++n) {
      picks.clear();
      for (const ChunkResult& result : results)
        for (const auto& e : result.heaps[n].entries()) picks.push_back({e, &result.heaps[n]});
      const int64_t kept = std::min<int64_t>(k, picks.size());
      std::partial_sort(picks.begin(), picks.begin() + kept, picks.end(),
                        [](const Pick& a, const Pick& b) {
                          return CandidateHeap::worse_last(a.entry, b.entry);
                        });
      for (int64_t i = 0; i < k; ++i) {
        const bool real = i < kept;
        out.values.data_ptr<float>()[n * k + i] = real ? picks[i].entry.value : 0.f;
        out.tokens.data_ptr<int64_t>()[n * k + i] = real ? picks[i].entry.token : -1;
        float* premature = out.premature.data_ptr<float>() + (n * k + i) * L;
        if (real)
          std::copy_n(picks[i].heap->carried(picks[i].entry.slot), L, premature);
        else
          std::fill_n(premature, L, 0.f);
      }
    }
  });
}

// algorithm.md steps 2-4 for one position: the contrast weights of each premature layer at the
// k candidates, each layer's share, and the direction delta. `premature(i, l)` is premature layer
// l's logit at candidate i.
template <typename PrematureAt>
void compute_contrast(const RowStats* row_stats, int64_t R, const float* values,
                      const int64_t* tokens, int64_t k, PrematureAt premature,
                      std::vector<float>& weights, std::vector<float>& layer_sum, float* delta) {
  const int64_t L = R - 1;
  float total = 0.f;
  for (int64_t l = 0; l < L; ++l) {
    float sum = 0.f;
    for (int64_t i = 0; i < k; ++i) {
      const float z = premature(i, l);
      const float w = contrast_weight(row_stats[l], row_stats[R - 1], z, z - values[i],
                                      static_cast<int32_t>(tokens[i]));
      weights[l * k + i] = w;
      sum += w;
    }
    layer_sum[l] = sum;
    total += sum;
  }
  for (int64_t i = 0; i < k; ++i) {
    float d = 0.f;
    for (int64_t l = 0; l < L; ++l)
      d += layer_share(layer_sum[l], total) * normalized(weights[l * k + i], layer_sum[l]);
    delta[i] = -d;
  }
}

// algorithm.md step 5 for one position: T steps on its k candidates x_k. Steps before the last
// move the whole final row `row` (null when T = 1), whose softmax the next step needs.
void evolve(const RowKernels& kernels, float* x_k, const int64_t* tokens, const float* delta,
            int64_t k, float max, float softmax_sum, float* row, int64_t V, double rate,
            int64_t iterations) {
  for (int64_t t = 0; t < iterations; ++t) {
    if (t > 0) kernels.softmax_stats(row, V, max, softmax_sum);
    const float eta = step_size(rate, t, iterations);
    for (int64_t i = 0; i < k; ++i)
      x_k[i] = evolve_step(x_k[i], std::exp(x_k[i] - max) / softmax_sum, delta[i], eta);
    if (t + 1 == iterations) break;
    kernels.evolve_row(row, V, max, softmax_sum, eta);
    for (int64_t i = 0; i < k; ++i) row[tokens[i]] = x_k[i];
  }
}

}  // namespace

std::string cpu_kernels(at::ScalarType dtype) {
  const std::string level = row_kernels().level;
  const std::string float_products =
      row_kernels().float_product ? level + " FMAs as the weight streams, sgemm for many rows"
                                  : "sgemm";
  std::string projection = "widened to float32, " + float_products;
  if (dtype == at::kFloat)
    projection = float_products;
  else if (dtype == at::kBFloat16 && dots_bf16())
    projection = "AVX512-BF16 dot products as the weight streams, brgemm for many rows";
  else if (brgemm_multiplies(dtype))
    projection = "brgemm";
  else if (dtype == at::kHalf && splits_in_product())
    projection = "split into bfloat16 hi + lo: AMX as the weight streams, brgemm for many rows";
  else if (dtype == at::kHalf && splits_halves())
    projection = "brgemm, split into bfloat16 hi + lo";
  return level + "; " + projection;
}

Partials partials_cpu(const Problem& p, int64_t vocab_offset, bool keep_final) {
  // The op is not differentiable: its own ATen calls skip autograd, so a weight that requires
  // grad (a model's parameter) works outside no_grad too.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t R = p.num_rows, N = p.positions, V = p.vocab, k = p.k;
  const auto f32 = p.rows.options().dtype(at::kFloat);
  const Projection how(p);
  const at::Tensor hidden = hidden_rows(p, how);
  const at::Tensor bias =
      p.bias.defined() ? p.bias.to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor final_rows = at::empty({N, keep_final ? V : 0}, f32);

  const int64_t tiles = (V + how.tile - 1) / how.tile;
  const int64_t chunks = std::min<int64_t>(
      tiles, std::max({int64_t{16}, 4 * int64_t{at::get_num_threads()},
                       (tiles + kMaxChunkTokens / how.tile - 1) / (kMaxChunkTokens / how.tile)}));
  std::vector<ChunkResult> results(chunks);
  // Threads take chunks as they finish the last one, so a thread slowed by another process (or
  // by a busier chunk) does not hold the others up; results stay in chunk order.
  std::atomic<int64_t> next_chunk{0};
  const int64_t workers = std::min<int64_t>(chunks, at::get_num_threads());
  // The workers call ATen (the products) in this thread's dispatch state, below autograd.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard state(caller_state);
    ChunkFolder folder(p, how, hidden, bias, vocab_offset, final_rows);
    for (int64_t chunk; (chunk = next_chunk++) < chunks;)
      folder.fold_chunk(chunk * tiles / chunks, (chunk + 1) * tiles / chunks, results[chunk]);
  });

  Partials out;
  out.stats = at::empty({N, R, kRecordFloats}, f32);
  out.argmax = at::empty({N, R}, f32.dtype(at::kLong));
  out.values = at::empty({N, k}, f32);
  out.tokens = at::empty({N, k}, f32.dtype(at::kLong));
  out.premature = at::empty({N, k, R - 1}, f32);
  out.final_rows = final_rows;
  merge_stats(results, R, N, out);
  select_topk(results, k, R - 1, out);
  return out;
}

Selection combine_cpu(const Partials& in, int64_t k) {
  const int64_t S = in.stats.size(0), N = in.stats.size(1), R = in.stats.size(2);
  const int64_t L = R - 1, kk = in.values.size(2);
  const at::Tensor stats = in.stats.contiguous(), argmax = in.argmax.contiguous(),
                   values = in.values.contiguous(), tokens = in.tokens.contiguous(),
                   premature = in.premature.contiguous();
  const auto f32 = stats.options();
  Selection out{at::empty({N, k}, f32.dtype(at::kLong)), at::empty({N, k}, f32),
                at::empty({N, k}, f32), at::empty({N, 2}, f32)};
  at::parallel_for(0, N, 1, [&](int64_t n_begin, int64_t n_end) {
    std::vector<RowStats> row_stats(R);
    std::vector<int64_t> picks;  // candidate index s * kk + i, by rank
    std::vector<float> weights(L * k), layer_sum(L);
    for (int64_t n = n_begin; n < n_end; ++n) {
      for (int64_t r = 0; r < R; ++r) {  // shards merge in order
        RowStats merged = empty_stats<ScalarLanes>();
        for (int64_t s = 0; s < S; ++s) {
          const float* f = stats.data_ptr<float>() + ((s * N + n) * R + r) * kRecordFloats;
          const int64_t a = argmax.data_ptr<int64_t>()[(s * N + n) * R + r];
          merged = merge(merged, load_record(f, static_cast<int32_t>(a)));
        }
        row_stats[r] = merged;
      }
      // algorithm.md step 1: the global top-k is inside the union of the shards' top-ks.
      const auto slot = [&](int64_t c) { return (c / kk * N + n) * kk + c % kk; };
      const auto value = [&](int64_t c) { return values.data_ptr<float>()[slot(c)]; };
      const auto token = [&](int64_t c) { return tokens.data_ptr<int64_t>()[slot(c)]; };
      picks.clear();
      for (int64_t c = 0; c < S * kk; ++c)
        if (token(c) >= 0) picks.push_back(c);
      TORCH_CHECK_VALUE(static_cast<int64_t>(picks.size()) >= k, "sled.combine: the shards hold ",
                        picks.size(), " tokens for position ", n, ", fewer than k = ", k);
      std::partial_sort(picks.begin(), picks.begin() + k, picks.end(), [&](int64_t a, int64_t b) {
        return ranks_before(value(a), token(a), value(b), token(b));
      });
      float* out_values = out.values.data_ptr<float>() + n * k;
      int64_t* out_tokens = out.tokens.data_ptr<int64_t>() + n * k;
      for (int64_t i = 0; i < k; ++i) {
        out_values[i] = value(picks[i]);
        out_tokens[i] = token(picks[i]);
      }
      compute_contrast(
          row_stats.data(), R, out_values, out_tokens, k,
          [&](int64_t i, int64_t l) { return premature.data_ptr<float>()[slot(picks[i]) * L + l]; },
          weights, layer_sum, out.delta.data_ptr<float>() + n * k);
      const RowStats& fin = row_stats[R - 1];
      out.softmax.data_ptr<float>()[n * 2] = fin.max;
      out.softmax.data_ptr<float>()[n * 2 + 1] = softmax_total(fin);
    }
  });
  return out;
}

Candidates evolve_cpu(const Problem& p, const Evolution& e, const at::Tensor& full) {
  const int64_t N = p.positions, V = p.vocab, k = p.k;
  // T > 1 needs the whole final row for the later softmaxes (algorithm.md step 5).
  const Partials parts = partials_cpu(p, 0, e.iterations > 1);
  const Selection sel = combine_cpu(
      {parts.stats.unsqueeze(0), parts.argmax.unsqueeze(0), parts.values.unsqueeze(0),
       parts.tokens.unsqueeze(0), parts.premature.unsqueeze(0), at::Tensor()},
      k);
  const RowKernels& kernels = row_kernels();
  at::Tensor values = sel.values.clone();
  at::parallel_for(0, N, 1, [&](int64_t n_begin, int64_t n_end) {
    for (int64_t n = n_begin; n < n_end; ++n) {
      float* x_k = values.data_ptr<float>() + n * k;
      const int64_t* tokens = sel.tokens.data_ptr<int64_t>() + n * k;
      evolve(kernels, x_k, tokens, sel.delta.data_ptr<float>() + n * k, k,
             sel.softmax.data_ptr<float>()[n * 2], sel.softmax.data_ptr<float>()[n * 2 + 1],
             e.iterations > 1 ? parts.final_rows.data_ptr<float>() + n * V : nullptr, V, e.rate,
             e.iterations);
      if (full.defined()) {
        float* row = full.data_ptr<float>() + n * V;
        for (int64_t i = 0; i < k; ++i) row[tokens[i]] = x_k[i];
      }
    }
  });
  return {values, sel.tokens};
}

}  // namespace sled
