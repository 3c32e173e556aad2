// CPU backend: one pass over the vocab in tiles, chunks of tiles in parallel.
//
// Per tile: a BLAS call gives the logits of all R*N rows for the tile's tokens (or they are copied
// from the logits input), every row is folded into its streaming statistics (sled_math.h) and each
// position's best final-row tokens are kept with the premature rows' logits there. Chunks are
// merged in a fixed order, so results do not depend on thread scheduling. [R, N, V] never exists;
// W is read once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "../sled_math.h"
#include "../sled_problem.h"

namespace sled {
namespace {

using Vec = at::vec::Vectorized<float>;

// ScalarLanes' SIMD twin, so push() folds a vector of tokens at once. Tokens are tile-local and
// carried as floats (a tile is far below 2^24 tokens).
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
  static Vec exp_neg_abs(const Vec& x) { return x.abs().neg().exp(); }
};

// Folds tokens [0, count) of row z (d = z - final) into `stats`; token0 is the first one's id.
void fold_row(RowStats& stats, const float* z, const float* final_row, int64_t count,
              int32_t token0) {
  constexpr int64_t width = Vec::size();
  RowStatsT<VecLanes> lanes = empty_stats<VecLanes>();
  Vec token = Vec::arange(0.f, 1.f);
  int64_t j = 0;
  for (; j + width <= count; j += width, token = token + Vec(static_cast<float>(width))) {
    const Vec zv = Vec::loadu(z + j);
    push(lanes, zv, zv - Vec::loadu(final_row + j), token);
  }
  float field[7][width];
  lanes.max.store(field[0]);
  lanes.argmax.store(field[1]);
  lanes.d_at_max.store(field[2]);
  lanes.rest_sum.store(field[3]);
  lanes.rest_sq.store(field[4]);
  lanes.rest_dot.store(field[5]);
  lanes.d_sq.store(field[6]);
  for (int64_t lane = 0; lane < width; ++lane) {
    if (field[1][lane] < 0) continue;
    const RowStats s{field[0][lane], token0 + static_cast<int32_t>(field[1][lane]),
                     field[2][lane], field[3][lane], field[4][lane], field[5][lane],
                     field[6][lane]};
    stats = merge(stats, s);
  }
  for (; j < count; ++j) {
    RowStats s = empty_stats<ScalarLanes>();
    push(s, z[j], z[j] - final_row[j], token0 + static_cast<int32_t>(j));
    stats = merge(stats, s);
  }
}

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

  // Offers tokens [0, count) of the tile; premature row r's logit of token j is at
  // premature[r * row_stride + j].
  void offer(const float* final_row, const float* premature, int64_t row_stride, int64_t count,
             int32_t token0) {
    for (int64_t j = 0; j < count; ++j) {
      const float v = final_row[j];
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
      for (int64_t r = 0; r < premature_rows_; ++r) dst[r] = premature[r * row_stride + j];
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

void postprocess(float* z, int64_t count, const float* bias, float scale, float softcap) {
  const bool scaled = scale != 1.f;
  if (bias == nullptr && !scaled && softcap == 0.f) return;
  int64_t j = 0;
  constexpr int64_t width = Vec::size();
  for (; j < count; j += width) {
    const int64_t n = std::min<int64_t>(width, count - j);
    Vec x = Vec::loadu(z + j, n);
    if (bias != nullptr) x = x + Vec::loadu(bias + j, n);
    if (scaled) x = x * Vec(scale);
    if (softcap != 0.f) x = (x / Vec(softcap)).tanh() * Vec(softcap);
    x.store(z + j, n);
  }
}

// Columns per tile: enough for BLAS to run at speed, small enough that the [R*N, tile] logits stay
// in cache and the weight panel does too (4 MiB read in place; a converted copy is a buffer per
// thread, so 1 MiB).
int64_t tile_columns(int64_t rows, int64_t hidden, bool converts_weight) {
  const int64_t by_logits = (64 * 1024) / std::max<int64_t>(rows, 1);
  const int64_t panel = converts_weight ? 256 * 1024 : 1024 * 1024;
  const int64_t by_weight = hidden > 0 ? panel / hidden : 4096;
  const int64_t cols = std::min(by_logits, by_weight) / 16 * 16;
  return std::clamp<int64_t>(cols, 16, 4096);
}

// Softmax of x: its maximum and sum over j of exp(x_j - max).
std::pair<float, float> softmax_stats(const float* x, int64_t count) {
  const float max = at::vec::reduce_all<float>(
      [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, x, count);
  const float total = at::vec::map_reduce_all<float>(
      [max](const Vec& a) { return (a - Vec(max)).exp(); },
      [](const Vec& a, const Vec& b) { return a + b; }, x, count);
  return {max, total};
}

}  // namespace

Candidates evolve_cpu(const Problem& p) {
  const int64_t R = p.num_rows, N = p.positions, V = p.vocab, M = R * N, L = R - 1;
  const auto f32 = p.rows.options().dtype(at::kFloat);
  const bool projects = p.projects();
  const int64_t H = projects ? p.weight.size(1) : 0;
  const at::Tensor hidden = projects ? p.rows.reshape({M, H}).to(at::kFloat).contiguous()
                                     : at::Tensor();
  const at::Tensor bias =
      p.bias.defined() ? p.bias.to(at::kFloat).contiguous() : at::Tensor();
  // BLAS reads fp32 weights in place; other dtypes or strides are converted one tile at a time.
  const bool weight_in_place =
      projects && p.weight.scalar_type() == at::kFloat && p.weight.stride(1) == 1;
  const float scale = static_cast<float>(p.logit_scale);
  const float softcap = static_cast<float>(p.softcap);
  // T > 1 needs the whole final row for the later softmaxes (SPEC step 5).
  at::Tensor final_rows = p.iterations > 1 ? at::empty({N, V}, f32) : at::Tensor();

  const int64_t tile = tile_columns(M, H, projects && !weight_in_place);
  const int64_t tiles = (V + tile - 1) / tile;
  const int64_t chunks = std::min<int64_t>(tiles, std::max<int64_t>(16, at::get_num_threads()));
  std::vector<ChunkResult> results(chunks);

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    at::Tensor logits = at::empty({M * tile}, f32);
    at::Tensor weight_tile =
        projects && !weight_in_place ? at::empty({tile * H}, f32) : at::Tensor();
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      ChunkResult& result = results[chunk];
      result.stats.assign(M, empty_stats<ScalarLanes>());
      const int64_t first_tile = chunk * tiles / chunks, last_tile = (chunk + 1) * tiles / chunks;
      const int64_t chunk_tokens =
          std::min(V, last_tile * tile) - first_tile * tile;
      result.heaps.clear();
      for (int64_t n = 0; n < N; ++n) result.heaps.emplace_back(std::min(p.k, chunk_tokens), L);

      for (int64_t t = first_tile; t < last_tile; ++t) {
        const int64_t v0 = t * tile, cols = std::min(tile, V - v0);
        at::Tensor out = logits.narrow(0, 0, M * cols).view({M, cols});
        if (projects) {
          at::Tensor w = p.weight.narrow(0, v0, cols);
          if (!weight_in_place) w = weight_tile.narrow(0, 0, cols * H).view({cols, H}).copy_(w);
          at::mm_out(out, hidden, w.t());
        } else {
          out.view({R, N, cols}).copy_(p.rows.narrow(2, v0, cols));
        }
        float* z = out.data_ptr<float>();
        const float* tile_bias = bias.defined() ? bias.data_ptr<float>() + v0 : nullptr;
        for (int64_t m = 0; m < M; ++m) postprocess(z + m * cols, cols, tile_bias, scale, softcap);

        const int32_t token0 = static_cast<int32_t>(v0);
        for (int64_t n = 0; n < N; ++n) {
          const float* final_row = z + ((R - 1) * N + n) * cols;
          for (int64_t r = 0; r < R; ++r)
            fold_row(result.stats[r * N + n], z + (r * N + n) * cols, final_row, cols, token0);
          result.heaps[n].offer(final_row, z + n * cols, N * cols, cols, token0);
          if (final_rows.defined())
            std::copy(final_row, final_row + cols, final_rows.data_ptr<float>() + n * V + v0);
        }
      }
    }
  });

  std::vector<RowStats> stats(M, empty_stats<ScalarLanes>());
  for (const ChunkResult& result : results)
    for (int64_t m = 0; m < M; ++m) stats[m] = merge(stats[m], result.stats[m]);

  const int64_t k = p.k;
  at::Tensor values = at::empty({N, k}, f32);
  at::Tensor tokens = at::empty({N, k}, p.rows.options().dtype(at::kLong));
  at::parallel_for(0, N, 1, [&](int64_t n_begin, int64_t n_end) {
    struct Pick {
      CandidateHeap::Entry entry;
      const CandidateHeap* heap;
    };
    std::vector<Pick> picks;
    std::vector<float> final_k(k), carried(k * L), weights(L * k), layer_sum(L), delta(k);
    for (int64_t n = n_begin; n < n_end; ++n) {
      // SPEC step 1: the global top-k is inside the union of the chunks' top-ks.
      picks.clear();
      for (const ChunkResult& result : results)
        for (const auto& e : result.heaps[n].entries()) picks.push_back({e, &result.heaps[n]});
      const auto better = [](const Pick& a, const Pick& b) {
        return CandidateHeap::worse_last(a.entry, b.entry);
      };
      std::partial_sort(picks.begin(), picks.begin() + k, picks.end(), better);
      for (int64_t i = 0; i < k; ++i) {
        final_k[i] = picks[i].entry.value;
        std::copy_n(picks[i].heap->carried(picks[i].entry.slot), L, carried.data() + i * L);
      }

      // SPEC steps 2-4.
      float total = 0.f;
      for (int64_t l = 0; l < L; ++l) {
        const RowStats& s = stats[l * N + n];
        float sum = 0.f;
        for (int64_t i = 0; i < k; ++i) {
          const float z = carried[i * L + l];
          const float w = contrast_weight(s, z, z - final_k[i], picks[i].entry.token);
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

      // SPEC step 5. Iterations before the last move the whole final row; the last one only K.
      const RowStats& fin = stats[(R - 1) * N + n];
      float max = fin.max, softmax_sum = softmax_total(fin);
      float* row = final_rows.defined() ? final_rows.data_ptr<float>() + n * V : nullptr;
      for (int64_t t = 0; t < p.iterations; ++t) {
        if (t > 0) std::tie(max, softmax_sum) = softmax_stats(row, V);
        const float eta = step_size(p.rate, t, p.iterations);
        for (int64_t i = 0; i < k; ++i) {
          const float x = row ? row[picks[i].entry.token] : final_k[i];
          final_k[i] = evolve_step(x, std::exp(x - max) / softmax_sum, delta[i], eta);
        }
        if (t + 1 == p.iterations) break;
        const Vec m(max), sum(softmax_sum), step(eta);
        at::vec::map([=](Vec x) { return x - step * ((x - m).exp() / sum); }, row, row, V);
        for (int64_t i = 0; i < k; ++i) row[picks[i].entry.token] = final_k[i];
      }

      float* out_values = values.data_ptr<float>() + n * k;
      int64_t* out_tokens = tokens.data_ptr<int64_t>() + n * k;
      for (int64_t i = 0; i < k; ++i) {
        out_values[i] = final_k[i];
        out_tokens[i] = picks[i].entry.token;
      }
      if (p.full.defined()) {
        float* full = p.full.data_ptr<float>() + n * V;
        for (int64_t i = 0; i < k; ++i) full[out_tokens[i]] = final_k[i];
      }
    }
  });
  return {values, tokens};
}

}  // namespace sled
