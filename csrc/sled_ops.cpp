// The sled op library: schemas, argument checks shared by every backend, and backend registration.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <sstream>
#include <tuple>

#include "sled_math.h"
#include "sled_problem.h"

namespace sled {
namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

void check_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ",
                   name, " must be float32, bfloat16 or float16, got ", dtype);
}

void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& rows,
                const char* rows_name) {
  TORCH_CHECK_VALUE(t.device() == rows.device(), op, ": ", name, " is on ", t.device(), " but ",
                    rows_name, " is on ", rows.device(), "; all tensors must be on one device");
  TORCH_CHECK_TYPE(t.scalar_type() == rows.scalar_type(), op, ": ", name, " is ", t.scalar_type(),
                   " but ", rows_name, " is ", rows.scalar_type(), "; use one dtype for all tensors");
}

// Checks what every form shares and fills the scalars of the problem. A vocab shard (sled.partials)
// may hold fewer than k tokens; a whole vocabulary may not.
Problem make_problem(const char* op, const char* rows_name, const at::Tensor& rows, int64_t vocab,
                     int64_t k, double logit_scale, double softcap, bool whole_vocab = true) {
  TORCH_CHECK_VALUE(vocab < std::numeric_limits<int32_t>::max(), op,
                    ": the vocabulary must have fewer than 2^31 tokens, got ", vocab);
  if (whole_vocab) {
    TORCH_CHECK_VALUE(k >= 1 && k <= vocab, op, ": evolution_scale (k) must be in [1, V] = [1, ",
                      vocab, "], got ", k);
  } else {
    TORCH_CHECK_VALUE(k >= 1, op, ": evolution_scale (k) must be >= 1, got ", k);
  }
  TORCH_CHECK_VALUE(std::isfinite(logit_scale), op, ": logit_scale must be finite, got ",
                    logit_scale);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, op,
                    ": softcap must be >= 0 and finite (0 turns soft-capping off), got ", softcap);
  Problem p;
  p.rows = rows;
  p.num_rows = rows.size(0);
  p.positions = rows.size(1);
  p.vocab = vocab;
  p.k = k;
  p.logit_scale = logit_scale;
  p.softcap = softcap;
  return p;
}

Evolution make_evolution(const char* op, double rate, int64_t iterations) {
  TORCH_CHECK_VALUE(iterations >= 1, op, ": iterations must be >= 1, got ", iterations);
  TORCH_CHECK_VALUE(std::isfinite(rate), op, ": evolution_rate must be finite, got ", rate);
  return {rate, iterations};
}

void check_cuda_rows(const char* op, const at::Device& device, int64_t rows) {
  TORCH_CHECK_VALUE(!device.is_cuda() || rows <= kCudaMaxRows, op, ": on CUDA it takes at most ",
                    kCudaMaxRows, " stacked rows (R) per position, got ", rows);
}

void check_rows(const char* op, const char* name, const at::Tensor& rows, const char* last_dim) {
  check_dtype(op, name, rows);
  TORCH_CHECK_VALUE(rows.dim() == 3, op, ": ", name, " must be [R, N, ", last_dim,
                    "] (R stacked rows per position: premature layers first, the final layer last), "
                    "got shape ",
                    shape_of(rows));
  TORCH_CHECK_VALUE(rows.size(0) >= 2, op, ": ", name, " has R = ", rows.size(0),
                    " row per position; SLED needs at least one premature row and the final row "
                    "(R >= 2)");
  check_cuda_rows(op, rows.device(), rows.size(0));
}

Problem projection_problem(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, int64_t k,
                           double logit_scale, double softcap, bool whole_vocab = true) {
  check_rows(op, "hidden", hidden, "H");
  check_same(op, "weight", weight, hidden, "hidden");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == hidden.size(2), op,
                    ": weight must be [V, H] with H = ", hidden.size(2),
                    " (the last dim of hidden), got shape ", shape_of(weight));
  const int64_t vocab = weight.size(0);
  Problem p = make_problem(op, "hidden", hidden, vocab, k, logit_scale, softcap, whole_vocab);
  p.weight = weight;
  if (bias.has_value()) {
    check_same(op, "bias", *bias, hidden, "hidden");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == vocab, op, ": bias must be [V] = [",
                      vocab, "], got shape ", shape_of(*bias));
    p.bias = *bias;
  }
  return p;
}

Problem logits_problem(const char* op, const at::Tensor& logits, int64_t k, double logit_scale,
                       double softcap, bool whole_vocab = true) {
  check_rows(op, "logits", logits, "V");
  return make_problem(op, "logits", logits, logits.size(2), k, logit_scale, softcap, whole_vocab);
}

using Backend = Candidates (*)(const Problem&, const Evolution&, const at::Tensor&);

at::Tensor run_full(Backend backend, const Problem& p, const Evolution& e, const char* op,
                    double lower_bound) {
  TORCH_CHECK_VALUE(!std::isnan(lower_bound), op, ": evolution_lower_bound must not be NaN");
  at::Tensor full =
      at::full({p.positions, p.vocab}, lower_bound, p.rows.options().dtype(at::kFloat));
  if (p.positions > 0) backend(p, e, full);
  return full;
}

// Sorted by evolved value, descending; ties go to the lower token.
std::tuple<at::Tensor, at::Tensor> run_topk(Backend backend, const Problem& p,
                                            const Evolution& e) {
  if (p.positions == 0) {
    const auto options = p.rows.options();
    return {at::empty({0, p.k}, options.dtype(at::kFloat)),
            at::empty({0, p.k}, options.dtype(at::kLong))};
  }
  const Candidates c = backend(p, e, at::Tensor());
  const auto [tokens, by_token] = c.tokens.sort(/*dim=*/1);
  const auto [values, order] =
      c.values.gather(1, by_token).sort(/*stable=*/true, /*dim=*/1, /*descending=*/true);
  return {values, tokens.gather(1, order)};
}

template <Backend backend>
at::Tensor evolve(const at::Tensor& hidden, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, int64_t k, double rate,
                  double lower_bound, int64_t iterations, double logit_scale, double softcap) {
  constexpr const char* op = "sled.evolve";
  return run_full(backend, projection_problem(op, hidden, weight, bias, k, logit_scale, softcap),
                  make_evolution(op, rate, iterations), op, lower_bound);
}

template <Backend backend>
std::tuple<at::Tensor, at::Tensor> evolve_topk(const at::Tensor& hidden, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias, int64_t k,
                                               double rate, int64_t iterations,
                                               double logit_scale, double softcap) {
  constexpr const char* op = "sled.evolve_topk";
  return run_topk(backend, projection_problem(op, hidden, weight, bias, k, logit_scale, softcap),
                  make_evolution(op, rate, iterations));
}

template <Backend backend>
at::Tensor evolve_logits(const at::Tensor& logits, int64_t k, double rate, double lower_bound,
                         int64_t iterations, double logit_scale, double softcap) {
  constexpr const char* op = "sled.evolve_logits";
  return run_full(backend, logits_problem(op, logits, k, logit_scale, softcap),
                  make_evolution(op, rate, iterations), op, lower_bound);
}

template <Backend backend>
std::tuple<at::Tensor, at::Tensor> evolve_logits_topk(const at::Tensor& logits, int64_t k,
                                                      double rate, int64_t iterations,
                                                      double logit_scale, double softcap) {
  constexpr const char* op = "sled.evolve_logits_topk";
  return run_topk(backend, logits_problem(op, logits, k, logit_scale, softcap),
                  make_evolution(op, rate, iterations));
}

using PartialsTuple =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using SelectionTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <Partials (*backend)(const Problem&, int64_t, bool)>
PartialsTuple run_partials(const char* op, const Problem& p, int64_t vocab_offset,
                           bool keep_final) {
  TORCH_CHECK_VALUE(vocab_offset >= 0 &&
                        vocab_offset + p.vocab < std::numeric_limits<int32_t>::max(),
                    op, ": vocab_offset must be >= 0 and offset + shard size < 2^31, got ",
                    vocab_offset);
  const Partials out = backend(p, vocab_offset, keep_final);
  return {out.stats, out.argmax, out.values, out.tokens, out.premature, out.final_rows};
}

template <Partials (*backend)(const Problem&, int64_t, bool)>
PartialsTuple partials(const at::Tensor& hidden, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, int64_t vocab_offset, int64_t k,
                       double logit_scale, double softcap, bool keep_final) {
  constexpr const char* op = "sled.partials";
  return run_partials<backend>(
      op,
      projection_problem(op, hidden, weight, bias, k, logit_scale, softcap, /*whole_vocab=*/false),
      vocab_offset, keep_final);
}

template <Partials (*backend)(const Problem&, int64_t, bool)>
PartialsTuple partials_logits(const at::Tensor& logits, int64_t vocab_offset, int64_t k,
                              double logit_scale, double softcap, bool keep_final) {
  constexpr const char* op = "sled.partials_logits";
  return run_partials<backend>(
      op,
      logits_problem(op, logits, k, logit_scale, softcap, /*whole_vocab=*/false),
      vocab_offset, keep_final);
}

template <Selection (*backend)(const Partials&, int64_t)>
SelectionTuple combine(const at::Tensor& stats, const at::Tensor& argmax, const at::Tensor& values,
                       const at::Tensor& tokens, const at::Tensor& premature, int64_t k) {
  constexpr const char* op = "sled.combine";
  TORCH_CHECK_VALUE(stats.dim() == 4 && stats.size(2) >= 2 && stats.size(3) == kRecordFloats,
                    op, ": stats must be [S, N, R, ", kRecordFloats,
                    "] (partials of S shards stacked), got shape ", shape_of(stats));
  const int64_t S = stats.size(0), N = stats.size(1), R = stats.size(2);
  check_cuda_rows(op, stats.device(), R);
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(0) == S && values.size(1) == N, op,
                    ": values must be [S, N, k'] = [", S, ", ", N, ", k'], got shape ",
                    shape_of(values));
  const int64_t kept = values.size(2);
  const auto expect = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape,
                          at::ScalarType dtype) {
    TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
                      shape_of(t));
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == stats.device(), op, ": ", name, " is on ", t.device(),
                      " but stats is on ", stats.device());
  };
  expect(stats, "stats", {S, N, R, kRecordFloats}, at::kFloat);
  expect(argmax, "argmax", {S, N, R}, at::kLong);
  expect(values, "values", {S, N, kept}, at::kFloat);
  expect(tokens, "tokens", {S, N, kept}, at::kLong);
  expect(premature, "premature", {S, N, kept, R - 1}, at::kFloat);
  TORCH_CHECK_VALUE(k >= 1 && k <= kept, op, ": evolution_scale (k) must be in [1, ", kept,
                    "] (the shards' candidates per position), got ", k);
  if (N == 0) {
    const auto options = stats.options();
    return {at::empty({0, k}, options.dtype(at::kLong)), at::empty({0, k}, options),
            at::empty({0, k}, options), at::empty({0, 2}, options)};
  }
  const Selection out = backend({stats, argmax, values, tokens, premature, at::Tensor()}, k);
  return {out.tokens, out.values, out.delta, out.softmax};
}

}  // namespace

TORCH_LIBRARY(sled, m) {
  m.def(
      "evolve(Tensor hidden, Tensor weight, Tensor? bias, int evolution_scale, "
      "float evolution_rate, float evolution_lower_bound, int iterations=1, "
      "float logit_scale=1.0, float softcap=0.0) -> Tensor");
  m.def(
      "evolve_topk(Tensor hidden, Tensor weight, Tensor? bias, int evolution_scale, "
      "float evolution_rate, int iterations=1, float logit_scale=1.0, float softcap=0.0) "
      "-> (Tensor values, Tensor indices)");
  m.def(
      "evolve_logits(Tensor logits, int evolution_scale, float evolution_rate, "
      "float evolution_lower_bound, int iterations=1, float logit_scale=1.0, "
      "float softcap=0.0) -> Tensor");
  m.def(
      "evolve_logits_topk(Tensor logits, int evolution_scale, float evolution_rate, "
      "int iterations=1, float logit_scale=1.0, float softcap=0.0) "
      "-> (Tensor values, Tensor indices)");
  // The two phases of the op for a vocab-sharded head (sled_ext.distributed).
  m.def(
      "partials(Tensor hidden, Tensor weight, Tensor? bias, int vocab_offset, "
      "int evolution_scale, float logit_scale=1.0, float softcap=0.0, bool keep_final=False) "
      "-> (Tensor stats, Tensor argmax, Tensor values, Tensor tokens, Tensor premature, "
      "Tensor final_rows)");
  m.def(
      "partials_logits(Tensor logits, int vocab_offset, int evolution_scale, "
      "float logit_scale=1.0, float softcap=0.0, bool keep_final=False) "
      "-> (Tensor stats, Tensor argmax, Tensor values, Tensor tokens, Tensor premature, "
      "Tensor final_rows)");
  m.def(
      "combine(Tensor stats, Tensor argmax, Tensor values, Tensor tokens, Tensor premature, "
      "int evolution_scale) -> (Tensor tokens, Tensor values, Tensor delta, Tensor softmax)");
  m.def("cpu_kernels(ScalarType dtype) -> str", &cpu_kernels);
}

#define SLED_REGISTER_BACKEND(DISPATCH_KEY, evolve_backend, partials_backend, combine_backend) \
  TORCH_LIBRARY_IMPL(sled, DISPATCH_KEY, m) {                                                 \
    m.impl("evolve", &evolve<evolve_backend>);                                                \
    m.impl("evolve_topk", &evolve_topk<evolve_backend>);                                      \
    m.impl("evolve_logits", &evolve_logits<evolve_backend>);                                  \
    m.impl("evolve_logits_topk", &evolve_logits_topk<evolve_backend>);                        \
    m.impl("partials", &partials<partials_backend>);                                          \
    m.impl("partials_logits", &partials_logits<partials_backend>);                            \
    m.impl("combine", &combine<combine_backend>);                                             \
  }

SLED_REGISTER_BACKEND(CPU, evolve_cpu, partials_cpu, combine_cpu)
#ifdef SLED_WITH_CUDA
SLED_REGISTER_BACKEND(CUDA, evolve_cuda, partials_cuda, combine_cuda)
#endif

}  // namespace sled
