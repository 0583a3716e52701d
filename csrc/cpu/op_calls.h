// Typed calls through the dispatcher of the sampling ops that the whole-layer CPU ops
// (linear_*_cpu.cpp) build on, one per op with its full schema (csrc/ops.cpp documents the
// arguments). Through the dispatcher, not the kernels: below autograd a call reaches the CPU kernel
// (or a fake one for fake tensors).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

namespace bayes_ext {
namespace op_calls {

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

inline Triple sample_weight(const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& seed, int64_t offset,
                            double pi, double sigma1, double sigma2, int64_t start, bool noise_only) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::sample_weight", "")
                       .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, double,
                                     double, int64_t, bool)>();
  return op.call(mu, rho, seed, offset, pi, sigma1, sigma2, start, noise_only);
}

inline Triple sample_weight_backward(const c10::optional<at::Tensor>& grad_w, const at::Tensor& grad_log_q,
                                     const at::Tensor& grad_log_p, const at::Tensor& mu, const at::Tensor& rho,
                                     const at::Tensor& seed, int64_t offset, double pi, double sigma1, double sigma2,
                                     bool return_weight, int64_t start, bool noise_only) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::sample_weight_backward", "")
                       .typed<Triple(const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, double,
                                     double, bool, int64_t, bool)>();
  return op.call(grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset, pi, sigma1, sigma2, return_weight, start,
                 noise_only);
}

inline at::Tensor sample_weight_backward_into(at::Tensor& grad_mu, at::Tensor& grad_rho,
                                              const c10::optional<at::Tensor>& grad_w, const at::Tensor& grad_log_q,
                                              const at::Tensor& grad_log_p, const at::Tensor& mu,
                                              const at::Tensor& rho, const at::Tensor& seed, int64_t offset, double pi,
                                              double sigma1, double sigma2, bool return_weight, int64_t start,
                                              bool noise_only) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::sample_weight_backward_into", "")
                       .typed<at::Tensor(at::Tensor&, at::Tensor&, const c10::optional<at::Tensor>&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t, double, double, double, bool, int64_t, bool)>();
  return op.call(grad_mu, grad_rho, grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset, pi, sigma1, sigma2,
                 return_weight, start, noise_only);
}

// w in `dtype` (on CUDA written by the sampling kernel itself), log q / log p only when with_kl.
inline Triple sample_weight_as(const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& seed, int64_t offset,
                               double pi, double sigma1, double sigma2, at::ScalarType dtype, bool with_kl) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::sample_weight_as", "")
                       .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, double,
                                     double, at::ScalarType, bool)>();
  return op.call(mu, rho, seed, offset, pi, sigma1, sigma2, dtype, with_kl);
}

// A layer's W (stream 0) and b (stream 1) in one call: (w, b, log_q, log_p), both KL terms summed.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_weight_bias_as(
    const at::Tensor& weight_mu, const at::Tensor& weight_rho, const at::Tensor& bias_mu, const at::Tensor& bias_rho,
    const at::Tensor& seed, double pi, double sigma1, double sigma2, at::ScalarType dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::sample_weight_bias_as", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, double, double, double, at::ScalarType)>();
  return op.call(weight_mu, weight_rho, bias_mu, bias_rho, seed, pi, sigma1, sigma2, dtype);
}

// Its backward: grad_weight (dL/dW) becomes grad_weight_mu; (grad_weight_rho, grad_bias_mu, grad_bias_rho).
inline Triple sample_weight_bias_backward_(at::Tensor& grad_weight, const at::Tensor& grad_bias,
                                           const at::Tensor& grad_log_q, const at::Tensor& grad_log_p,
                                           const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                                           const at::Tensor& bias_mu, const at::Tensor& bias_rho,
                                           const at::Tensor& seed, double pi, double sigma1, double sigma2) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::sample_weight_bias_backward_", "")
                       .typed<Triple(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, double, double, double)>();
  return op.call(grad_weight, grad_bias, grad_log_q, grad_log_p, weight_mu, weight_rho, bias_mu, bias_rho, seed, pi,
                 sigma1, sigma2);
}

inline at::Tensor philox_normal(const at::Tensor& like, const at::Tensor& seed, int64_t offset, int64_t start) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::philox_normal", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  return op.call(like, seed, offset, start);
}

}  // namespace op_calls
}  // namespace bayes_ext
