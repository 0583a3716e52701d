// bayes_ext::sample_weight_bias_as and sample_weight_bias_backward_ on any device: a linear layer's
// weight (stream (seed, 0)) and bias ((seed, 1)) as two calls of the one-tensor ops, which is what
// the ops are defined to equal. The CUDA kernels (cuda/sample_weight_bias_cuda.cu) do both tensors
// in one launch each way, bit for bit the same; on the CPU a call costs no launch, so the two calls
// are the kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "bayes_ext/op_checks.h"
#include "op_calls.h"

namespace bayes_ext {
namespace {

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Quad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (w, b, log_q, log_p): W and b in `dtype`, log q / log p of both (W's plus b's, in the weights' dtype).
Quad sample_weight_bias_as_composite(const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                                     const at::Tensor& bias_mu, const at::Tensor& bias_rho, const at::Tensor& seed,
                                     double pi, double sigma1, double sigma2, at::ScalarType dtype) {
  check_weight_bias_params(weight_mu, weight_rho, bias_mu, bias_rho);
  auto [w, log_q, log_p] = op_calls::sample_weight_as(weight_mu, weight_rho, seed, 0, pi, sigma1, sigma2, dtype, true);
  auto [b, log_q_b, log_p_b] = op_calls::sample_weight_as(bias_mu, bias_rho, seed, 1, pi, sigma1, sigma2, dtype, true);
  return {w, b, log_q + log_q_b, log_p + log_p_b};
}

// grad_weight: dL/dW on entry, grad_weight_mu on exit; returns (grad_weight_rho, grad_bias_mu,
// grad_bias_rho) for grad_bias = dL/db and the incoming gradients of the summed log q / log p.
Triple sample_weight_bias_backward_composite(at::Tensor& grad_weight, const at::Tensor& grad_bias,
                                             const at::Tensor& grad_log_q, const at::Tensor& grad_log_p,
                                             const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                                             const at::Tensor& bias_mu, const at::Tensor& bias_rho,
                                             const at::Tensor& seed, double pi, double sigma1, double sigma2) {
  check_weight_bias_params(weight_mu, weight_rho, bias_mu, bias_rho);
  check_accumulator(grad_weight, weight_mu, "grad_weight");
  check_matches(grad_bias, "grad_bias", bias_mu, "bias_mu");
  // the CPU kernels take __restrict__ pointers: no in-place call, the result is copied in
  auto [grad_weight_mu, grad_weight_rho, unused_w] = op_calls::sample_weight_backward(
      grad_weight, grad_log_q, grad_log_p, weight_mu, weight_rho, seed, 0, pi, sigma1, sigma2, false, 0, false);
  grad_weight.copy_(grad_weight_mu);
  auto [grad_bias_mu, grad_bias_rho, unused_b] = op_calls::sample_weight_backward(
      grad_bias, grad_log_q, grad_log_p, bias_mu, bias_rho, seed, 1, pi, sigma1, sigma2, false, 0, false);
  return {grad_weight_rho, grad_bias_mu, grad_bias_rho};
}

}  // namespace

// Every backend without a kernel of its own (the CUDA kernels, where built, take precedence).
TORCH_LIBRARY_IMPL(bayes_ext, CompositeExplicitAutograd, m) {
  m.impl("sample_weight_bias_as", &sample_weight_bias_as_composite);
  m.impl("sample_weight_bias_backward_", &sample_weight_bias_backward_composite);
}

}  // namespace bayes_ext
