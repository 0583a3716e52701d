// CPU implementation of the closed-form KL ops: sum over a tensor of KL(N(mu, softplus(rho)^2) ||
// N(0, s^2)) and its gradients, one vectorised pass each (the range kernels for this CPU's
// instruction set come from kernel_dispatch.h). For layers that sample no weight (local
// reparameterisation) and for embedding tables, where this pass is the only one whose cost
// follows the table size.
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
#include "range_kernels_api.h"

namespace bayes_ext {
namespace {

using namespace cpu_kernel;

at::Tensor gaussian_kl_cpu(const at::Tensor& mu_in, const at::Tensor& rho_in, double prior_sigma) {
  check_posterior_params(mu_in, rho_in);
  check_prior_sigma(prior_sigma);
  check_cpu(mu_in);
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const int64_t n = mu.numel();
  const int64_t chunks = num_chunks(n);
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "gaussian_kl_cpu", [&] {
    const scalar_t* mu_p = mu.data_ptr<scalar_t>();
    const scalar_t* rho_p = rho.data_ptr<scalar_t>();
    const scalar_t inv_two_var = static_cast<scalar_t>(0.5 / (prior_sigma * prior_sigma));
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        KlRange<scalar_t> a{mu_p, rho_p, c * kChunk, std::min(n, (c + 1) * kChunk), inv_two_var, &partial[c]};
        run_kl_forward(a);
      }
    });
  });
  double sum = (std::log(prior_sigma) - 0.5) * static_cast<double>(n);
  for (double p : partial) sum += p;
  return at::scalar_tensor(sum, mu.options());
}

std::tuple<at::Tensor, at::Tensor> gaussian_kl_backward_cpu(const at::Tensor& grad, const at::Tensor& mu_in,
                                                            const at::Tensor& rho_in, double prior_sigma) {
  check_posterior_params(mu_in, rho_in);
  check_prior_sigma(prior_sigma);
  check_scalar_grad(grad, mu_in, "grad");
  check_cpu(mu_in);
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const int64_t n = mu.numel();
  // Written in full by the kernel: no zero-fill pass (on a big table the first touch of fresh
  // pages is itself a large part of the cost, and the two threads share it).
  at::Tensor grad_mu = at::empty(mu.sizes(), mu.options());
  at::Tensor grad_rho = at::empty(mu.sizes(), mu.options());
  const double g = grad.item<double>();
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "gaussian_kl_backward_cpu", [&] {
    const scalar_t* mu_p = mu.data_ptr<scalar_t>();
    const scalar_t* rho_p = rho.data_ptr<scalar_t>();
    scalar_t* gmu_p = grad_mu.data_ptr<scalar_t>();
    scalar_t* grho_p = grad_rho.data_ptr<scalar_t>();
    const scalar_t inv_var = static_cast<scalar_t>(1.0 / (prior_sigma * prior_sigma));
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      KlBackwardRange<scalar_t> a{mu_p, rho_p, gmu_p, grho_p, begin, end, static_cast<scalar_t>(g), inv_var};
      run_kl_backward(a);
    });
  });
  return {grad_mu, grad_rho};
}

}  // namespace

TORCH_LIBRARY_IMPL(bayes_ext, CPU, m) {
  m.impl("gaussian_kl", &gaussian_kl_cpu);
  m.impl("gaussian_kl_backward", &gaussian_kl_backward_cpu);
}

}  // namespace bayes_ext
