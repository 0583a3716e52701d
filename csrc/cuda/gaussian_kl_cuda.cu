// CUDA implementation of the closed-form KL ops (see cpu/gaussian_kl_cpu.cpp). The sum is reduced
// per CUDA block into a partials buffer summed in a fixed order by finalize.cuh (a fixed grid for a
// given size keeps it deterministic); the backward reads the incoming gradient on the device (no host sync).
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

template <typename T>
__global__ void kl_kernel(const T* __restrict__ mu, const T* __restrict__ rho, int64_t n, T inv_two_var,
                          double* __restrict__ partials) {
  __shared__ T shared[32];
  T acc = T(0);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    acc += gaussian_kl_term(mu[i], rho[i], inv_two_var);
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = static_cast<double>(acc);
}

template <typename T>
__global__ void kl_backward_kernel(const T* __restrict__ grad, const T* __restrict__ mu, const T* __restrict__ rho,
                                   T* __restrict__ grad_mu, T* __restrict__ grad_rho, int64_t n, T inv_var) {
  const T g = *grad;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    gaussian_kl_grads(g, mu[i], rho[i], inv_var, grad_mu + i, grad_rho + i);
}

at::Tensor gaussian_kl_cuda(const at::Tensor& mu_in, const at::Tensor& rho_in, double prior_sigma) {
  check_posterior_params(mu_in, rho_in);
  check_prior_sigma(prior_sigma);
  check_cuda(mu_in);
  const c10::cuda::CUDAGuard guard(mu_in.device());
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const int64_t n = mu.numel();
  const int64_t grid = capped_grid(n);
  at::Tensor partials = partials_for(grid, 1, mu);
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "gaussian_kl_cuda", [&] {
      kl_kernel<scalar_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          mu.data_ptr<scalar_t>(), rho.data_ptr<scalar_t>(), n,
          static_cast<scalar_t>(0.5 / (prior_sigma * prior_sigma)), partials.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const double constant = (std::log(prior_sigma) - 0.5) * static_cast<double>(n);
  return finalize_partials(partials, n > 0 ? grid : 0, constant, 0.0, mu).first;
}

std::tuple<at::Tensor, at::Tensor> gaussian_kl_backward_cuda(const at::Tensor& grad, const at::Tensor& mu_in,
                                                             const at::Tensor& rho_in, double prior_sigma) {
  check_posterior_params(mu_in, rho_in);
  check_prior_sigma(prior_sigma);
  check_scalar_grad(grad, mu_in, "grad");
  check_cuda(mu_in);
  const c10::cuda::CUDAGuard guard(mu_in.device());
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const int64_t n = mu.numel();
  const at::Tensor g = grad.reshape({}).to(mu.device(), mu.scalar_type());
  at::Tensor grad_mu = at::empty(mu.sizes(), mu.options());
  at::Tensor grad_rho = at::empty(mu.sizes(), mu.options());
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "gaussian_kl_backward_cuda", [&] {
      kl_backward_kernel<scalar_t><<<capped_grid(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          g.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(), rho.data_ptr<scalar_t>(), grad_mu.data_ptr<scalar_t>(),
          grad_rho.data_ptr<scalar_t>(), n, static_cast<scalar_t>(1.0 / (prior_sigma * prior_sigma)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_mu, grad_rho};
}

}  // namespace

TORCH_LIBRARY_IMPL(bayes_ext, CUDA, m) {
  m.impl("gaussian_kl", &gaussian_kl_cuda);
  m.impl("gaussian_kl_backward", &gaussian_kl_backward_cuda);
}

}  // namespace bayes_ext
