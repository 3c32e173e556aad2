// What the op binding hands a backend: one validated call. Backends live in cpu/ and cuda/.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace sled {

// The CUDA kernel stages every stacked row of a position group in shared memory; the binding
// checks this limit (the kernels assume it).
constexpr int kCudaMaxRows = 128;

struct Problem {
  at::Tensor rows;    // [R, N, H] hidden states, or [R, N, V] logits when `weight` is undefined;
                      // premature rows first, the final row last
  at::Tensor weight;  // [V, H] vocab head; undefined for the logits form
  at::Tensor bias;    // [V] or undefined
  int64_t num_rows, positions, vocab, k;
  double logit_scale, softcap;
  bool projects() const { return weight.defined(); }
};

// The evolution a whole-vocabulary call asks for (algorithm.md step 5): rate alpha, T steps.
struct Evolution {
  double rate;
  int64_t iterations;
};

// The evolved top-k of every position, in any order: values [N, k] float32, tokens [N, k] int64.
struct Candidates {
  at::Tensor values, tokens;
};

// Phase 1 over one vocab shard (sled.partials): what the shard contributes, independent of V.
struct Partials {
  at::Tensor stats;      // [N, R, kRecordFloats] float32: RowStats without argmax
                         // (sled_math.h, store_record)
  at::Tensor argmax;     // [N, R] int64, global token ids (-1: the shard is empty)
  at::Tensor values;     // [N, k] float32 final logits of the shard's best tokens (any order)
  at::Tensor tokens;     // [N, k] int64 global ids; -1 pads (last) a shard of fewer than k tokens
  at::Tensor premature;  // [N, k, L] float32 the premature rows' logits at those tokens
  at::Tensor final_rows; // [N, shard V] float32 when kept (T > 1), else [N, 0]
};

// Phase 2 (sled.combine) over S shards' partials stacked on a leading dim: algorithm.md steps 1-4.
struct Selection {
  at::Tensor tokens;   // [N, k] int64, best final logit first
  at::Tensor values;   // [N, k] float32 final logits there
  at::Tensor delta;    // [N, k] float32
  at::Tensor softmax;  // [N, 2] float32 final row's max and sum of exp(z - max) over all shards
};

// Each backend runs one Problem with positions >= 1. The evolve backends scatter the evolved
// values into `full` ([N, V] float32 filled with the lower bound) when it is defined (the
// full-row form), and return them.
Candidates evolve_cpu(const Problem& problem, const Evolution& evolution, const at::Tensor& full);
Candidates evolve_cuda(const Problem& problem, const Evolution& evolution, const at::Tensor& full);
Partials partials_cpu(const Problem& problem, int64_t vocab_offset, bool keep_final);
Partials partials_cuda(const Problem& problem, int64_t vocab_offset, bool keep_final);
Selection combine_cpu(const Partials& stacked, int64_t k);
Selection combine_cuda(const Partials& stacked, int64_t k);

// What the CPU backend runs here for a contiguous weight of `dtype` (sled.cpu_kernels): the level
// of its vector loops and how it projects, "AVX512; brgemm" say.
std::string cpu_kernels(at::ScalarType dtype);

}  // namespace sled
