// What the op binding hands a backend: one validated call. Backends live in cpu/ and cuda/.
#pragma once

#include <ATen/core/Tensor.h>

namespace sled {

struct Problem {
  at::Tensor rows;    // [R, N, H] hidden states, or [R, N, V] logits when `weight` is undefined;
                      // premature rows first, the final row last
  at::Tensor weight;  // [V, H] vocab head; undefined for the logits form
  at::Tensor bias;    // [V] or undefined
  at::Tensor full;    // [N, V] float32 filled with the lower bound, where the backend scatters the
                      // evolved values; undefined for the top-k form
  int64_t num_rows, positions, vocab, k, iterations;
  double rate, logit_scale, softcap;
  bool projects() const { return weight.defined(); }
};

// The evolved top-k of every position, in any order: values [N, k] float32, tokens [N, k] int64.
struct Candidates {
  at::Tensor values, tokens;
};

// Each backend runs one Problem with positions >= 1.
Candidates evolve_cpu(const Problem& problem);
Candidates evolve_cuda(const Problem& problem);

}  // namespace sled
