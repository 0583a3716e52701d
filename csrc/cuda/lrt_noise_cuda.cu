// CUDA implementation of local reparameterisation's output-noise ops (see cpu/lrt_noise_cpu.cpp
// for the semantics). Each thread owns Philox blocks (4 stream elements = 4 tensor elements), so
// the noise is philox_normal's whatever the launch geometry, and no noise tensor is written.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bayes_ext/op_checks.h"
#include "bayes_ext/posterior_math.h"
#include "launch.cuh"
#include "seed_arg.cuh"

namespace bayes_ext {
namespace {

// pass(i, eps_i) for every element i < n, eps_i element i of stream (seed, offset).
template <typename T, typename Pass>
__device__ __forceinline__ void over_noise(int64_t n, const SeedArg& seed_arg, uint64_t offset, Pass pass) {
  const uint64_t seed = load_seed(seed_arg);
  const int64_t num_blocks = (n + 3) / 4;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < num_blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T eps[4];
    block_normals<T>(seed, offset, static_cast<uint64_t>(b), eps);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * b + k;
      if (i < n) pass(i, eps[k]);
    }
  }
}

template <typename T>
__global__ void lrt_output_kernel(const T* __restrict__ mean, T* __restrict__ var_std, T* __restrict__ y, int64_t n,
                                  SeedArg seed_arg, uint64_t offset) {
  over_noise<T>(n, seed_arg, offset, [&](int64_t i, T eps) {
    const T v = var_std[i];
    const T s = bx_sqrt(v < T(0) ? T(0) : v);  // a NaN variance stays NaN, as with clamp_min
    var_std[i] = s;
    y[i] = mean[i] + s * eps;
  });
}

template <typename T>
__global__ void lrt_noise_grad_kernel(const T* __restrict__ grad, const T* __restrict__ std, T* __restrict__ half_u,
                                      int64_t n, SeedArg seed_arg, uint64_t offset) {
  over_noise<T>(n, seed_arg, offset, [&](int64_t i, T eps) {
    const T s = std[i];
    const bool positive = s > T(0);
    half_u[i] = positive ? grad[i] * eps / s * T(0.5) : T(0);
  });
}

int64_t grid_for_elements(int64_t n) { return capped_grid((n + 3) / 4, 65535); }

// launch(base, len, seed_arg) for each group of the `numel` elements: one group for one seed, N
// equal groups for N seeds (the seed groups of csrc/ops.cpp), a launch each.
template <typename Launch>
void over_seed_groups(const at::Tensor& seed, int64_t numel, Launch launch) {
  const at::Tensor seeds = seed.reshape({-1});
  const int64_t len = numel / seeds.numel();
  if (len == 0) return;
  for (int64_t g = 0; g < seeds.numel(); ++g) launch(g * len, len, make_seed_arg(seeds[g]));
}

at::Tensor lrt_output_cuda(at::Tensor& var, const at::Tensor& mean_in, const at::Tensor& seed, int64_t offset) {
  check_lrt_noise_args(var, "var", mean_in, "mean");
  check_cuda(var, "var");
  TORCH_CHECK_VALUE(var.is_contiguous(), "var must be contiguous (it is overwritten with std)");
  check_seed_groups(seed, var, "var");
  check_offset(offset);
  const c10::cuda::CUDAGuard guard(var.device());
  const at::Tensor mean = mean_in.contiguous();
  at::Tensor y = at::empty(var.sizes(), var.options());
  AT_DISPATCH_FLOATING_TYPES(var.scalar_type(), "lrt_output_cuda", [&] {
    over_seed_groups(seed, var.numel(), [&](int64_t base, int64_t len, const SeedArg& seed_arg) {
      lrt_output_kernel<scalar_t><<<grid_for_elements(len), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          mean.data_ptr<scalar_t>() + base, var.data_ptr<scalar_t>() + base, y.data_ptr<scalar_t>() + base, len,
          seed_arg, static_cast<uint64_t>(offset));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

at::Tensor lrt_noise_grad_cuda(const at::Tensor& grad_in, const at::Tensor& std_in, const at::Tensor& seed,
                               int64_t offset) {
  check_lrt_noise_args(std_in, "std", grad_in, "grad");
  check_cuda(std_in, "std");
  check_seed_groups(seed, std_in, "std");
  check_offset(offset);
  const c10::cuda::CUDAGuard guard(std_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor std = std_in.contiguous();
  at::Tensor half_u = at::empty(std.sizes(), std.options());
  AT_DISPATCH_FLOATING_TYPES(std.scalar_type(), "lrt_noise_grad_cuda", [&] {
    over_seed_groups(seed, std.numel(), [&](int64_t base, int64_t len, const SeedArg& seed_arg) {
      lrt_noise_grad_kernel<scalar_t><<<grid_for_elements(len), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          grad.data_ptr<scalar_t>() + base, std.data_ptr<scalar_t>() + base, half_u.data_ptr<scalar_t>() + base, len,
          seed_arg, static_cast<uint64_t>(offset));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return half_u;
}

}  // namespace

TORCH_LIBRARY_IMPL(bayes_ext, CUDA, m) {
  m.impl("lrt_output_", &lrt_output_cuda);
  m.impl("lrt_noise_grad", &lrt_noise_grad_cuda);
}

}  // namespace bayes_ext
