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

// The [rows, tile] logits of a BLAS call should stay in cache (64K floats) and so should the weight
// panel (4 MiB read in place; a converted copy is a buffer per thread, so 1 MiB).
constexpr int64_t kLogitsBudget = 64 * 1024;
// Many positions are projected in groups, so that tiles stay wide: a narrow tile re-reads all the
// hidden rows for few tokens (at R * N = 2883 rows, 16-column tiles made the op twice the GEMM).
constexpr int64_t kMinGroupColumns = 512;

// Positions per group: all of them when their rows leave tiles wide enough, else as many as do.
int64_t group_positions(int64_t R, int64_t N) {
  return std::clamp<int64_t>(kLogitsBudget / (R * kMinGroupColumns), 1, std::max<int64_t>(N, 1));
}

// Columns per tile for `rows` rows per BLAS call.
int64_t tile_columns(int64_t rows, int64_t hidden, bool converts_weight) {
  const int64_t by_logits = kLogitsBudget / std::max<int64_t>(rows, 1);
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

Partials partials_cpu(const Problem& p, int64_t vocab_offset, bool keep_final) {
  const int64_t R = p.num_rows, N = p.positions, V = p.vocab, M = R * N, L = R - 1, k = p.k;
  const auto f32 = p.rows.options().dtype(at::kFloat);
  const bool projects = p.projects();
  const int64_t H = projects ? p.weight.size(1) : 0;
  // Position-major ([N, R] rows), so a group of positions is a block of consecutive rows.
  const at::Tensor hidden =
      projects ? p.rows.transpose(0, 1).reshape({M, H}).to(at::kFloat).contiguous()
               : at::Tensor();
  const at::Tensor bias =
      p.bias.defined() ? p.bias.to(at::kFloat).contiguous() : at::Tensor();
  // BLAS reads fp32 weights in place; other dtypes or strides are converted one tile at a time.
  const bool weight_in_place =
      projects && p.weight.scalar_type() == at::kFloat && p.weight.stride(1) == 1;
  const float scale = static_cast<float>(p.logit_scale);
  const float softcap = static_cast<float>(p.softcap);
  at::Tensor final_rows = at::empty({N, keep_final ? V : 0}, f32);

  const int64_t group = std::min(N, group_positions(R, N));
  const int64_t tile = tile_columns(group * R, H, projects && !weight_in_place);
  const int64_t tiles = (V + tile - 1) / tile;
  const int64_t chunks = std::min<int64_t>(tiles, std::max<int64_t>(16, at::get_num_threads()));
  std::vector<ChunkResult> results(chunks);

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    at::Tensor logits = at::empty({group * R * tile}, f32);
    at::Tensor weight_tile =
        projects && !weight_in_place ? at::empty({tile * H}, f32) : at::Tensor();
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      ChunkResult& result = results[chunk];
      result.stats.assign(M, empty_stats<ScalarLanes>());
      const int64_t first_tile = chunk * tiles / chunks, last_tile = (chunk + 1) * tiles / chunks;
      const int64_t chunk_tokens = std::min(V, last_tile * tile) - first_tile * tile;
      result.heaps.clear();
      for (int64_t n = 0; n < N; ++n) result.heaps.emplace_back(std::min(k, chunk_tokens), L);

      for (int64_t t = first_tile; t < last_tile; ++t) {
        const int64_t v0 = t * tile, cols = std::min(tile, V - v0);
        at::Tensor w;
        if (projects) {
          w = p.weight.narrow(0, v0, cols);
          if (!weight_in_place) w = weight_tile.narrow(0, 0, cols * H).view({cols, H}).copy_(w);
        }
        const float* tile_bias = bias.defined() ? bias.data_ptr<float>() + v0 : nullptr;
        const int32_t token0 = static_cast<int32_t>(vocab_offset + v0);
        for (int64_t n0 = 0; n0 < N; n0 += group) {
          // Logits of positions [n0, n0 + g): row r of position n at ((n - n0) * R + r) * cols.
          const int64_t g = std::min(group, N - n0), rows = g * R;
          at::Tensor out = logits.narrow(0, 0, rows * cols).view({rows, cols});
          if (projects) {
            at::mm_out(out, hidden.narrow(0, n0 * R, rows), w.t());
          } else {
            out.view({g, R, cols}).copy_(p.rows.narrow(1, n0, g).narrow(2, v0, cols)
                                             .transpose(0, 1));
          }
          float* z = out.data_ptr<float>();
          for (int64_t m = 0; m < rows; ++m)
            postprocess(z + m * cols, cols, tile_bias, scale, softcap);

          for (int64_t n = n0; n < n0 + g; ++n) {
            const float* position = z + (n - n0) * R * cols;
            const float* final_row = position + (R - 1) * cols;
            for (int64_t r = 0; r < R; ++r)
              fold_row(result.stats[r * N + n], position + r * cols, final_row, cols, token0);
            result.heaps[n].offer(final_row, position, cols, cols, token0);
            if (keep_final)
              std::copy(final_row, final_row + cols, final_rows.data_ptr<float>() + n * V + v0);
          }
        }
      }
    }
  });

  Partials out;
  out.stats = at::empty({N, R, 6}, f32);
  out.argmax = at::empty({N, R}, f32.dtype(at::kLong));
  out.values = at::empty({N, k}, f32);
  out.tokens = at::empty({N, k}, f32.dtype(at::kLong));
  out.premature = at::empty({N, k, L}, f32);
  out.final_rows = final_rows;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t r = 0; r < R; ++r) {
      RowStats s = empty_stats<ScalarLanes>();
      for (const ChunkResult& result : results) s = merge(s, result.stats[r * N + n]);
      const float fields[6] = {s.max, s.d_at_max, s.rest_sum, s.rest_sq, s.rest_dot, s.d_sq};
      std::copy_n(fields, 6, out.stats.data_ptr<float>() + (n * R + r) * 6);
      out.argmax.data_ptr<int64_t>()[n * R + r] = s.argmax;
    }
  }
  // The shard's top-k is inside the union of its chunks' top-ks.
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
          const float* f = stats.data_ptr<float>() + ((s * N + n) * R + r) * 6;
          const int64_t a = argmax.data_ptr<int64_t>()[(s * N + n) * R + r];
          merged = merge(merged, RowStats{f[0], static_cast<int32_t>(a), f[1], f[2], f[3], f[4],
                                          f[5]});
        }
        row_stats[r] = merged;
      }
      // algorithm.md step 1: the global top-k is inside the union of the shards' top-ks.
      const auto value = [&](int64_t c) { return values.data_ptr<float>()[(c / kk * N + n) * kk + c % kk]; };
      const auto token = [&](int64_t c) { return tokens.data_ptr<int64_t>()[(c / kk * N + n) * kk + c % kk]; };
      picks.clear();
      for (int64_t c = 0; c < S * kk; ++c)
        if (token(c) >= 0) picks.push_back(c);
      TORCH_CHECK_VALUE(static_cast<int64_t>(picks.size()) >= k, "sled.combine: the shards hold ",
                        picks.size(), " tokens for position ", n, ", fewer than k = ", k);
      std::partial_sort(picks.begin(), picks.begin() + k, picks.end(), [&](int64_t a, int64_t b) {
        return ranks_before(value(a), token(a), value(b), token(b));
      });
      const auto z_at = [&](int64_t i, int64_t l) {
        const int64_t c = picks[i];
        return premature.data_ptr<float>()[((c / kk * N + n) * kk + c % kk) * L + l];
      };

      // algorithm.md steps 2-4.
      float total = 0.f;
      for (int64_t l = 0; l < L; ++l) {
        float sum = 0.f;
        for (int64_t i = 0; i < k; ++i) {
          const float z = z_at(i, l);
          const float w = contrast_weight(row_stats[l], z, z - value(picks[i]), token(picks[i]));
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
        out.delta.data_ptr<float>()[n * k + i] = -d;
        out.tokens.data_ptr<int64_t>()[n * k + i] = token(picks[i]);
        out.values.data_ptr<float>()[n * k + i] = value(picks[i]);
      }
      const RowStats& fin = row_stats[R - 1];
      out.softmax.data_ptr<float>()[n * 2] = fin.max;
      out.softmax.data_ptr<float>()[n * 2 + 1] = softmax_total(fin);
    }
  });
  return out;
}

Candidates evolve_cpu(const Problem& p) {
  const int64_t N = p.positions, V = p.vocab, k = p.k;
  // T > 1 needs the whole final row for the later softmaxes (algorithm.md step 5).
  const Partials parts = partials_cpu(p, 0, p.iterations > 1);
  const Selection sel = combine_cpu(
      {parts.stats.unsqueeze(0), parts.argmax.unsqueeze(0), parts.values.unsqueeze(0),
       parts.tokens.unsqueeze(0), parts.premature.unsqueeze(0), at::Tensor()},
      k);
  at::Tensor values = sel.values.clone();
  at::parallel_for(0, N, 1, [&](int64_t n_begin, int64_t n_end) {
    for (int64_t n = n_begin; n < n_end; ++n) {
      // algorithm.md step 5. Iterations before the last move the whole final row, the last only K.
      float* x_k = values.data_ptr<float>() + n * k;
      const int64_t* tokens = sel.tokens.data_ptr<int64_t>() + n * k;
      const float* delta = sel.delta.data_ptr<float>() + n * k;
      float max = sel.softmax.data_ptr<float>()[n * 2];
      float softmax_sum = sel.softmax.data_ptr<float>()[n * 2 + 1];
      float* row = p.iterations > 1 ? parts.final_rows.data_ptr<float>() + n * V : nullptr;
      for (int64_t t = 0; t < p.iterations; ++t) {
        if (t > 0) std::tie(max, softmax_sum) = softmax_stats(row, V);
        const float eta = step_size(p.rate, t, p.iterations);
        for (int64_t i = 0; i < k; ++i)
          x_k[i] = evolve_step(x_k[i], std::exp(x_k[i] - max) / softmax_sum, delta[i], eta);
        if (t + 1 == p.iterations) break;
        const Vec m(max), sum(softmax_sum), step(eta);
        at::vec::map([=](Vec x) { return x - step * ((x - m).exp() / sum); }, row, row, V);
        for (int64_t i = 0; i < k; ++i) row[tokens[i]] = x_k[i];
      }
      if (p.full.defined()) {
        float* full = p.full.data_ptr<float>() + n * V;
        for (int64_t i = 0; i < k; ++i) full[tokens[i]] = x_k[i];
      }
    }
  });
  return {values, sel.tokens};
}

}  // namespace sled
