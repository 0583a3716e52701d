// CPU implementation of local reparameterisation's weight-sized passes (the GEMMs are torch's):
// forward sigma2 = softplus(rho)^2 with the closed-form KL in the same pass, backward the rho / mu
// gradients (through sigma2 and the KL) in one in-place pass over the GEMMs' outputs. Each replaces
// four to six torch elementwise passes. The passes write sigma2 where the caller says
// (lrt_weight_cpu.h); the registered ops below give them a fresh tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "bayes_ext/op_checks.h"
#include "bayes_ext/posterior_math.h"
#include "chunks.h"
#include "kernel_dispatch.h"
#include "lrt_weight_cpu.h"
#include "range_kernels_api.h"

namespace bayes_ext {

using namespace cpu_kernel;

double lrt_weight_forward_into(at::Tensor& sigma2, const at::Tensor& mu_in, const at::Tensor& rho_in,
                               double prior_sigma) {
  check_posterior_params(mu_in, rho_in);
  check_optional_prior_sigma(prior_sigma);
  check_cpu(mu_in);
  check_accumulator(sigma2, mu_in, "sigma2");
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const int64_t n = mu.numel();
  const bool with_kl = prior_sigma > 0.0;
  const int64_t chunks = num_chunks(n);
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "lrt_weight_forward_cpu", [&] {
    const scalar_t* mu_p = mu.data_ptr<scalar_t>();
    const scalar_t* rho_p = rho.data_ptr<scalar_t>();
    scalar_t* s2_p = sigma2.data_ptr<scalar_t>();
    const scalar_t inv_two_var = with_kl ? static_cast<scalar_t>(0.5 / (prior_sigma * prior_sigma)) : scalar_t(0);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        LrtForwardRange<scalar_t> a{mu_p, rho_p, s2_p, c * kChunk, std::min(n, (c + 1) * kChunk),
                                    inv_two_var, with_kl ? &partial[c] : nullptr};
        run_lrt_forward(a);
      }
    });
  });
  double kl = 0.0;
  if (with_kl) {
    kl = (std::log(prior_sigma) - 0.5) * static_cast<double>(n);
    for (double p : partial) kl += p;
  }
  return kl;
}

void lrt_weight_backward_into(at::Tensor& sigma2, at::Tensor& grad_mu, at::Tensor& grad_rho, const at::Tensor& grad_kl,
                              const at::Tensor& mu_in, const at::Tensor& rho_in, double prior_sigma) {
  check_posterior_params(mu_in, rho_in);
  check_optional_prior_sigma(prior_sigma);
  check_cpu(mu_in);
  check_scalar_grad(grad_kl, mu_in, "grad_kl");
  check_accumulator(grad_mu, mu_in, "grad_mu");
  check_accumulator(grad_rho, mu_in, "grad_rho");
  check_accumulator(sigma2, mu_in, "sigma2");
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const int64_t n = mu.numel();
  const double g_kl = prior_sigma > 0.0 ? grad_kl.item<double>() : 0.0;
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "lrt_weight_backward_cpu", [&] {
    const scalar_t* mu_p = mu.data_ptr<scalar_t>();
    const scalar_t* rho_p = rho.data_ptr<scalar_t>();
    scalar_t* gmu_p = grad_mu.data_ptr<scalar_t>();
    scalar_t* grho_p = grad_rho.data_ptr<scalar_t>();
    scalar_t* s2_p = sigma2.data_ptr<scalar_t>();
    const scalar_t inv_var = prior_sigma > 0.0 ? static_cast<scalar_t>(1.0 / (prior_sigma * prior_sigma)) : scalar_t(0);
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      LrtBackwardRange<scalar_t> a{mu_p, rho_p, gmu_p, grho_p, s2_p, begin, end, static_cast<scalar_t>(g_kl), inv_var};
      run_lrt_backward(a);
    });
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor> lrt_weight_forward_cpu(const at::Tensor& mu, const at::Tensor& rho,
                                                          double prior_sigma) {
  at::Tensor sigma2 = at::empty(mu.sizes(), mu.options());
  const double kl = lrt_weight_forward_into(sigma2, mu, rho, prior_sigma);
  return {sigma2, at::scalar_tensor(kl, mu.options())};
}

at::Tensor lrt_weight_backward_cpu(at::Tensor& grad_mu, at::Tensor& grad_rho, const at::Tensor& grad_kl,
                                   const at::Tensor& mu, const at::Tensor& rho, double prior_sigma) {
  at::Tensor sigma2 = at::empty(mu.sizes(), mu.options());
  lrt_weight_backward_into(sigma2, grad_mu, grad_rho, grad_kl, mu, rho, prior_sigma);
  return sigma2;
}

}  // namespace

TORCH_LIBRARY_IMPL(bayes_ext, CPU, m) {
  m.impl("lrt_weight_forward", &lrt_weight_forward_cpu);
  m.impl("lrt_weight_backward_", &lrt_weight_backward_cpu);
}

}  // namespace bayes_ext
