// Checks the host float math of csrc/include/bayes_ext (math.h, posterior_math.h) without
// libtorch, against double-precision libm:
// - host_logf: within 2 ulp on positive normals, libm's special values (0, negatives, inf, NaN),
//   and equal bit for bit to host_log_positive wherever that is defined;
// - log1p_unit_interval: within 2 ulp of log1p on [0, 1] (the range the kernels use: t = exp(-|x|)), exact
//   at 0, NaN for NaN;
// - softplus_terms_nonpositive (the forward's fast path for rho <= 0): sigma bit for bit equal to
//   softplus_terms' (the backward regenerates w with the latter), log sigma within 4 ulp for every
//   rho in [-100, 0] (a dense sample of the floats), and the exact limits (t underflow: log sigma = rho, sigma = 0);
// - softplus_forward_terms (the CUDA forward kernels' choice per element): which side it takes, sigma
//   bit for bit softplus_terms', NaN and the infinities.
// Exits non-zero and names each failed check.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "bayes_ext/posterior_math.h"
#include "check.h"

namespace {

using bayes_ext_test::check;

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

double ulps(float got, double want) {
  const double ulp = std::ldexp(1.0, std::ilogb(static_cast<float>(want)) - 23);
  return std::fabs(static_cast<double>(got) - want) / ulp;
}

void test_log() {
  using bayes_ext::host_log_positive;
  using bayes_ext::host_logf;
  double worst = 0.0;
  bool same = true;
  for (uint32_t bits = 0x00800000u; bits < 0x7F800000u; bits += 97u) {  // positive normals
    float x;
    std::memcpy(&x, &bits, sizeof x);
    const double want = std::log(static_cast<double>(x));
    if (x != 1.0f) worst = std::fmax(worst, ulps(host_logf(x), want));
    same = same && same_bits(host_logf(x), host_log_positive(x));
  }
  check(worst <= 2.0, "host_logf within 2 ulp of log on positive normals");
  check(same, "host_logf equals host_log_positive bit for bit on positive normals");
  check(host_logf(1.0f) == 0.0f, "host_logf(1) == 0");
  check(host_logf(0.0f) == -INFINITY, "host_logf(0) == -inf");
  check(std::isnan(host_logf(-1.0f)), "host_logf(-1) is NaN");
  check(host_logf(INFINITY) == INFINITY, "host_logf(inf) == inf");
  check(std::isnan(host_logf(NAN)), "host_logf(NaN) is NaN");
}

void test_log1p() {
  using bayes_ext::log1p_unit_interval;
  double worst = 0.0;
  for (uint32_t bits = 0x00800000u; bits <= 0x3F800000u; bits += 7u) {  // normals in (0, 1], and 1
    float t;
    std::memcpy(&t, &bits, sizeof t);
    worst = std::fmax(worst, ulps(log1p_unit_interval(t), std::log1p(static_cast<double>(t))));
  }
  check(worst <= 2.0, "log1p_unit_interval within 2 ulp of log1p on (0, 1]");
  check(log1p_unit_interval(0.0f) == 0.0f, "log1p_unit_interval(0) == 0");
  check(std::isnan(log1p_unit_interval(NAN)), "log1p_unit_interval(NaN) is NaN");
}

void test_softplus_nonpositive() {
  using bayes_ext::softplus_terms;
  using bayes_ext::softplus_terms_nonpositive;
  double worst = 0.0;
  bool same_sigma = true;
  // every 251st float of [-100, -2^-126] (1.1e9 floats in all), walking the bit patterns
  for (uint32_t bits = 0xC2C80000u; bits > 0x80800000u; bits -= 251u) {
    float rho;
    std::memcpy(&rho, &bits, sizeof rho);
    const auto fast = softplus_terms_nonpositive(rho);
    same_sigma = same_sigma && same_bits(fast.sigma, softplus_terms(rho).sigma);
    const double want = std::log(std::log1p(std::exp(static_cast<double>(rho))));
    worst = std::fmax(worst, ulps(fast.log_sigma, want));
  }
  check(same_sigma, "softplus_terms_nonpositive's sigma equals softplus_terms' bit for bit on [-100, 0)");
  check(worst <= 4.0, "softplus_terms_nonpositive's log sigma within 4 ulp on [-100, 0)");
  check(ulps(softplus_terms_nonpositive(0.0f).log_sigma, std::log(std::log(2.0))) <= 4.0,
        "softplus_terms_nonpositive(0): log sigma = log(log 2)");
  check(softplus_terms_nonpositive(-90.0f).log_sigma == -90.0f && softplus_terms_nonpositive(-90.0f).sigma == 0.0f,
        "softplus_terms_nonpositive(-90): sigma underflows to 0, log sigma = rho");
}

// softplus_forward_terms (the CUDA forward kernels' per-element choice): the rho <= 0 polynomial
// below 0, the general formula above, NaN and the infinities passed through; sigma the same bits
// as softplus_terms' everywhere (the backward regenerates w with the latter).
void test_softplus_forward() {
  using bayes_ext::softplus_forward_terms;
  using bayes_ext::softplus_terms;
  using bayes_ext::softplus_terms_nonpositive;
  bool same_sigma = true, nonpositive_side = true, positive_side = true;
  for (float rho = -100.0f; rho <= 100.0f; rho += 0.0371f) {
    const auto got = softplus_forward_terms(rho);
    const auto general = softplus_terms(rho);
    same_sigma = same_sigma && same_bits(got.sigma, general.sigma);
    if (rho <= 0.0f) {
      nonpositive_side = nonpositive_side && same_bits(got.log_sigma, softplus_terms_nonpositive(rho).log_sigma);
    } else {
      positive_side = positive_side && same_bits(got.log_sigma, general.log_sigma) &&
                      same_bits(got.sigmoid, general.sigmoid);
    }
  }
  check(same_sigma, "softplus_forward_terms' sigma equals softplus_terms' bit for bit on [-100, 100]");
  check(nonpositive_side, "softplus_forward_terms takes the rho <= 0 polynomial for rho <= 0");
  check(positive_side, "softplus_forward_terms takes the general formula for rho > 0");
  check(same_bits(softplus_forward_terms(0.0f).log_sigma, softplus_terms_nonpositive(0.0f).log_sigma),
        "softplus_forward_terms(0) is on the polynomial's side");
  check(std::isnan(softplus_forward_terms(NAN).sigma) && std::isnan(softplus_forward_terms(NAN).log_sigma),
        "softplus_forward_terms(NaN): NaN sigma and log sigma");
  const auto minus_inf = softplus_forward_terms(-INFINITY);
  check(minus_inf.sigma == 0.0f && minus_inf.log_sigma == -INFINITY,
        "softplus_forward_terms(-inf): sigma 0, log sigma -inf");
  const auto plus_inf = softplus_forward_terms(INFINITY);
  check(plus_inf.sigma == INFINITY && plus_inf.log_sigma == INFINITY,
        "softplus_forward_terms(+inf): sigma and log sigma +inf");
}

}  // namespace

int main() {
  test_log();
  test_log1p();
  test_softplus_nonpositive();
  test_softplus_forward();
  return bayes_ext_test::finish("test_host_math");
}
