// Calls the sled ops through the dispatcher, as a libtorch embedder would, on small hand-made
// cases. The expected values are computed here in double straight from the SLED formulas
// (docs/algorithm.md steps 1-6), independently of the library's streaming math. Exits nonzero on any mismatch.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

namespace {

using Vector = std::vector<double>;
using Rows = std::vector<Vector>;  // one position's [R][V] logits, premature rows first

int failures = 0;

Vector softmax(const Vector& x) {
  const double max = *std::max_element(x.begin(), x.end());
  Vector p(x.size());
  double sum = 0;
  for (size_t j = 0; j < x.size(); ++j) sum += p[j] = std::exp(x[j] - max);
  for (double& v : p) v /= sum;
  return p;
}

// As torch.nn.functional.cosine_similarity: each norm clamped to >= eps on its own.
double cosine(const Vector& a, const Vector& b) {
  double dot = 0, aa = 0, bb = 0;
  for (size_t j = 0; j < a.size(); ++j) dot += a[j] * b[j], aa += a[j] * a[j], bb += b[j] * b[j];
  return dot / (std::max(std::sqrt(aa), 1e-8) * std::max(std::sqrt(bb), 1e-8));
}

// docs/algorithm.md steps 1-6 for one position.
Vector sled_position(const Rows& z, int64_t k, double rate, double lower_bound, int64_t T) {
  const Vector& final_row = z.back();
  const size_t V = final_row.size(), L = z.size() - 1;
  std::vector<size_t> K(V);  // 1. top-k of the final row, ties to the lower index
  std::iota(K.begin(), K.end(), 0);
  std::stable_sort(K.begin(), K.end(),
                   [&](size_t a, size_t b) { return final_row[a] > final_row[b]; });
  K.resize(k);

  Rows m(L, Vector(k));
  Vector s(L, 0.0);
  for (size_t l = 0; l < L; ++l) {
    const Vector p = softmax(z[l]);
    Vector d(V);
    for (size_t j = 0; j < V; ++j) d[j] = z[l][j] - final_row[j];
    for (int64_t i = 0; i < k; ++i) {
      Vector g = p;  // 2. p_l - e_i
      g[K[i]] -= 1;
      const double c = std::max(cosine(g, d), 0.0);
      s[l] += m[l][i] = c * c;  // 3.
    }
    if (s[l] != 0)
      for (double& v : m[l]) v /= s[l];
  }
  const double S = std::accumulate(s.begin(), s.end(), 0.0);
  Vector delta(V, 0.0);  // 4.
  for (int64_t i = 0; i < k; ++i)
    for (size_t l = 0; l < L; ++l) delta[K[i]] -= (S != 0 ? s[l] / S : s[l]) * m[l][i];

  Vector x = final_row;  // 5.
  for (int64_t t = 0; t < T; ++t) {
    const double eta = rate * (1.0 - static_cast<double>(t) / T);
    const Vector p = softmax(x);
    for (size_t j = 0; j < V; ++j) x[j] -= eta * (p[j] + delta[j]);
  }
  Vector y(V, lower_bound);  // 6.
  for (size_t i : K) y[i] = x[i];
  return y;
}

void expect_close(const char* what, const at::Tensor& got, const Rows& want) {
  const bool shape_ok = got.scalar_type() == at::kFloat && got.dim() == 2 &&
                        got.size(0) == static_cast<int64_t>(want.size()) &&
                        got.size(1) == static_cast<int64_t>(want[0].size());
  if (!shape_ok) {
    std::printf("FAIL %s: got %s %s\n", what, std::string(c10::toString(got.scalar_type())).c_str(),
                c10::str(got.sizes()).c_str());
    ++failures;
    return;
  }
  const at::Tensor out = got.contiguous();
  for (size_t n = 0; n < want.size(); ++n)
    for (size_t j = 0; j < want[n].size(); ++j) {
      const double g = out[n][j].item<float>(), w = want[n][j];
      const bool ok = std::abs(g - w) <= 1e-5 * (1 + std::abs(w));  // float32 op vs double
      std::printf("%s %s [%zu,%zu]: got %.7f want %.7f\n", ok ? "ok  " : "FAIL", what, n, j, g, w);
      failures += !ok;
    }
}

at::Tensor tensor_of(std::vector<float> values, at::IntArrayRef shape) {
  return at::from_blob(values.data(), shape, at::kFloat).clone();
}

}  // namespace

int main() {
  auto& dispatcher = c10::Dispatcher::singleton();
  // The schemas of csrc/sled_ops.cpp; throws if the library's registrations did not run.
  const auto evolve_logits =
      dispatcher.findSchemaOrThrow("sled::evolve_logits", "")
          .typed<at::Tensor(const at::Tensor&, int64_t, double, double, int64_t, double, double)>();
  const auto evolve =
      dispatcher.findSchemaOrThrow("sled::evolve", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            int64_t, double, double, int64_t, double, double)>();

  // evolve_logits: R=3 (two premature rows), N=2, V=5, k=2, two iterations. Position 0 has one
  // negative cosine per layer (clamped to 0); position 1 has a tie in the final row (tokens 1, 2).
  {
    const std::vector<Rows> positions = {
        {{0.5, 1.5, -0.5, 0.2, 1.0}, {1.0, 2.5, 0.0, 0.4, 1.1}, {0.3, 2.0, -0.2, 1.0, 1.9}},
        {{2.0, 0.1, -1.0, 0.3, 0.7}, {0.5, 0.6, 0.8, -0.2, 1.2}, {0.1, 1.0, 1.0, 0.0, 2.0}}};
    std::vector<float> data;  // [R, N, V]
    for (int r = 0; r < 3; ++r)
      for (const Rows& z : positions) data.insert(data.end(), z[r].begin(), z[r].end());
    const at::Tensor logits = tensor_of(data, {3, 2, 5});
    Rows want;
    for (const Rows& z : positions) want.push_back(sled_position(z, 2, 1.5, -100.0, 2));
    expect_close("evolve_logits", evolve_logits.call(logits, 2, 1.5, -100.0, 2, 1.0, 0.0), want);
  }

  // evolve: R=2, N=1, H=3, V=4, k=3, with a bias; logits = hidden @ weight^T + bias.
  {
    const Rows hidden = {{1.0, -0.5, 0.25}, {0.5, 1.0, -1.0}};
    const Rows weight = {{1.0, 0.0, 0.5}, {-0.5, 1.0, 0.0}, {0.25, 0.25, 1.0}, {0.0, -1.0, 0.5}};
    const Vector bias = {0.1, -0.2, 0.0, 0.3};
    Rows z(2, Vector(4));
    for (int r = 0; r < 2; ++r)
      for (int v = 0; v < 4; ++v) {
        z[r][v] = bias[v];
        for (int h = 0; h < 3; ++h) z[r][v] += hidden[r][h] * weight[v][h];
      }
    std::vector<float> h_data, w_data;
    for (const Vector& row : hidden) h_data.insert(h_data.end(), row.begin(), row.end());
    for (const Vector& row : weight) w_data.insert(w_data.end(), row.begin(), row.end());
    const at::Tensor out =
        evolve.call(tensor_of(h_data, {2, 1, 3}), tensor_of(w_data, {4, 3}),
                    tensor_of({bias.begin(), bias.end()}, {4}), 3, 2.0, -1000.0, 1, 1.0, 0.0);
    expect_close("evolve", out, {sled_position(z, 3, 2.0, -1000.0, 1)});
  }

  // k > V must be refused with a c10::Error (a ValueError in Python).
  try {
    evolve_logits.call(at::zeros({2, 1, 5}), 6, 1.0, -100.0, 1, 1.0, 0.0);
    std::printf("FAIL k > V: no error\n");
    ++failures;
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    const bool ok = message.find("evolution_scale") != std::string::npos;
    std::printf("%s k > V raised c10::Error: %s\n", ok ? "ok  " : "FAIL", message.c_str());
    failures += !ok;
  }

  if (failures) {
    std::printf("%d check(s) FAILED\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
