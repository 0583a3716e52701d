// Calls the bayes_ext ops through the c10 dispatcher (as torch.ops.bayes_ext.* does) from a program
// linked against libbayes_ext_ops and libtorch, and checks them against a double-precision
// reference written here from docs/design.md and philox.h:
// - philox4x32 returns philox_block's words;
// - philox_normal follows the stream layout (lanes 0/1 use words (x0, x1), lanes 2/3 (x2, x3));
// - sample_weight's w, log q and log p, and sample_weight_backward's gradients, follow the
//   formulas in docs/design.md, in float64 and float32, for sizes that end mid-block and mid-tile;
// - gaussian_kl, lrt_weight_forward and their backwards follow the closed forms.
// CTest runs it once per BAYES_EXT_CPU_ISA cap; it prints the ISA it got.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bayes_ext/philox.h"
#include "check.h"

namespace {

using bayes_ext_test::check;

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// Reference eps for element i of stream (seed, offset), in double.
double ref_eps(uint64_t seed, uint64_t offset, int64_t i) {
  const bayes_ext::PhiloxOut x = bayes_ext::philox_block(seed, offset, static_cast<uint64_t>(i) / 4);
  const int lane = static_cast<int>(i % 4);
  const int pair = lane / 2;
  const double u = (2.0 * (x.x[2 * pair] >> 9) + 1.0) * 5.9604644775390625e-08;
  const double v = (x.x[2 * pair + 1] >> 8) * 5.9604644775390625e-08;
  const double r = std::sqrt(-2.0 * std::log(u));
  const double two_pi = 6.283185307179586477;
  return lane % 2 == 0 ? r * std::cos(two_pi * v) : r * std::sin(two_pi * v);
}

double softplus(double rho) { return std::max(rho, 0.0) + std::log1p(std::exp(-std::fabs(rho))); }
double sigmoid(double rho) { return 1.0 / (1.0 + std::exp(-rho)); }
const double kHalfLog2Pi = 0.91893853320467274178;

double log_normal(double w, double s) { return -kHalfLog2Pi - std::log(s) - 0.5 * (w / s) * (w / s); }

double log_prior(double w, double pi, double s1, double s2) {
  const double a = std::log(pi) + log_normal(w, s1), b = std::log1p(-pi) + log_normal(w, s2);
  const double m = std::max(a, b);
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}

double dlog_prior(double w, double pi, double s1, double s2) {
  const double a = std::log(pi) + log_normal(w, s1), b = std::log1p(-pi) + log_normal(w, s2);
  const double r1 = 1.0 / (1.0 + std::exp(b - a));
  return -w * (r1 / (s1 * s1) + (1.0 - r1) / (s2 * s2));
}

double max_abs_diff(const at::Tensor& a, const std::vector<double>& ref) {
  const at::Tensor ad = a.to(at::kDouble).contiguous();
  const double* p = ad.data_ptr<double>();
  double worst = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) worst = std::max(worst, std::fabs(p[i] - ref[i]));
  return worst;
}

void test_philox4x32(const at::Tensor& seed, uint64_t s) {
  auto philox = op("bayes_ext::philox4x32").typed<at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t)>();
  const int64_t offset = 3, first = (int64_t(1) << 32) - 2, n = 5;  // crosses into counter word 1
  const at::Tensor words = philox.call(seed, offset, first, n);
  check(words.sizes() == at::IntArrayRef({n, 4}) && words.scalar_type() == at::kLong,
        "philox4x32 returns an int64 (num_blocks, 4) tensor");
  bool same = true;
  for (int64_t b = 0; b < n && words.numel() == 4 * n; ++b) {
    const bayes_ext::PhiloxOut x = bayes_ext::philox_block(s, offset, static_cast<uint64_t>(first + b));
    for (int k = 0; k < 4; ++k) same = same && words[b][k].item<int64_t>() == static_cast<int64_t>(x.x[k]);
  }
  check(same, "philox4x32 words equal philox_block(seed, offset, block)");
}

void test_normals(const at::Tensor& seed, uint64_t s, at::ScalarType dtype, double tol) {
  auto normal = op("bayes_ext::philox_normal").typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  const char* name = dtype == at::kDouble ? "float64" : "float32";
  for (int64_t n : {1, 7, 64, 131, 40000}) {
    for (int64_t offset : {0, 1}) {
      const at::Tensor like = at::empty({n}, at::TensorOptions().dtype(dtype));
      const at::Tensor eps = normal.call(like, seed, offset, 0);
      std::vector<double> ref(n);
      for (int64_t i = 0; i < n; ++i) ref[i] = ref_eps(s, offset, i);
      const double err = max_abs_diff(eps, ref);
      char what[160];
      std::snprintf(what, sizeof what, "philox_normal %s n=%lld offset=%lld matches the reference (max err %.3g, tol %.3g)",
                    name, static_cast<long long>(n), static_cast<long long>(offset), err, tol);
      check(eps.scalar_type() == dtype && eps.numel() == n && err <= tol, what);
    }
  }
  // Element i depends only on (seed, offset, i): a 2-D shape gives the same stream as its flat view.
  const at::Tensor flat = normal.call(at::empty({6 * 37}, at::TensorOptions().dtype(dtype)), seed, 0, 0);
  const at::Tensor shaped = normal.call(at::empty({6, 37}, at::TensorOptions().dtype(dtype)), seed, 0, 0);
  check(at::equal(flat, shaped.reshape({-1})), std::string("philox_normal ") + name + " is shape-independent");
}

void test_sample_weight(const at::Tensor& seed, uint64_t s, at::ScalarType dtype, double tol) {
  auto sample = op("bayes_ext::sample_weight")
                    .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, double, double, int64_t,
                                  bool)>();
  auto backward = op("bayes_ext::sample_weight_backward")
                      .typed<Triple(const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, double,
                                    double, bool, int64_t, bool)>();
  const char* name = dtype == at::kDouble ? "float64" : "float32";
  const double pi = 0.25, s1 = 1.0, s2 = std::exp(-6.0);
  const int64_t rows = 37, cols = 41;  // 1517 elements: ends mid-block and mid-tile
  const int64_t n = rows * cols;
  const auto opts = at::TensorOptions().dtype(dtype);
  const at::Tensor mu = at::linspace(-0.5, 0.5, n, at::TensorOptions().dtype(at::kDouble)).reshape({rows, cols}).to(dtype);
  const at::Tensor rho = at::linspace(-8.0, 2.0, n, at::TensorOptions().dtype(at::kDouble)).reshape({rows, cols}).to(dtype);
  const int64_t offset = 1;
  const Triple out = sample.call(mu, rho, seed, offset, pi, s1, s2, 0, false);
  const at::Tensor& w = std::get<0>(out);
  const at::Tensor md = mu.to(at::kDouble).contiguous(), rd = rho.to(at::kDouble).contiguous();
  const double* mp = md.data_ptr<double>();
  const double* rp = rd.data_ptr<double>();
  std::vector<double> ref_w(n), eps(n);
  double ref_lq = 0.0, ref_lp = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    eps[i] = ref_eps(s, offset, i);
    const double sigma = softplus(rp[i]);
    ref_w[i] = mp[i] + sigma * eps[i];
    ref_lq += -kHalfLog2Pi - std::log(sigma) - 0.5 * eps[i] * eps[i];
    ref_lp += log_prior(ref_w[i], pi, s1, s2);
  }
  check(w.sizes() == mu.sizes() && w.scalar_type() == dtype, std::string("sample_weight ") + name + " w has mu's shape and dtype");
  const double w_err = max_abs_diff(w, ref_w);
  check(w_err <= tol, std::string("sample_weight ") + name + " w = mu + softplus(rho) eps (max err " + std::to_string(w_err) + ")");
  const double lq = std::get<1>(out).item<double>(), lp = std::get<2>(out).item<double>();
  // Sums of n terms: relative tolerance, scaled for float32.
  const double sum_tol = dtype == at::kDouble ? 1e-9 : 2e-4;
  check(std::get<1>(out).dim() == 0 && std::fabs(lq - ref_lq) <= sum_tol * std::fabs(ref_lq),
        std::string("sample_weight ") + name + " log_q " + std::to_string(lq) + " vs " + std::to_string(ref_lq));
  check(std::get<2>(out).dim() == 0 && std::fabs(lp - ref_lp) <= sum_tol * std::fabs(ref_lp),
        std::string("sample_weight ") + name + " log_p " + std::to_string(lp) + " vs " + std::to_string(ref_lp));

  // Backward with grad_w, regenerating w.
  const at::Tensor grad_w = at::linspace(1.0, -1.0, n, at::TensorOptions().dtype(at::kDouble)).reshape({rows, cols}).to(dtype);
  const at::Tensor glq = at::scalar_tensor(0.3, opts), glp = at::scalar_tensor(-0.7, opts);
  const Triple grads = backward.call(grad_w, glq, glp, mu, rho, seed, offset, pi, s1, s2, true, 0, false);
  const at::Tensor gwd = grad_w.to(at::kDouble).contiguous();
  const double* gwp = gwd.data_ptr<double>();
  std::vector<double> ref_gmu(n), ref_grho(n);
  for (int64_t i = 0; i < n; ++i) {
    // Evaluate dlogp/dw at the w the kernel samples in this dtype (float32 w differs by ~1 ulp).
    const double g = gwp[i] + (-0.7) * dlog_prior(ref_w[i], pi, s1, s2);
    ref_gmu[i] = g;
    ref_grho[i] = g * eps[i] * sigmoid(rp[i]) - 0.3 * sigmoid(rp[i]) / softplus(rp[i]);
  }
  // dlogp/dw has slope up to 1/s2^2 ~ 1.6e5 near 0: float32 w error moves it by ~1e5 * 1e-7.
  const double gtol = dtype == at::kDouble ? 1e-8 : 0.05;
  const double gmu_err = max_abs_diff(std::get<0>(grads), ref_gmu);
  const double grho_err = max_abs_diff(std::get<1>(grads), ref_grho);
  check(gmu_err <= gtol, std::string("sample_weight_backward ") + name + " grad_mu (max err " + std::to_string(gmu_err) + ")");
  check(grho_err <= gtol, std::string("sample_weight_backward ") + name + " grad_rho (max err " + std::to_string(grho_err) + ")");
  check(at::equal(std::get<2>(grads), w), std::string("sample_weight_backward ") + name + " regenerates w bit for bit");

  // Without grad_w and return_weight: gradients of log q and log p only; w comes back empty.
  const Triple only = backward.call(std::nullopt, glq, glp, mu, rho, seed, offset, pi, s1, s2, false, 0, false);
  for (int64_t i = 0; i < n; ++i) {
    const double g = (-0.7) * dlog_prior(ref_w[i], pi, s1, s2);
    ref_gmu[i] = g;
    ref_grho[i] = g * eps[i] * sigmoid(rp[i]) - 0.3 * sigmoid(rp[i]) / softplus(rp[i]);
  }
  check(max_abs_diff(std::get<0>(only), ref_gmu) <= gtol && max_abs_diff(std::get<1>(only), ref_grho) <= gtol,
        std::string("sample_weight_backward ") + name + " without grad_w");
  check(std::get<2>(only).numel() == 0, std::string("sample_weight_backward ") + name + " returns an empty w unless asked");

  // noise_only (Flipout's dW = w - mu): the same draws, the noise rounded as w - mu, w's log q / log p;
  // its backward keeps grad_w out of grad_mu and returns the noise.
  const Triple noise = sample.call(mu, rho, seed, offset, pi, s1, s2, 0, true);
  check(at::equal(std::get<0>(noise), w - mu) && at::equal(std::get<1>(noise), std::get<1>(out)) &&
            at::equal(std::get<2>(noise), std::get<2>(out)),
        std::string("sample_weight ") + name + " noise_only gives w - mu and w's log q / log p");
  const Triple noise_grads = backward.call(grad_w, glq, glp, mu, rho, seed, offset, pi, s1, s2, true, 0, true);
  check(at::equal(std::get<0>(noise_grads), std::get<0>(grads) - grad_w) &&
            at::equal(std::get<1>(noise_grads), std::get<1>(grads)) &&
            at::equal(std::get<2>(noise_grads), w - mu),
        std::string("sample_weight_backward ") + name + " noise_only: grad_w reaches rho, not mu");
}

// gaussian_kl / gaussian_kl_backward against the closed form in double, over rho in [-30, 25]
// (the exact-limit branch below -20, both softplus branches), sizes ending mid-tile.
void test_gaussian_kl(at::ScalarType dtype, double tol) {
  auto kl = op("bayes_ext::gaussian_kl").typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  auto kl_backward = op("bayes_ext::gaussian_kl_backward")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, double)>();
  const char* name = dtype == at::kDouble ? "float64" : "float32";
  const int64_t n = 40000;  // 2 chunks of 16384 and a partial one, ends mid-tile
  const double s = 0.3, g = -1.7;
  const auto dbl = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor mu = at::linspace(-1.0, 1.0, n, dbl).to(dtype);
  const at::Tensor rho = at::linspace(-30.0, 25.0, n, dbl).flip(0).to(dtype);
  const at::Tensor md = mu.to(at::kDouble).contiguous(), rd = rho.to(at::kDouble).contiguous();
  const double* mp = md.data_ptr<double>();
  const double* rp = rd.data_ptr<double>();
  double ref = 0.0;
  std::vector<double> ref_gmu(n), ref_grho(n);
  for (int64_t i = 0; i < n; ++i) {
    const double sigma = softplus(rp[i]);
    const double log_sigma = rp[i] < -20.0 ? rp[i] : std::log(sigma);
    ref += std::log(s) - log_sigma + (sigma * sigma + mp[i] * mp[i]) / (2.0 * s * s) - 0.5;
    ref_gmu[i] = g * mp[i] / (s * s);
    ref_grho[i] = g * (sigma / (s * s) - 1.0 / sigma) * sigmoid(rp[i]);
  }
  const double got = kl.call(mu, rho, s).item<double>();
  check(std::fabs(got - ref) <= tol * std::fabs(ref),
        std::string("gaussian_kl ") + name + " " + std::to_string(got) + " vs " + std::to_string(ref));
  const auto grads = kl_backward.call(at::scalar_tensor(g, dbl), mu, rho, s);
  // relative error: grad_rho spans many orders of magnitude (1 / sigma at rho = -30)
  double worst = 0.0;
  const at::Tensor gm = std::get<0>(grads).to(at::kDouble).contiguous(), gr = std::get<1>(grads).to(at::kDouble).contiguous();
  for (int64_t i = 0; i < n; ++i) {
    worst = std::max(worst, std::fabs(gm.data_ptr<double>()[i] - ref_gmu[i]) / (1.0 + std::fabs(ref_gmu[i])));
    worst = std::max(worst, std::fabs(gr.data_ptr<double>()[i] - ref_grho[i]) / (1.0 + std::fabs(ref_grho[i])));
  }
  check(worst <= tol * 10, std::string("gaussian_kl_backward ") + name + " (max rel err " + std::to_string(worst) + ")");
}

// lrt_weight_forward / lrt_weight_backward_ against the closed forms in double.
void test_lrt_weight(at::ScalarType dtype, double tol) {
  using Pair = std::tuple<at::Tensor, at::Tensor>;
  auto forward = op("bayes_ext::lrt_weight_forward").typed<Pair(const at::Tensor&, const at::Tensor&, double)>();
  auto backward = op("bayes_ext::lrt_weight_backward_")
                      .typed<at::Tensor(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, double)>();
  const char* name = dtype == at::kDouble ? "float64" : "float32";
  const int64_t n = 20000;
  const double s = 0.4, g = 0.9;
  const auto dbl = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor mu = at::linspace(-1.0, 1.0, n, dbl).to(dtype);
  const at::Tensor rho = at::linspace(-30.0, 12.0, n, dbl).to(dtype);
  const at::Tensor md = mu.to(at::kDouble).contiguous(), rd = rho.to(at::kDouble).contiguous();
  const double* mp = md.data_ptr<double>();
  const double* rp = rd.data_ptr<double>();
  const Pair out = forward.call(mu, rho, s);
  at::Tensor grad_mu = at::full({n}, 0.25, dbl).to(dtype), grad_rho = at::full({n}, -0.5, dbl).to(dtype);
  const at::Tensor sigma2_again = backward.call(grad_mu, grad_rho, at::scalar_tensor(g, dbl), mu, rho, s);
  const at::Tensor s2 = std::get<0>(out).to(at::kDouble).contiguous();
  const at::Tensor gm = grad_mu.to(at::kDouble).contiguous(), gr = grad_rho.to(at::kDouble).contiguous();
  double kl = 0.0, worst = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double sigma = softplus(rp[i]);
    const double log_sigma = rp[i] < -20.0 ? rp[i] : std::log(sigma);
    kl += std::log(s) - log_sigma + (sigma * sigma + mp[i] * mp[i]) / (2.0 * s * s) - 0.5;
    const double ref_gmu = 0.25 + g * mp[i] / (s * s);
    const double ref_grho = -0.5 * 2.0 * sigma * sigmoid(rp[i]) + g * (sigma / (s * s) - 1.0 / sigma) * sigmoid(rp[i]);
    worst = std::max(worst, std::fabs(s2.data_ptr<double>()[i] - sigma * sigma) / (1.0 + sigma * sigma));
    worst = std::max(worst, std::fabs(gm.data_ptr<double>()[i] - ref_gmu) / (1.0 + std::fabs(ref_gmu)));
    worst = std::max(worst, std::fabs(gr.data_ptr<double>()[i] - ref_grho) / (1.0 + std::fabs(ref_grho)));
  }
  const double got = std::get<1>(out).item<double>();
  check(std::fabs(got - kl) <= tol * std::fabs(kl), std::string("lrt_weight_forward ") + name + " KL");
  check(worst <= tol * 10, std::string("lrt_weight ") + name + " sigma2 / gradients (max rel err " +
                               std::to_string(worst) + ")");
  check(at::equal(sigma2_again, std::get<0>(out)), std::string("lrt_weight_backward_ ") + name + " returns sigma2");
}

void test_errors(const at::Tensor& seed) {
  auto sample = op("bayes_ext::sample_weight")
                    .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, double, double, int64_t,
                                  bool)>();
  const at::Tensor mu = at::zeros({4});
  bool threw = false;
  try {
    sample.call(mu, at::zeros({5}), seed, 0, 0.5, 1.0, 0.1, 0, false);
  } catch (const c10::ValueError&) {
    threw = true;
  }
  check(threw, "sample_weight rejects rho of another shape with ValueError");
  threw = false;
  try {
    sample.call(mu, at::zeros({4}), seed, -1, 0.5, 1.0, 0.1, 0, false);
  } catch (const c10::ValueError&) {
    threw = true;
  }
  check(threw, "sample_weight rejects a negative offset with ValueError");
  threw = false;
  try {
    sample.call(mu, at::zeros({4}), seed.to(at::kInt), 0, 0.5, 1.0, 0.1, 0, false);
  } catch (const c10::TypeError&) {
    threw = true;
  }
  check(threw, "sample_weight rejects an int32 seed with TypeError");
}

}  // namespace

int main() {
  try {
    auto isa = op("bayes_ext::cpu_kernel_isa").typed<std::string()>();
    std::printf("test_dispatch: CPU kernel ISA %s\n", isa.call().c_str());
    // A negative int64 seed is read as its unsigned bits (key words 0xffffffff, 0x89abcdef).
    const int64_t seed_i = static_cast<int64_t>(0x89abcdefffffffffull);
    const at::Tensor seed = at::scalar_tensor(seed_i, at::TensorOptions().dtype(at::kLong)).reshape({1});
    const uint64_t s = static_cast<uint64_t>(seed_i);
    test_philox4x32(seed, s);
    test_normals(seed, s, at::kDouble, 1e-12);
    test_normals(seed, s, at::kFloat, 2e-5);
    test_sample_weight(seed, s, at::kDouble, 1e-12);
    test_sample_weight(seed, s, at::kFloat, 2e-5);
    test_gaussian_kl(at::kDouble, 1e-12);
    test_gaussian_kl(at::kFloat, 1e-5);
    test_lrt_weight(at::kDouble, 1e-12);
    test_lrt_weight(at::kFloat, 1e-5);
    test_errors(seed);
  } catch (const std::exception& e) {
    std::printf("FAIL: exception: %s\n", e.what());
    return 1;
  }
  return bayes_ext_test::finish("test_dispatch");
}
