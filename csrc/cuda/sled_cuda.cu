// CUDA backend: one kernel launch per call (plus a memset of its counters). A grid of (vocab slices) x (position groups) blocks; each block
// walks its vocab slice in tiles of 64 tokens, projects all stacked rows of its positions onto the
// tile (tensor cores for bf16/fp16, FMA for fp32), folds every row into streaming statistics
// (sled_math.h) and keeps each position's best final-row tokens with the premature logits there.
// The last block of a position group to finish merges the slices and runs algorithm.md steps
// 1-6 on k values per position. W is read once per position group; [R, N, V] never exists.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "../sled_math.h"
#include "../sled_problem.h"

namespace sled {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;            // tokens per tile
constexpr int kMaxRows = kCudaMaxRows;  // stacked rows (positions x R) projected together
constexpr int kPositionsPerGroup = 32;
constexpr int kTileLd = kTile + 4;   // float row stride of the logits tile (WMMA wants a multiple of 4)
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T zero_of();
template <> __device__ __forceinline__ __half zero_of<__half>() { return __float2half(0.f); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() {
  return __float2bfloat16(0.f);
}

// What the finishing block does after merging the slices: the whole op (one launch), a shard's
// phase 1 (sled.partials: merged statistics and the shard's top-k), or phase 2 over the shards'
// partials (sled.combine: steps 1-4, the slices being shards).
enum class Mode { kEvolve, kPartials, kCombine };

struct Params {
  const void* rows;    // hidden [R, N, H] or logits [R, N, V], contiguous
  const void* weight;  // [V, H], unit stride along H, or null for the logits form
  int64_t weight_stride;
  const void* bias;    // [V] or null
  int64_t R, N, H, V, k, L, iterations;
  double rate;
  float scale, softcap;
  int64_t tokens_per_block, cap;  // cap: candidates kept per (vocab block, position)
  int64_t slices;       // what the finisher merges: the vocab blocks of this launch, or shards
  int64_t token_offset; // global id of this vocab's first token (a shard's vocab_offset)
  int64_t select;       // candidates to select per position: k, or min(k, V) for a shard
  // Workspace written by every block ([vocab block][position] ...).
  RowStats* stats;            // [blocks][N * R], position-major: n * R + r
  float* cand_value;          // [blocks][N][cap]  final logit
  int32_t* cand_token;        // [blocks][N][cap]
  float* cand_carried;        // [blocks][N][cap][L] premature logits at that token
  int32_t* cand_count;        // [blocks][N]
  uint64_t* block_worst;      // [blocks][N] rank key of a full block's worst candidate, else 0
  float* final_rows;          // [N][V] the final logits, only when iterations > 1
  unsigned int* done;         // [groups] blocks finished, zeroed by the host
  // Workspace of the finishing block of each group.
  uint64_t* survivor_key;     // [groups][blocks * cap]
  int32_t* survivor_src;      // [groups][blocks * cap]
  int32_t* pick_src;          // [groups][k]
  float* delta;               // [groups][k]
  float* evolved;             // [groups][k]
  // Outputs.
  float* out_values;          // [N][k]: evolved values; final logits (partials, combine)
  int64_t* out_tokens;        // [N][k]
  float* full;                // [N][V] or null
  float* out_stats;           // partials: [N][R][kRecordFloats] (store_record)
  int64_t* out_argmax;        // partials: [N][R]
  float* out_premature;       // partials: [N][k][L]
  float* out_delta;           // combine: [N][k]
  float* out_softmax;         // combine: [N][2]
};

// Rank key of a candidate: larger ranks first; ties in value go to the lower token. Never 0.
__device__ __forceinline__ uint64_t rank_key(float value, int32_t token) {
  return (static_cast<uint64_t>(order_key(value)) << 32) |
         static_cast<uint32_t>(0xffffffffu - static_cast<uint32_t>(token));
}

__device__ __forceinline__ float postprocess(float z, const Params& p) {
  z *= p.scale;
  return p.softcap != 0.f ? p.softcap * tanhf(z / p.softcap) : z;
}

__device__ RowStats shfl_xor_stats(const RowStats& s, int offset) {
  return {__shfl_xor_sync(kFullMask, s.max, offset), __shfl_xor_sync(kFullMask, s.argmax, offset),
          __shfl_xor_sync(kFullMask, s.d_at_max, offset),
          __shfl_xor_sync(kFullMask, s.rest_sum, offset),
          __shfl_xor_sync(kFullMask, s.rest_sq, offset),
          __shfl_xor_sync(kFullMask, s.rest_dot, offset),
          __shfl_xor_sync(kFullMask, s.d_sq, offset),
          __shfl_xor_sync(kFullMask, s.z_min, offset),
          __shfl_xor_sync(kFullMask, s.d_min, offset),
          __shfl_xor_sync(kFullMask, s.d_max, offset)};
}

// Every lane ends with the merge of all lanes' statistics (merge is symmetric, so lanes agree).
__device__ RowStats warp_merge(RowStats s) {
  for (int offset = 16; offset > 0; offset >>= 1) s = merge(s, shfl_xor_stats(s, offset));
  return s;
}

__device__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// Deterministic block reductions (fixed tree); every thread gets the result.
template <typename Op>
__device__ float block_reduce(float x, Op op, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) x = op(x, __shfl_xor_sync(kFullMask, x, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float total = scratch[0];
  for (int w = 1; w < kWarps; ++w) total = op(total, scratch[w]);
  return total;
}

// Exclusive prefix sum of a 0/1 flag over the block; *total gets the block's sum.
__device__ int block_exclusive_scan(int flag, int* scratch, int* total) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int inclusive = flag;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += scratch[w];
    sum += scratch[w];
  }
  *total = sum;
  return before + inclusive - flag;
}

// ---------------------------------------------------------------------------------------------
// Projection of a tile: rows [0, rows) of the chunk times tokens [v0, v0 + cols), into
// s.logits[j][t] as float. Chunk row j is row row_index[j] of the [R * N, H] (or [R * N, V]) input.

union SharedTile {
  float logits[kMaxRows][kTileLd];
  struct {
    __half a[kMaxRows][64 + 8];  // hidden chunk; +8 keeps WMMA's 32-byte alignment and spreads banks
    __half b[kTile][64 + 8];     // weight chunk, [token][h]
  } mma;
  struct {
    float a[kMaxRows][33];
    float b[kTile][33];
  } fma;
};

template <typename T>
__device__ void project_fma(const Params& p, SharedTile& s, const int64_t* row_index, int rows,
                            int64_t v0, int cols) {
  const T* hidden = static_cast<const T*>(p.rows);
  const T* weight = static_cast<const T*>(p.weight);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // tokens tx + 16 c, rows 8 ty + r
  float acc[8][4] = {};
  for (int64_t h0 = 0; h0 < p.H; h0 += 32) {
    for (int i = threadIdx.x; i < kMaxRows * 32; i += kThreads) {
      const int j = i / 32, h = i % 32;
      s.fma.a[j][h] = (j < rows && h0 + h < p.H)
                          ? to_float(hidden[row_index[j] * p.H + h0 + h]) : 0.f;
    }
    for (int i = threadIdx.x; i < kTile * 32; i += kThreads) {
      const int t = i / 32, h = i % 32;
      s.fma.b[t][h] = (t < cols && h0 + h < p.H)
                          ? to_float(weight[(v0 + t) * p.weight_stride + h0 + h]) : 0.f;
    }
    __syncthreads();
    if (8 * ty < rows) {
      for (int h = 0; h < 32; ++h) {
        float b[4];
        for (int c = 0; c < 4; ++c) b[c] = s.fma.b[tx + 16 * c][h];
        for (int r = 0; r < 8; ++r) {
          const float a = s.fma.a[8 * ty + r][h];
          for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(a, b[c], acc[r][c]);
        }
      }
    }
    __syncthreads();
  }
  for (int r = 0; r < 8; ++r)
    for (int c = 0; c < 4; ++c) s.logits[8 * ty + r][tx + 16 * c] = acc[r][c];
}

// bf16/fp16: WMMA 16x16x16 tiles with float accumulation. Each warp owns up to four of the
// (rows / 16) x 4 output fragments.
template <typename T>
__device__ void project_mma(const Params& p, SharedTile& s, const int64_t* row_index, int rows,
                            int64_t v0, int cols) {
  using namespace nvcuda;
  const T* hidden = static_cast<const T*>(p.rows);
  const T* weight = static_cast<const T*>(p.weight);
  T(*a)[72] = reinterpret_cast<T(*)[72]>(s.mma.a);
  T(*b)[72] = reinterpret_cast<T(*)[72]>(s.mma.b);
  const int row_blocks = (rows + 15) / 16, fragments = row_blocks * (kTile / 16);
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
  for (int f = 0; f < 4; ++f) wmma::fill_fragment(acc[f], 0.f);
  const T zero = zero_of<T>();
  for (int64_t h0 = 0; h0 < p.H; h0 += 64) {
    for (int i = threadIdx.x; i < row_blocks * 16 * 64; i += kThreads) {
      const int j = i / 64, h = i % 64;
      a[j][h] = (j < rows && h0 + h < p.H) ? hidden[row_index[j] * p.H + h0 + h] : zero;
    }
    for (int i = threadIdx.x; i < kTile * 64; i += kThreads) {
      const int t = i / 64, h = i % 64;
      b[t][h] = (t < cols && h0 + h < p.H) ? weight[(v0 + t) * p.weight_stride + h0 + h] : zero;
    }
    __syncthreads();
    for (int kk = 0; kk < 64; kk += 16) {
      for (int f = 0; f < 4; ++f) {
        const int fragment = warp + kWarps * f;
        if (fragment >= fragments) break;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fa, &a[(fragment / 4) * 16][kk], 72);
        wmma::load_matrix_sync(fb, &b[(fragment % 4) * 16][kk], 72);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
    __syncthreads();
  }
  for (int f = 0; f < 4; ++f) {
    const int fragment = warp + kWarps * f;
    if (fragment >= fragments) break;
    wmma::store_matrix_sync(&s.logits[(fragment / 4) * 16][(fragment % 4) * 16], acc[f], kTileLd,
                            wmma::mem_row_major);
  }
}

// Fills s.logits[j][t] with the post-processed logits of chunk row j at token v0 + t.
template <typename T, bool kProjects>
__device__ void load_logits(const Params& p, SharedTile& s, const int64_t* row_index, int rows,
                            int64_t v0, int cols) {
  if constexpr (kProjects) {
    if constexpr (std::is_same_v<T, float>) {
      project_fma<T>(p, s, row_index, rows, v0, cols);
    } else {
      project_mma<T>(p, s, row_index, rows, v0, cols);
    }
    __syncthreads();
    const T* bias = static_cast<const T*>(p.bias);
    for (int i = threadIdx.x; i < rows * kTile; i += kThreads) {
      const int j = i / kTile, t = i % kTile;
      if (t >= cols) continue;
      const float z = s.logits[j][t] + (bias ? to_float(bias[v0 + t]) : 0.f);
      s.logits[j][t] = postprocess(z, p);
    }
  } else {
    const T* logits = static_cast<const T*>(p.rows);
    for (int i = threadIdx.x; i < rows * kTile; i += kThreads) {
      const int j = i / kTile, t = i % kTile;
      if (t < cols) s.logits[j][t] = postprocess(to_float(logits[row_index[j] * p.V + v0 + t]), p);
    }
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Candidate lists: the `cap` best final-row tokens of (block, position), unordered.

struct Worst {
  uint64_t key;
  int slot;
};

// The entry that ranks last among slots [0, count); the whole warp calls it and gets the answer.
__device__ Worst warp_worst(const float* value, const int32_t* token, int count) {
  Worst w{~0ull, -1};
  for (int slot = threadIdx.x % 32; slot < count; slot += 32) {
    const uint64_t key = rank_key(value[slot], token[slot]);
    if (key < w.key) w = {key, slot};
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const uint64_t key = __shfl_xor_sync(kFullMask, w.key, offset);
    const int slot = __shfl_xor_sync(kFullMask, w.slot, offset);
    if (key < w.key) w = {key, slot};
  }
  return w;
}

// One warp offers the tile's tokens of one position to its list.
__device__ void offer_tile(const Params& p, const SharedTile& s, int64_t block_position,
                           int first_row, int64_t v0, int cols) {
  const int lane = threadIdx.x % 32;
  float* value = p.cand_value + block_position * p.cap;
  int32_t* token = p.cand_token + block_position * p.cap;
  float* carried = p.cand_carried + block_position * p.cap * p.L;
  int count = p.cand_count[block_position];
  Worst worst = count == p.cap ? warp_worst(value, token, count) : Worst{0, -1};
  const int final_row = first_row + static_cast<int>(p.R) - 1;
  for (int t0 = 0; t0 < cols; t0 += 32) {
    const int t = t0 + lane;
    const float v = t < cols ? s.logits[final_row][t] : 0.f;
    const int32_t tok = static_cast<int32_t>(p.token_offset + v0 + t);
    const bool wanted = t < cols && (count < p.cap || rank_key(v, tok) > worst.key);
    unsigned pending = __ballot_sync(kFullMask, wanted);
    while (pending) {
      const int src = __ffs(pending) - 1;
      pending &= pending - 1;
      const float cv = __shfl_sync(kFullMask, v, src);
      const int32_t ct = __shfl_sync(kFullMask, tok, src);
      int slot;
      if (count < p.cap) {
        slot = count++;
      } else {
        if (rank_key(cv, ct) <= worst.key) continue;
        slot = worst.slot;
      }
      if (lane == 0) {
        value[slot] = cv;
        token[slot] = ct;
      }
      for (int64_t r = lane; r < p.L; r += 32)
        carried[slot * p.L + r] = s.logits[first_row + r][t0 + src];
      __syncwarp();
      if (count == p.cap) worst = warp_worst(value, token, count);
    }
  }
  if (lane == 0) p.cand_count[block_position] = count;
}

// Folds a tile of logits (chunk_positions positions from n0, all R rows of each) into this
// block's row statistics and candidate lists, and keeps the final rows when asked (T > 1).
__device__ __forceinline__ void fold_tile(const Params& p, const SharedTile& tile, int64_t block,
                                          int64_t n0, int chunk_positions, int64_t v0, int cols) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rows = chunk_positions * static_cast<int>(p.R);
  for (int j = warp; j < rows; j += kWarps) {  // one warp per row
    const int final_row = (j / p.R) * p.R + p.R - 1;
    RowStats s = empty_stats<ScalarLanes>();
    for (int t = lane; t < cols; t += 32) {
      const float z = tile.logits[j][t];
      push(s, z, z - tile.logits[final_row][t], static_cast<int32_t>(p.token_offset + v0 + t));
    }
    s = warp_merge(s);
    if (lane == 0) {
      RowStats& acc = p.stats[(block * p.N + n0 + j / p.R) * p.R + j % p.R];
      acc = merge(acc, s);
    }
  }
  for (int c = warp; c < chunk_positions; c += kWarps) {  // one warp per position
    offer_tile(p, tile, block * p.N + n0 + c, c * static_cast<int>(p.R), v0, cols);
    if (p.final_rows)
      for (int t = lane; t < cols; t += 32)
        p.final_rows[(n0 + c) * p.V + v0 + t] = tile.logits[c * p.R + p.R - 1][t];
  }
}

// ---------------------------------------------------------------------------------------------
// The finishing block: algorithm.md steps 1-6 for every position of its group. It reads what
// other blocks wrote through L2 (__ldcg): L1 is not coherent across blocks.

__device__ __forceinline__ RowStats load_stats(const RowStats* s) {
  return {__ldcg(&s->max), __ldcg(&s->argmax), __ldcg(&s->d_at_max), __ldcg(&s->rest_sum),
          __ldcg(&s->rest_sq), __ldcg(&s->rest_dot), __ldcg(&s->d_sq), __ldcg(&s->z_min),
          __ldcg(&s->d_min), __ldcg(&s->d_max)};
}

struct FinishShared {
  RowStats stats[kMaxRows];
  uint64_t warp_bound[kWarps];
  float layer_sum[kMaxRows];
  float reduce[kWarps];
  int scan[kWarps];
  unsigned int histogram[256];
  uint64_t prefix, mask;
  int64_t remaining;
  float total;
};

// Row statistics of the whole vocab: the slices' statistics of every row of position n merged
// into f.stats; a shard's phase 1 also hands them over as its partials record.
template <Mode mode>
__device__ __forceinline__ void merge_stats(const Params& p, FinishShared& f, int64_t n) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t blocks = p.slices;
  for (int64_t r = warp; r < p.R; r += kWarps) {
    RowStats s = empty_stats<ScalarLanes>();
    for (int64_t b = lane; b < blocks; b += 32)
      s = merge(s, load_stats(&p.stats[(b * p.N + n) * p.R + r]));
    s = warp_merge(s);
    if (lane == 0) {
      f.stats[r] = s;
      if constexpr (mode == Mode::kPartials) {
        store_record(s, p.out_stats + (n * p.R + r) * kRecordFloats);
        p.out_argmax[n * p.R + r] = s.argmax;
      }
    }
  }
}

// algorithm.md step 1: the top-k is inside the union of the blocks' lists. A full block's worst
// entry bounds the k-th best from below, so only candidates ranking at or above the best such
// bound survive; then a radix select over the survivors' rank keys finds the k-th key exactly.
// Leaves the picked candidates' workspace indices in pick_src (unordered); returns how many.
__device__ __forceinline__ int64_t select_topk(const Params& p, FinishShared& f, int64_t group,
                                               int64_t n) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t blocks = p.slices, slots = blocks * p.cap;
  uint64_t bound = 0;
  for (int64_t b = threadIdx.x; b < blocks; b += kThreads)
    bound = std::max(bound, __ldcg(&p.block_worst[b * p.N + n]));
  for (int offset = 16; offset > 0; offset >>= 1)
    bound = std::max(bound, __shfl_xor_sync(kFullMask, bound, offset));
  if (lane == 0) f.warp_bound[warp] = bound;
  __syncthreads();
  for (int w = 0; w < kWarps; ++w) bound = std::max(bound, f.warp_bound[w]);

  uint64_t* key = p.survivor_key + group * slots;
  int32_t* src = p.survivor_src + group * slots;
  int survivors = 0;
  for (int64_t base = 0; base < slots; base += kThreads) {
    const int64_t c = base + threadIdx.x;
    const int64_t b = c / p.cap, slot = c % p.cap;
    const int64_t flat = (b * p.N + n) * p.cap + slot;
    uint64_t ck = 0;
    if (c < slots && slot < __ldcg(&p.cand_count[b * p.N + n]))
      ck = rank_key(__ldcg(&p.cand_value[flat]), __ldcg(&p.cand_token[flat]));
    const int keep = ck != 0 && ck >= bound;
    int added;
    const int at = survivors + block_exclusive_scan(keep, f.scan, &added);
    if (keep) {
      key[at] = ck;
      src[at] = static_cast<int32_t>(flat);
    }
    survivors += added;
  }
  __syncthreads();

  // Shards holding fewer than k tokens in all (sled.combine misused) select what there is; the
  // rest of the outputs say so (token -1, NaN) rather than read past the survivors.
  const int64_t k = std::min<int64_t>(p.select, survivors);
  if (threadIdx.x == 0) {
    f.prefix = 0;
    f.mask = 0;
    f.remaining = k;
  }
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) f.histogram[i] = 0;
    __syncthreads();
    const uint64_t prefix = f.prefix, mask = f.mask;
    for (int i = threadIdx.x; i < survivors; i += kThreads)
      if ((key[i] & mask) == prefix) atomicAdd(&f.histogram[(key[i] >> shift) & 0xff], 1u);
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t above = 0;
      int digit = 255;
      for (; digit > 0 && above + f.histogram[digit] < f.remaining; --digit)
        above += f.histogram[digit];
      f.prefix |= static_cast<uint64_t>(digit) << shift;
      f.mask |= 0xffull << shift;
      f.remaining -= above;
    }
    __syncthreads();
  }
  const uint64_t kth = f.prefix;  // keys are distinct: exactly k survivors have key >= kth
  int32_t* pick = p.pick_src + group * p.k;
  int picked = 0;
  for (int base = 0; base < survivors; base += kThreads) {
    const int i = base + threadIdx.x;
    const int keep = i < survivors && key[i] >= kth;
    int added;
    const int at = picked + block_exclusive_scan(keep, f.scan, &added);
    if (keep) pick[at] = src[i];
    picked += added;
  }
  __syncthreads();
  return k;
}

// A shard's phase 1 output: its top-k, padded to k with token -1.
__device__ __forceinline__ void write_partials(const Params& p, int64_t group, int64_t n,
                                              int64_t k) {
  const int32_t* pick = p.pick_src + group * p.k;
  const int64_t L = p.L;
  for (int64_t i = threadIdx.x; i < p.k; i += kThreads) {
    const bool real = i < k;
    const int64_t c = real ? pick[i] : 0;
    p.out_values[n * p.k + i] = real ? __ldcg(&p.cand_value[c]) : 0.f;
    p.out_tokens[n * p.k + i] = real ? __ldcg(&p.cand_token[c]) : -1;
    for (int64_t l = 0; l < L; ++l)
      p.out_premature[(n * p.k + i) * L + l] = real ? __ldcg(&p.cand_carried[c * L + l]) : 0.f;
  }
  __syncthreads();
}

// algorithm.md steps 2-4: the latent direction delta of the k picked candidates. Weights are
// recomputed where needed, not stored ([L, k] can be large).
__device__ __forceinline__ void compute_contrast(const Params& p, FinishShared& f,
                                                 int64_t group, int64_t k) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t* pick = p.pick_src + group * p.k;
  const int64_t L = p.L;
  const auto weight_of = [&](int64_t l, int64_t i) {
    const int64_t c = pick[i];
    const float z = __ldcg(&p.cand_carried[c * L + l]);
    return contrast_weight(f.stats[l], f.stats[p.R - 1], z, z - __ldcg(&p.cand_value[c]),
                           __ldcg(&p.cand_token[c]));
  };
  for (int64_t l = warp; l < L; l += kWarps) {
    float sum = 0.f;
    for (int64_t i = lane; i < k; i += 32) sum += weight_of(l, i);
    sum = warp_sum(sum);
    if (lane == 0) f.layer_sum[l] = sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int64_t l = 0; l < L; ++l) total += f.layer_sum[l];
    f.total = total;
  }
  __syncthreads();
  float* delta = p.delta + group * p.k;
  for (int64_t i = threadIdx.x; i < k; i += kThreads) {
    float d = 0.f;
    for (int64_t l = 0; l < L; ++l)
      d += layer_share(f.layer_sum[l], f.total) * normalized(weight_of(l, i), f.layer_sum[l]);
    delta[i] = -d;
  }
  __syncthreads();
}

// Phase 2's output (sled.combine): the candidates, their final logits and delta, and the final
// row's softmax statistics; token -1 and NaN where the shards held fewer than k tokens.
__device__ __forceinline__ void write_selection(const Params& p, const FinishShared& f,
                                               int64_t group, int64_t n, int64_t k) {
  const int32_t* pick = p.pick_src + group * p.k;
  const float* delta = p.delta + group * p.k;
  const RowStats& fin = f.stats[p.R - 1];
  const int64_t width = p.select;
  for (int64_t i = threadIdx.x; i < width; i += kThreads) {
    const bool real = i < k;
    const int64_t c = real ? pick[i] : 0;
    p.out_tokens[n * width + i] = real ? __ldcg(&p.cand_token[c]) : -1;
    p.out_values[n * width + i] = real ? __ldcg(&p.cand_value[c]) : NAN;
    p.out_delta[n * width + i] = real ? delta[i] : NAN;
  }
  if (threadIdx.x == 0) {
    p.out_softmax[n * 2] = fin.max;
    p.out_softmax[n * 2 + 1] = softmax_total(fin);
  }
  __syncthreads();
}

// algorithm.md steps 5-6: the evolution of the k candidates, written out (and into `full`).
// Iterations before the last move the whole final row, the last only K.
__device__ __forceinline__ void evolve(const Params& p, FinishShared& f, int64_t group, int64_t n,
                                       int64_t k) {
  const int32_t* pick = p.pick_src + group * p.k;
  const float* delta = p.delta + group * p.k;
  const RowStats& fin = f.stats[p.R - 1];
  float max = fin.max, total = softmax_total(fin);
  float* row = p.final_rows ? p.final_rows + n * p.V : nullptr;
  float* evolved = p.evolved + group * p.k;
  for (int64_t t = 0; t < p.iterations; ++t) {
    if (t > 0) {
      float m = -INFINITY;
      for (int64_t j = threadIdx.x; j < p.V; j += kThreads) m = fmaxf(m, __ldcg(&row[j]));
      max = block_reduce(m, [](float a, float b) { return fmaxf(a, b); }, f.reduce);
      float sum = 0.f;
      for (int64_t j = threadIdx.x; j < p.V; j += kThreads) sum += expf(__ldcg(&row[j]) - max);
      total = block_reduce(sum, [](float a, float b) { return a + b; }, f.reduce);
    }
    const float eta = step_size(p.rate, t, p.iterations);
    for (int64_t i = threadIdx.x; i < k; i += kThreads) {
      const int64_t c = pick[i];
      const int32_t tok = __ldcg(&p.cand_token[c]);
      const float x = row ? __ldcg(&row[tok]) : __ldcg(&p.cand_value[c]);
      evolved[i] = evolve_step(x, expf(x - max) / total, delta[i], eta);
    }
    if (t + 1 == p.iterations) break;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < p.V; j += kThreads) {
      const float x = __ldcg(&row[j]);
      row[j] = evolve_step(x, expf(x - max) / total, 0.f, eta);
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < k; i += kThreads)
      row[__ldcg(&p.cand_token[pick[i]])] = evolved[i];
    __syncthreads();
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < k; i += kThreads) {
    const int32_t tok = __ldcg(&p.cand_token[pick[i]]);
    p.out_values[n * k + i] = evolved[i];
    p.out_tokens[n * k + i] = tok;
    if (p.full) p.full[n * p.V + tok] = evolved[i];
  }
  __syncthreads();
}

// The finishing block's work for position n, step by step; the mode says where it stops.
template <Mode mode>
__device__ void finish_position(const Params& p, FinishShared& f, int64_t group, int64_t n) {
  merge_stats<mode>(p, f, n);
  const int64_t k = select_topk(p, f, group, n);
  if constexpr (mode == Mode::kPartials) {
    write_partials(p, group, n, k);
    return;
  }
  compute_contrast(p, f, group, k);
  if constexpr (mode == Mode::kCombine) {
    write_selection(p, f, group, n, k);
    return;
  }
  evolve(p, f, group, n, k);
}

// ---------------------------------------------------------------------------------------------

template <typename T, bool kProjects, Mode mode>
__global__ void __launch_bounds__(kThreads) sled_kernel(Params p) {
  __shared__ __align__(128) SharedTile tile;
  __shared__ int64_t row_index[kMaxRows];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t block = blockIdx.x, group = blockIdx.y;
  const int64_t first = group * kPositionsPerGroup;
  const int64_t positions = std::min<int64_t>(kPositionsPerGroup, p.N - first);
  const int64_t v_begin = block * p.tokens_per_block;
  const int64_t v_end = std::min(p.V, v_begin + p.tokens_per_block);

  for (int64_t i = threadIdx.x; i < positions * p.R; i += kThreads)
    p.stats[(block * p.N + first) * p.R + i] = empty_stats<ScalarLanes>();
  for (int64_t i = threadIdx.x; i < positions; i += kThreads)
    p.cand_count[block * p.N + first + i] = 0;
  __syncthreads();

  const int64_t per_chunk = kMaxRows / p.R;
  for (int64_t v0 = v_begin; v0 < v_end; v0 += kTile) {
    const int cols = static_cast<int>(std::min<int64_t>(kTile, v_end - v0));
    for (int64_t c0 = 0; c0 < positions; c0 += per_chunk) {
      const int64_t n0 = first + c0;
      const int chunk_positions = static_cast<int>(std::min<int64_t>(per_chunk, positions - c0));
      const int rows = chunk_positions * static_cast<int>(p.R);
      for (int j = threadIdx.x; j < rows; j += kThreads)  // chunk row j: position j / R, layer j % R
        row_index[j] = (j % p.R) * p.N + n0 + j / p.R;
      __syncthreads();
      load_logits<T, kProjects>(p, tile, row_index, rows, v0, cols);
      fold_tile(p, tile, block, n0, chunk_positions, v0, cols);
      __syncthreads();
    }
  }

  for (int64_t c = warp; c < positions; c += kWarps) {
    const int64_t bp = block * p.N + first + c;
    const int count = p.cand_count[bp];
    const Worst w = count == p.k ? warp_worst(p.cand_value + bp * p.cap,
                                              p.cand_token + bp * p.cap, count)
                                 : Worst{0, -1};
    if (lane == 0) p.block_worst[bp] = w.key;
  }

  // Last block of the group to finish does the rest.
  __threadfence();
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) {
    last = atomicAdd(&p.done[group], 1u) == gridDim.x - 1;
    if (last) __threadfence();  // acquire: order the reads below after every block's writes
  }
  __syncthreads();
  if (!last) return;
  __shared__ FinishShared finish;
  for (int64_t n = first; n < first + positions; ++n) finish_position<mode>(p, finish, group, n);
}

// Phase 2 alone: the slices are the shards whose partials the host laid out as blocks' workspace.
__global__ void __launch_bounds__(kThreads) combine_kernel(Params p) {
  __shared__ FinishShared finish;
  const int64_t group = blockIdx.x, first = group * kPositionsPerGroup;
  const int64_t last = std::min<int64_t>(p.N, first + kPositionsPerGroup);
  for (int64_t n = first; n < last; ++n) finish_position<Mode::kCombine>(p, finish, group, n);
}

template <typename T, Mode mode>
void launch(const Params& p, dim3 grid, cudaStream_t stream, bool projects) {
  if (projects)
    sled_kernel<T, true, mode><<<grid, kThreads, 0, stream>>>(p);
  else
    sled_kernel<T, false, mode><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
T* carve(at::Tensor& arena, int64_t& offset, int64_t count) {
  offset = (offset + 15) / 16 * 16;
  T* ptr = reinterpret_cast<T*>(arena.data_ptr<uint8_t>() + offset);
  offset += count * static_cast<int64_t>(sizeof(T));
  return ptr;
}

// The finisher's workspace for `groups` position groups over `slices` slices of `cap` candidates.
// `tensors` keeps the allocations alive until the launch is queued.
void carve_finisher(Params& p, int64_t groups, std::vector<at::Tensor>& tensors,
                    const at::TensorOptions& options) {
  const int64_t slots = p.slices * p.cap;
  at::Tensor arena =
      at::empty({16 * 8 + groups * (slots * 12 + p.k * 12)}, options.dtype(at::kByte));
  int64_t offset = 0;
  p.survivor_key = carve<uint64_t>(arena, offset, groups * slots);
  p.survivor_src = carve<int32_t>(arena, offset, groups * slots);
  p.pick_src = carve<int32_t>(arena, offset, groups * p.k);
  p.delta = carve<float>(arena, offset, groups * p.k);
  p.evolved = carve<float>(arena, offset, groups * p.k);
  TORCH_INTERNAL_ASSERT(offset <= arena.numel());
  tensors.push_back(arena);
}

// One launch of the fused kernel over `problem`'s vocab (the whole one, or a shard from
// `token_offset` on) with its workspace; the caller sets the mode's outputs, then calls run().
struct FusedLaunch {
  Params p{};
  dim3 grid;
  at::Tensor rows, weight, bias;
  std::vector<at::Tensor> keep;
  at::TensorOptions options;

  FusedLaunch(const Problem& problem, int64_t token_offset, bool keep_final) {
    TORCH_INTERNAL_ASSERT(problem.num_rows <= kMaxRows);
    rows = problem.rows.contiguous();
    options = rows.options();
    p.rows = rows.data_ptr();
    p.R = problem.num_rows;
    p.N = problem.positions;
    p.V = problem.vocab;
    p.k = problem.k;
    p.L = p.R - 1;
    p.iterations = 1;  // evolve_cuda sets the evolution; the other modes have none
    p.scale = static_cast<float>(problem.logit_scale);
    p.softcap = static_cast<float>(problem.softcap);
    p.token_offset = token_offset;
    p.select = std::min(p.k, p.V);
    if (problem.projects()) {
      weight = problem.weight.stride(1) == 1 ? problem.weight : problem.weight.contiguous();
      p.weight = weight.data_ptr();
      p.weight_stride = weight.stride(0);
      p.H = weight.size(1);
      if (problem.bias.defined()) {
        bias = problem.bias.contiguous();
        p.bias = bias.data_ptr();
      }
    }

    // Enough vocab blocks to fill the GPU about twice over; big batches add position groups.
    const int64_t groups = (p.N + kPositionsPerGroup - 1) / kPositionsPerGroup;
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                          problem.rows.device().index()));
    const int64_t tiles = std::max<int64_t>(1, (p.V + kTile - 1) / kTile);
    int64_t blocks = std::clamp<int64_t>((2 * int64_t{sms} + groups - 1) / groups, 1, tiles);
    p.tokens_per_block = (tiles + blocks - 1) / blocks * kTile;
    blocks = std::max<int64_t>(1, (p.V + p.tokens_per_block - 1) / p.tokens_per_block);
    p.slices = blocks;
    p.cap = std::min(p.k, p.tokens_per_block);
    const int64_t candidates = blocks * p.N * p.cap;
    TORCH_CHECK_VALUE(groups <= 65535 && candidates < std::numeric_limits<int32_t>::max(),
                      "sled on CUDA: too many positions x candidates (N = ", p.N, ", k = ", p.k,
                      ") for one call; split the batch");

    at::Tensor arena = at::empty({16 * 8 + blocks * p.N * p.R * int64_t{sizeof(RowStats)} +
                                      candidates * (8 + 4 * p.L) + blocks * p.N * 12},
                                 options.dtype(at::kByte));
    int64_t offset = 0;
    p.stats = carve<RowStats>(arena, offset, blocks * p.N * p.R);
    p.cand_value = carve<float>(arena, offset, candidates);
    p.cand_token = carve<int32_t>(arena, offset, candidates);
    p.cand_carried = carve<float>(arena, offset, candidates * p.L);
    p.cand_count = carve<int32_t>(arena, offset, blocks * p.N);
    p.block_worst = carve<uint64_t>(arena, offset, blocks * p.N);
    TORCH_INTERNAL_ASSERT(offset <= arena.numel());
    keep.push_back(arena);
    carve_finisher(p, groups, keep, options);
    at::Tensor done = at::zeros({groups}, options.dtype(at::kInt));
    p.done = reinterpret_cast<unsigned int*>(done.data_ptr<int>());
    keep.push_back(done);
    if (keep_final) {
      at::Tensor final_rows = at::empty({p.N, p.V}, options.dtype(at::kFloat));
      p.final_rows = final_rows.data_ptr<float>();
      keep.push_back(final_rows);
    }
    grid = dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(groups));
  }

  template <Mode mode>
  void run(bool projects) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    switch (rows.scalar_type()) {
      case at::kFloat: launch<float, mode>(p, grid, stream, projects); break;
      case at::kHalf: launch<__half, mode>(p, grid, stream, projects); break;
      case at::kBFloat16: launch<__nv_bfloat16, mode>(p, grid, stream, projects); break;
      default: TORCH_CHECK(false, "sled on CUDA: unexpected dtype ", rows.scalar_type());
    }
  }
};

}  // namespace

Candidates evolve_cuda(const Problem& problem, const Evolution& evolution, const at::Tensor& full) {
  const c10::cuda::CUDAGuard guard(problem.rows.device());
  FusedLaunch l(problem, /*token_offset=*/0, /*keep_final=*/evolution.iterations > 1);
  l.p.iterations = evolution.iterations;
  l.p.rate = evolution.rate;
  at::Tensor values = at::empty({l.p.N, l.p.k}, l.options.dtype(at::kFloat));
  at::Tensor tokens = at::empty({l.p.N, l.p.k}, l.options.dtype(at::kLong));
  l.p.out_values = values.data_ptr<float>();
  l.p.out_tokens = tokens.data_ptr<int64_t>();
  l.p.full = full.defined() ? full.data_ptr<float>() : nullptr;
  l.run<Mode::kEvolve>(problem.projects());
  return {values, tokens};
}

Partials partials_cuda(const Problem& problem, int64_t vocab_offset, bool keep_final) {
  const c10::cuda::CUDAGuard guard(problem.rows.device());
  FusedLaunch l(problem, vocab_offset, keep_final);
  const int64_t N = l.p.N, R = l.p.R, k = l.p.k;
  const auto f32 = l.options.dtype(at::kFloat), i64 = l.options.dtype(at::kLong);
  Partials out{at::empty({N, R, kRecordFloats}, f32), at::empty({N, R}, i64),
               at::empty({N, k}, f32), at::empty({N, k}, i64), at::empty({N, k, l.p.L}, f32),
               keep_final ? l.keep.back() : at::empty({N, 0}, f32)};
  l.p.out_stats = out.stats.data_ptr<float>();
  l.p.out_argmax = out.argmax.data_ptr<int64_t>();
  l.p.out_values = out.values.data_ptr<float>();
  l.p.out_tokens = out.tokens.data_ptr<int64_t>();
  l.p.out_premature = out.premature.data_ptr<float>();
  l.run<Mode::kPartials>(problem.projects());
  return out;
}

Selection combine_cuda(const Partials& in, int64_t k) {
  const c10::cuda::CUDAGuard guard(in.stats.device());
  const int64_t S = in.stats.size(0), N = in.stats.size(1), R = in.stats.size(2);
  TORCH_INTERNAL_ASSERT(R <= kMaxRows);
  const auto options = in.stats.options();
  // Lay the shards' partials out as the fused kernel's per-block workspace: RowStats records
  // (argmax as int32 bits spliced in where RowStats has it, sled_math.h), int32 tokens,
  // valid-candidate counts.
  const at::Tensor argmax_bits = in.argmax.to(at::kInt).view(at::kFloat).unsqueeze(-1);
  const at::Tensor stats =
      at::cat({in.stats.narrow(3, 0, kArgmaxAfter), argmax_bits,
               in.stats.narrow(3, kArgmaxAfter, kRecordFloats - kArgmaxAfter)},
              3)
          .contiguous();
  const at::Tensor values = in.values.contiguous(), premature = in.premature.contiguous();
  const at::Tensor tokens = in.tokens.to(at::kInt).contiguous();
  const at::Tensor counts = (in.tokens >= 0).sum(-1).to(at::kInt).contiguous();
  const at::Tensor no_bound = at::zeros({S, N}, options.dtype(at::kLong));

  Params p{};
  p.R = R;
  p.N = N;
  p.k = k;
  p.L = R - 1;
  p.select = k;
  p.slices = S;
  p.cap = in.values.size(2);
  p.stats = reinterpret_cast<RowStats*>(stats.data_ptr<float>());
  p.cand_value = values.data_ptr<float>();
  p.cand_token = tokens.data_ptr<int32_t>();
  p.cand_carried = premature.data_ptr<float>();
  p.cand_count = counts.data_ptr<int32_t>();
  p.block_worst = reinterpret_cast<uint64_t*>(no_bound.data_ptr<int64_t>());
  const int64_t groups = (N + kPositionsPerGroup - 1) / kPositionsPerGroup;
  std::vector<at::Tensor> keep;
  carve_finisher(p, groups, keep, options);
  Selection out{at::empty({N, k}, options.dtype(at::kLong)), at::empty({N, k}, options),
                at::empty({N, k}, options), at::empty({N, 2}, options)};
  p.out_tokens = out.tokens.data_ptr<int64_t>();
  p.out_values = out.values.data_ptr<float>();
  p.out_delta = out.delta.data_ptr<float>();
  p.out_softmax = out.softmax.data_ptr<float>();
  combine_kernel<<<static_cast<unsigned>(groups), kThreads, 0,
                   c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace sled
