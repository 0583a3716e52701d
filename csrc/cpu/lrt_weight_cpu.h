// Local reparameterisation's weight-sized passes on the CPU (lrt_weight_cpu.cpp), writing sigma^2
// into a tensor the caller gives: the registered ops bayes_ext::lrt_weight_forward / _backward_
// pass a fresh one, the whole-layer op (linear_lrt_cpu.cpp) its per-thread scratch (scratch.h).
// sigma2 must be contiguous with mu's shape, dtype and device.
#pragma once

#include <ATen/ATen.h>

namespace bayes_ext {

// sigma2 = softplus(rho)^2; returns the closed-form KL(N(mu, sigma^2) || N(0, prior_sigma^2))
// summed in double (0 when prior_sigma = 0).
double lrt_weight_forward_into(at::Tensor& sigma2, const at::Tensor& mu, const at::Tensor& rho, double prior_sigma);

// In place over the GEMMs' outputs: grad_rho (dL/dsigma^2 in) becomes dL/drho and grad_mu gains
// the KL's gradient, both with grad_kl's weight; sigma2 = softplus(rho)^2 for dL/dx.
void lrt_weight_backward_into(at::Tensor& sigma2, at::Tensor& grad_mu, at::Tensor& grad_rho, const at::Tensor& grad_kl,
                              const at::Tensor& mu, const at::Tensor& rho, double prior_sigma);

}  // namespace bayes_ext
