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

inline at::Tensor philox_normal(const at::Tensor& like, const at::Tensor& seed, int64_t offset, int64_t start) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::philox_normal", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  return op.call(like, seed, offset, start);
}

}  // namespace op_calls
}  // namespace bayes_ext
