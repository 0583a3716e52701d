// CUDA implementation of local reparameterisation's weight-sized passes (see
// cpu/lrt_weight_cpu.cpp). The KL is reduced per CUDA block into partials summed in a fixed order
// by finalize.cuh (a fixed grid for a given size keeps it deterministic); the backward reads
// grad_kl on the device.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "bayes_ext/op_checks.h"
#include "bayes_ext/posterior_math.h"
#include "block_sum.cuh"
#include "finalize.cuh"
#include "launch.cuh"

namespace bayes_ext {
namespace {

template <typename T, bool WithKl>
__global__ void lrt_forward_kernel(const T* __restrict__ mu, const T* __restrict__ rho, T* __restrict__ sigma2,
                                   int64_t n, T inv_two_var, double* __restrict__ partials) {
  __shared__ T shared[32];
  T acc = T(0);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Softplus<T> sp = softplus_forward_terms(rho[i]);
    const T s2 = sp.sigma * sp.sigma;
    sigma2[i] = s2;
    if (WithKl) acc += (s2 + mu[i] * mu[i]) * inv_two_var - sp.log_sigma;
  }
  if (WithKl) {
    acc = block_sum(acc, shared);
    if (threadIdx.x == 0) partials[blockIdx.x] = static_cast<double>(acc);
  }
}

template <typename T>
__global__ void lrt_backward_kernel(const T* __restrict__ grad_kl, const T* __restrict__ mu,
                                    const T* __restrict__ rho, T* __restrict__ grad_mu, T* __restrict__ grad_rho,
                                    T* __restrict__ sigma2, int64_t n, T inv_var) {
  const T g = grad_kl == nullptr ? T(0) : *grad_kl;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Softplus<T> sp = softplus_terms(rho[i]);
    const T sigma_sigmoid = sp.sigma * sp.sigmoid;
    sigma2[i] = sp.sigma * sp.sigma;
    grad_rho[i] = grad_rho[i] * T(2) * sigma_sigmoid + g * (sigma_sigmoid * inv_var - sp.dlog_sigma);
    grad_mu[i] += g * inv_var * mu[i];
  }
}

std::tuple<at::Tensor, at::Tensor> lrt_weight_forward_cuda(const at::Tensor& mu_in, const at::Tensor& rho_in,
                                                           double prior_sigma) {
  check_posterior_params(mu_in, rho_in);
  check_optional_prior_sigma(prior_sigma);
  check_cuda(mu_in);
  const c10::cuda::CUDAGuard guard(mu_in.device());
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const int64_t n = mu.numel();
  const bool with_kl = prior_sigma > 0.0;
  const int64_t grid = capped_grid(n);
  at::Tensor sigma2 = at::empty(mu.sizes(), mu.options());
  at::Tensor partials = partials_for(grid, 1, mu);
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "lrt_weight_forward_cuda", [&] {
      auto kernel = with_kl ? lrt_forward_kernel<scalar_t, true> : lrt_forward_kernel<scalar_t, false>;
      const scalar_t inv_two_var = with_kl ? static_cast<scalar_t>(0.5 / (prior_sigma * prior_sigma)) : scalar_t(0);
      kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          mu.data_ptr<scalar_t>(), rho.data_ptr<scalar_t>(), sigma2.data_ptr<scalar_t>(), n, inv_two_var,
          partials.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const double constant = with_kl ? (std::log(prior_sigma) - 0.5) * static_cast<double>(n) : 0.0;
  return {sigma2, finalize_partials(partials, n > 0 && with_kl ? grid : 0, constant, 0.0, mu).first};
}

at::Tensor lrt_weight_backward_cuda(at::Tensor& grad_mu, at::Tensor& grad_rho, const at::Tensor& grad_kl,
                              const at::Tensor& mu_in, const at::Tensor& rho_in, double prior_sigma) {
  check_posterior_params(mu_in, rho_in);
  check_optional_prior_sigma(prior_sigma);
  check_cuda(mu_in);
  check_scalar_grad(grad_kl, mu_in, "grad_kl");
  check_accumulator(grad_mu, mu_in, "grad_mu");
  check_accumulator(grad_rho, mu_in, "grad_rho");
  const c10::cuda::CUDAGuard guard(mu_in.device());
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const int64_t n = mu.numel();
  const bool with_kl = prior_sigma > 0.0;
  const at::Tensor g = grad_kl.reshape({}).to(mu.device(), mu.scalar_type());
  at::Tensor sigma2 = at::empty(mu.sizes(), mu.options());
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "lrt_weight_backward_cuda", [&] {
      const scalar_t inv_var = with_kl ? static_cast<scalar_t>(1.0 / (prior_sigma * prior_sigma)) : scalar_t(0);
      lrt_backward_kernel<scalar_t><<<capped_grid(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          with_kl ? g.data_ptr<scalar_t>() : nullptr, mu.data_ptr<scalar_t>(), rho.data_ptr<scalar_t>(),
          grad_mu.data_ptr<scalar_t>(), grad_rho.data_ptr<scalar_t>(), sigma2.data_ptr<scalar_t>(), n, inv_var);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return sigma2;
}

}  // namespace

TORCH_LIBRARY_IMPL(bayes_ext, CUDA, m) {
  m.impl("lrt_weight_forward", &lrt_weight_forward_cuda);
  m.impl("lrt_weight_backward_", &lrt_weight_backward_cuda);
}

}  // namespace bayes_ext
