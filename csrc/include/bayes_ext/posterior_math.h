// Per-element formulas of the Gaussian variational posterior and the scale-mixture prior, shared
// by the CPU and CUDA kernels. See docs/design.md for the derivation of the gradients.
#pragma once

#include "bayes_ext/math.h"
#include "bayes_ext/philox.h"

namespace bayes_ext {

// Below this rho, softplus(rho) = exp(rho) to within exp(2 rho): log sigma is rho itself and
// sigmoid / softplus is 1. Using these limits keeps log q and its gradient exact where sigma
// underflows.
constexpr double kSoftplusTinyRho = -20.0;

// log(pi N(w; 0, s1) + (1 - pi) N(w; 0, s2)) written as a logsumexp of two quadratics
// l_k = a_k - b_k w^2, so it is finite for every w. mode 1: pi = 1 (only s1); mode 2: pi = 0.
template <typename T>
struct ScaleMixturePrior {
  T a1, b1, a2, b2;
  int mode;  // 0 mixture, 1 first component only, 2 second component only
};

// Host only: the kernels receive the finished constants.
template <typename T>
static inline ScaleMixturePrior<T> make_prior(double pi, double sigma1, double sigma2) {
  const double half_log_2pi = 0.91893853320467274178;
  ScaleMixturePrior<T> p;
  p.mode = pi >= 1.0 ? 1 : (pi <= 0.0 ? 2 : 0);
  const double log_pi1 = p.mode == 2 ? 0.0 : std::log(pi >= 1.0 ? 1.0 : pi);
  const double log_pi2 = p.mode == 1 ? 0.0 : std::log(pi <= 0.0 ? 1.0 : 1.0 - pi);
  p.a1 = static_cast<T>(log_pi1 - std::log(sigma1) - half_log_2pi);
  p.b1 = static_cast<T>(0.5 / (sigma1 * sigma1));
  p.a2 = static_cast<T>(log_pi2 - std::log(sigma2) - half_log_2pi);
  p.b2 = static_cast<T>(0.5 / (sigma2 * sigma2));
  return p;
}

// Mode is ScaleMixturePrior::mode as a compile-time constant, so vectorised CPU loops carry no
// branch on it (GCC will not vectorise the run-time select).
template <int Mode, typename T>
BAYES_HOST_DEVICE T log_prior_mode(T w, const ScaleMixturePrior<T>& p) {
  const T w2 = w * w;
  const T l1 = p.a1 - p.b1 * w2;
  const T l2 = p.a2 - p.b2 * w2;
  if (Mode == 1) return l1;
  if (Mode == 2) return l2;
  // Both components are -inf at w = +-inf: d would be NaN, but log p is -inf there.
  const T d = (l1 - l2 == l1 - l2) ? l1 - l2 : T(0);
  const T m = d > T(0) ? l1 : l2;
  return m + bx_log1p(bx_exp(d > T(0) ? -d : d));
}

// d log p / d w.
template <int Mode, typename T>
BAYES_HOST_DEVICE T dlog_prior_mode(T w, const ScaleMixturePrior<T>& p) {
  if (Mode == 1) return T(-2) * w * p.b1;
  if (Mode == 2) return T(-2) * w * p.b2;
  const T w2 = w * w;
  const T d = (p.a1 - p.b1 * w2) - (p.a2 - p.b2 * w2);
  // responsibility of component 1 = sigmoid(d), computed without overflow
  const T t = bx_exp(d > T(0) ? -d : d);
  const T r1 = d > T(0) ? T(1) / (T(1) + t) : t / (T(1) + t);
  return T(-2) * w * (r1 * p.b1 + (T(1) - r1) * p.b2);
}

template <typename T>
BAYES_HOST_DEVICE T log_prior(T w, const ScaleMixturePrior<T>& p) {
  return p.mode == 1 ? log_prior_mode<1>(w, p) : (p.mode == 2 ? log_prior_mode<2>(w, p) : log_prior_mode<0>(w, p));
}

template <typename T>
BAYES_HOST_DEVICE T dlog_prior(T w, const ScaleMixturePrior<T>& p) {
  return p.mode == 1 ? dlog_prior_mode<1>(w, p) : (p.mode == 2 ? dlog_prior_mode<2>(w, p) : dlog_prior_mode<0>(w, p));
}

// sigma = softplus(rho) = max(rho, 0) + log1p(exp(-|rho|)) and log sigma.
template <typename T>
struct Softplus {
  T sigma, log_sigma, sigmoid, dlog_sigma;  // dlog_sigma = sigmoid(rho) / softplus(rho)
};

// sigma = softplus(rho) = max(rho, 0) + log1p(t), t = exp(-|rho|) in (0, 1]: the one expression
// every variant below uses, so the forward's sigma and the backward's agree bit for bit.
template <typename T>
BAYES_HOST_DEVICE T softplus_sigma(T rho, T* t_out) {
  const T t = bx_exp(rho > T(0) ? -rho : rho);
  *t_out = t;
  return (rho > T(0) ? rho : T(0)) + bx_log1p(t);
}

template <typename T>
BAYES_HOST_DEVICE Softplus<T> softplus_terms(T rho) {
  T t;
  Softplus<T> s;
  s.sigma = softplus_sigma(rho, &t);
  // Below the threshold sigma is exp(rho) to within exp(2 rho) (and 0 in fp32 below -87): use the
  // limits, log sigma = rho and sigmoid / sigma = 1 - t / 2.
  const bool tiny = rho < T(kSoftplusTinyRho);
  // sigma >= softplus(-20) is normal here; inf and NaN (from rho) pass through unchanged.
  const bool finite = s.sigma <= T(3.4028234663852886e+38);
  s.log_sigma = tiny ? rho : (finite ? bx_log_positive(s.sigma) : s.sigma);
  // sigmoid = num / (1 + t) and sigmoid / sigma from one division (divisions are the slowest
  // vector instructions in the backward pass).
  const T num = rho > T(0) ? T(1) : t;
  const T sigma_safe = tiny ? T(1) : s.sigma;
  const T inv = T(1) / ((T(1) + t) * sigma_safe);
  s.sigmoid = num * inv * sigma_safe;
  s.dlog_sigma = tiny ? T(1) - T(0.5) * t : num * inv;
  return s;
}

// sigma and log sigma for rho <= 0 (the usual range: rho is initialised well below 0), where
// softplus(rho) = log1p(t) with t = exp(rho) in (0, 1] and log sigma = rho + log(log1p(t) / t):
// the second term is a smooth function of t on [0, 1], here a degree-8 polynomial (least-squares
// fit, max error 1e-8, below fp32's rounding of log sigma), which costs half a log. Exact limits:
// t -> 0 gives log sigma = rho, and exp(rho) = 0 below -87 gives sigma = 0. The polynomial is
// for fp32; double (gradcheck, references) keeps the exact formula.
template <typename T>
BAYES_HOST_DEVICE Softplus<T> softplus_terms_nonpositive(T rho) {
  if (sizeof(T) > sizeof(float)) return softplus_terms(rho);
  T t;  // exp(rho) here
  Softplus<T> s;
  s.sigma = softplus_sigma(rho, &t);
  T p = T(0.002048094);
  p = p * t + T(-0.011564141);
  p = p * t + T(0.031046841);
  p = p * t + T(-0.056129634);
  p = p * t + T(0.0843194);
  p = p * t + T(-0.12452917);
  p = p * t + T(0.2082946);
  p = p * t + T(-0.4999989);
  s.log_sigma = rho + t * p;
  s.sigmoid = T(0);
  s.dlog_sigma = T(0);
  return s;
}

// sigma and log sigma for the forward passes on the GPU (sigmoid and dlog_sigma are not set for
// rho <= 0): per element, the polynomial above where rho <= 0, the general formula elsewhere. Warps
// whose rho are all <= 0 (the usual case) take one side; the log it saves was 12% of the sampling
// kernel on an H200 (bench/results/cuda_sample_kernel_variants_nvidia-h200.md). The CPU range
// kernels make the same choice per tile instead (range_kernels.h), so that one select serves a
// whole vector. sigma is the same bits on either side.
template <typename T>
BAYES_HOST_DEVICE Softplus<T> softplus_forward_terms(T rho) {
  if (rho <= T(0)) return softplus_terms_nonpositive(rho);
  return softplus_terms(rho);
}

// Closed-form KL(N(mu, sigma^2) || N(0, s^2)) = log s - 1/2 + (sigma^2 + mu^2) / (2 s^2) - log sigma
// per element, without the constant log s - 1/2 (added once per tensor); sigma = softplus(rho).
template <typename T>
BAYES_HOST_DEVICE T gaussian_kl_term_of(T mu, const Softplus<T>& sp, T inv_two_var) {
  return (sp.sigma * sp.sigma + mu * mu) * inv_two_var - sp.log_sigma;
}

template <typename T>
BAYES_HOST_DEVICE T gaussian_kl_term(T mu, T rho, T inv_two_var) {
  return gaussian_kl_term_of(mu, softplus_terms(rho), inv_two_var);
}

// g times its gradients: d/dmu = mu / s^2, d/drho = (sigma / s^2 - 1 / sigma) sigmoid(rho).
template <typename T>
BAYES_HOST_DEVICE void gaussian_kl_grads(T g, T mu, T rho, T inv_var, T* grad_mu, T* grad_rho) {
  const Softplus<T> sp = softplus_terms(rho);
  *grad_mu = g * inv_var * mu;
  *grad_rho = g * (sp.sigma * sp.sigmoid * inv_var - sp.dlog_sigma);
}

// Standard normals for the four elements of one Philox block (docs/design.md).
template <typename T>
BAYES_HOST_DEVICE void block_normals(uint64_t seed, uint64_t offset, uint64_t block, T eps[4]) {
  const PhiloxOut x = philox_block(seed, offset, block);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int pair = 0; pair < 2; ++pair) {
    const T u = radius_uniform<T>(x.x[2 * pair]);
    const T v = angle_uniform<T>(x.x[2 * pair + 1]);
    const T r = bx_sqrt(T(-2) * bx_log_positive(u));  // u in [2^-24, 1]
    T s, c;
    bx_sincos_2pi(v, &s, &c);
    eps[2 * pair] = r * c;
    eps[2 * pair + 1] = r * s;
  }
}

}  // namespace bayes_ext
