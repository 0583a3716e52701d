// CUDA implementation of the sampling ops (the per-thread loops: sample_passes.cuh). Each thread
// owns whole Philox blocks (4 elements), so the noise is the same as on the CPU whatever the launch
// geometry. The seed may live on the device (read in the kernel, so CUDA graph replays pick up a
// freshly drawn seed) or on the host. log q / log p are reduced per CUDA block into a partials
// buffer and summed in a fixed order by finalize.cuh: a fixed grid for a given size keeps the
// result deterministic.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bayes_ext/op_checks.h"
#include "bayes_ext/posterior_math.h"
#include "block_sum.cuh"
#include "finalize.cuh"
#include "launch.cuh"
#include "sample_passes.cuh"
#include "seed_arg.cuh"

namespace bayes_ext {
namespace {

int64_t grid_for(int64_t num_philox_blocks) { return capped_grid(num_philox_blocks); }

// WT: W's dtype (T, or bf16 / fp16 for fp32 parameters: sample_weight_as). WithKl = false: no
// log q / log p (their logs and exps are not computed) and no partials written. noise_only: w
// receives w - mu (Flipout's dW), the KL terms stay w's.
template <typename T, bool Vec, typename WT = T, bool WithKl = true>
__global__ void forward_kernel(const T* __restrict__ mu, const T* __restrict__ rho, WT* __restrict__ w, int64_t n,
                               int64_t start, SeedArg seed_arg, uint64_t offset, ScaleMixturePrior<T> prior,
                               double* __restrict__ partials, bool noise_only) {
  __shared__ T shared[32];
  T lq = T(0), lp = T(0);
  sample_pass<T, Vec, WT>(mu, rho, w, n, start, load_seed(seed_arg), offset, prior, noise_only, blockIdx.x,
                          gridDim.x, lq, lp);
  if constexpr (WithKl) {
    lq = block_sum(lq, shared);
    lp = block_sum(lp, shared);
    if (threadIdx.x == 0) {
      partials[2 * blockIdx.x] = static_cast<double>(lq);
      partials[2 * blockIdx.x + 1] = static_cast<double>(lp);
    }
  }
}

// See backward_pass (grad_mu may be grad_w itself).
template <typename T, bool Vec>
__global__ void backward_kernel(const T* grad_w, const T* __restrict__ grad_log_q,
                                const T* __restrict__ grad_log_p, const T* __restrict__ mu,
                                const T* __restrict__ rho, T* grad_mu, T* __restrict__ grad_rho,
                                T* __restrict__ w_out, int64_t n, int64_t start, SeedArg seed_arg, uint64_t offset,
                                ScaleMixturePrior<T> prior, bool noise_only) {
  backward_pass<T, Vec>(grad_w, *grad_log_q, *grad_log_p, mu, rho, grad_mu, grad_rho, w_out, n, start,
                        load_seed(seed_arg), offset, prior, noise_only, blockIdx.x, gridDim.x);
}

template <typename T>
__global__ void normal_kernel(T* __restrict__ out, int64_t n, int64_t start, SeedArg seed_arg, uint64_t offset) {
  const uint64_t seed = load_seed(seed_arg);
  const int64_t first_block = start / 4;
  const int64_t num_blocks = philox_blocks_spanned(n, start);
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < num_blocks;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = first_block + j;
    T eps[4];
    block_normals<T>(seed, offset, static_cast<uint64_t>(b), eps);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * b + k - start;
      if (i >= 0 && i < n) out[i] = eps[k];
    }
  }
}

// (w, log_q, log_p); with write_weight false w is left undefined and only the sums are computed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_cuda(const at::Tensor& mu_in, const at::Tensor& rho_in,
                                                           const at::Tensor& seed, int64_t offset, double prior_pi,
                                                           double prior_sigma1, double prior_sigma2, int64_t start,
                                                           bool write_weight, bool noise_only = false) {
  check_posterior_params(mu_in, rho_in);
  check_cuda(mu_in);
  check_seed(seed, mu_in);
  check_offset(offset);
  check_start(start, mu_in.numel());
  check_prior(prior_pi, prior_sigma1, prior_sigma2);
  const c10::cuda::CUDAGuard guard(mu_in.device());
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const int64_t n = mu.numel();
  at::Tensor w = write_weight ? at::empty(mu.sizes(), mu.options()) : at::Tensor();
  const int64_t grid = grid_for(philox_blocks_spanned(n, start));
  at::Tensor partials = partials_for(grid, 2, mu);
  const SeedArg seed_arg = make_seed_arg(seed);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (n > 0) {
    const void* w_ptr = write_weight ? w.data_ptr() : nullptr;
    if (can_vectorise(mu.scalar_type(), start, mu.data_ptr(), rho.data_ptr(), w_ptr)) {
      forward_kernel<float, true><<<grid, kThreads, 0, stream>>>(
          mu.data_ptr<float>(), rho.data_ptr<float>(), write_weight ? w.data_ptr<float>() : nullptr, n, start,
          seed_arg, static_cast<uint64_t>(offset), make_prior<float>(prior_pi, prior_sigma1, prior_sigma2),
          partials.data_ptr<double>(), noise_only);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "sample_weight_cuda", [&] {
        const auto prior = make_prior<scalar_t>(prior_pi, prior_sigma1, prior_sigma2);
        forward_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
            mu.data_ptr<scalar_t>(), rho.data_ptr<scalar_t>(), write_weight ? w.data_ptr<scalar_t>() : nullptr, n,
            start, seed_arg, static_cast<uint64_t>(offset), prior, partials.data_ptr<double>(), noise_only);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  auto [log_q, log_p] = finalize_partials(partials, n > 0 ? grid : 0, -0.91893853320467274178 * static_cast<double>(n),
                                          0.0, mu);
  return {w, log_q, log_p};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_weight_cuda(const at::Tensor& mu, const at::Tensor& rho,
                                                                  const at::Tensor& seed, int64_t offset, double prior_pi,
                                                                  double prior_sigma1, double prior_sigma2, int64_t start,
                                                                  bool noise_only) {
  return sample_cuda(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start, true, noise_only);
}

std::tuple<at::Tensor, at::Tensor> sample_kl_cuda(const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& seed,
                                                  int64_t offset, double prior_pi, double prior_sigma1,
                                                  double prior_sigma2, int64_t start) {
  const auto out = sample_cuda(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start, false);
  return {std::get<1>(out), std::get<2>(out)};
}

template <typename WT, bool WithKl>
void launch_forward_as(const at::Tensor& mu, const at::Tensor& rho, at::Tensor& w, int64_t grid, const SeedArg& seed_arg,
                       int64_t offset, const ScaleMixturePrior<float>& prior, double* partials) {
  const int64_t n = mu.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  WT* w_ptr = reinterpret_cast<WT*>(w.data_ptr());
  if (can_vectorise(mu.scalar_type(), 0, mu.data_ptr(), rho.data_ptr(), w.data_ptr())) {
    forward_kernel<float, true, WT, WithKl><<<grid, kThreads, 0, stream>>>(
        mu.data_ptr<float>(), rho.data_ptr<float>(), w_ptr, n, 0, seed_arg, static_cast<uint64_t>(offset), prior,
        partials, false);
  } else {
    forward_kernel<float, false, WT, WithKl><<<grid, kThreads, 0, stream>>>(
        mu.data_ptr<float>(), rho.data_ptr<float>(), w_ptr, n, 0, seed_arg, static_cast<uint64_t>(offset), prior,
        partials, false);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename WT>
void launch_forward_as(bool with_kl, const at::Tensor& mu, const at::Tensor& rho, at::Tensor& w, int64_t grid,
                       const SeedArg& seed_arg, int64_t offset, const ScaleMixturePrior<float>& prior,
                       double* partials) {
  if (with_kl) return launch_forward_as<WT, true>(mu, rho, w, grid, seed_arg, offset, prior, partials);
  launch_forward_as<WT, false>(mu, rho, w, grid, seed_arg, offset, prior, partials);
}

// sample_weight's w written in `dtype` by the sampling kernel itself (fp32 parameters into fp32,
// bf16 or fp16): under autocast the layer's W needs no cast kernel, and the rebuilt W of the
// backward (with_kl = false) skips the log q / log p math and their reduction. Other dtype pairs
// sample, then cast.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_weight_as_cuda(const at::Tensor& mu_in, const at::Tensor& rho_in,
                                                                     const at::Tensor& seed, int64_t offset,
                                                                     double prior_pi, double prior_sigma1,
                                                                     double prior_sigma2, at::ScalarType dtype,
                                                                     bool with_kl) {
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "dtype must be a floating-point dtype, got ", dtype);
  check_posterior_params(mu_in, rho_in);
  check_cuda(mu_in);
  check_seed(seed, mu_in);
  check_offset(offset);
  check_prior(prior_pi, prior_sigma1, prior_sigma2);
  const bool direct = mu_in.scalar_type() == at::kFloat &&
                      (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf);
  if (!direct) {
    auto [w, log_q, log_p] = sample_cuda(mu_in, rho_in, seed, offset, prior_pi, prior_sigma1, prior_sigma2, 0, true);
    if (!with_kl) log_q = log_p = at::empty({0}, mu_in.options());
    return {w.to(dtype), log_q, log_p};
  }
  const c10::cuda::CUDAGuard guard(mu_in.device());
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const int64_t n = mu.numel();
  at::Tensor w = at::empty(mu.sizes(), mu.options().dtype(dtype));
  const int64_t grid = grid_for(philox_blocks_spanned(n, 0));
  at::Tensor partials = with_kl ? partials_for(grid, 2, mu) : at::Tensor();
  double* partials_ptr = with_kl ? partials.data_ptr<double>() : nullptr;
  if (n > 0) {
    const SeedArg seed_arg = make_seed_arg(seed);
    const auto prior = make_prior<float>(prior_pi, prior_sigma1, prior_sigma2);
    if (dtype == at::kBFloat16) {
      launch_forward_as<c10::BFloat16>(with_kl, mu, rho, w, grid, seed_arg, offset, prior, partials_ptr);
    } else if (dtype == at::kHalf) {
      launch_forward_as<c10::Half>(with_kl, mu, rho, w, grid, seed_arg, offset, prior, partials_ptr);
    } else {
      launch_forward_as<float>(with_kl, mu, rho, w, grid, seed_arg, offset, prior, partials_ptr);
    }
  }
  if (!with_kl) return {w, at::empty({0}, mu.options()), at::empty({0}, mu.options())};
  auto [log_q, log_p] = finalize_partials(partials, n > 0 ? grid : 0, -0.91893853320467274178 * static_cast<double>(n),
                                          0.0, mu);
  return {w, log_q, log_p};
}

// The backward into given contiguous gradients (grad_mu may alias grad_w); returns w (empty unless
// return_weight).
at::Tensor backward_cuda(at::Tensor& grad_mu, at::Tensor& grad_rho, const c10::optional<at::Tensor>& grad_w_in,
                         const at::Tensor& grad_log_q, const at::Tensor& grad_log_p, const at::Tensor& mu_in,
                         const at::Tensor& rho_in, const at::Tensor& seed, int64_t offset, double prior_pi,
                         double prior_sigma1, double prior_sigma2, bool return_weight, int64_t start,
                         bool noise_only) {
  check_posterior_params(mu_in, rho_in);
  check_cuda(mu_in);
  check_seed(seed, mu_in);
  check_offset(offset);
  check_start(start, mu_in.numel());
  check_prior(prior_pi, prior_sigma1, prior_sigma2);
  check_grad_w(grad_w_in, mu_in);
  check_scalar_grad(grad_log_q, mu_in, "grad_log_q");
  check_scalar_grad(grad_log_p, mu_in, "grad_log_p");
  const c10::cuda::CUDAGuard guard(mu_in.device());
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const bool has_grad_w = grad_w_in.has_value() && grad_w_in->defined();
  const at::Tensor grad_w = has_grad_w ? grad_w_in->contiguous() : at::Tensor();
  const at::Tensor glq = grad_log_q.reshape({}).to(mu.device(), mu.scalar_type());
  const at::Tensor glp = grad_log_p.reshape({}).to(mu.device(), mu.scalar_type());
  const int64_t n = mu.numel();
  at::Tensor w = return_weight ? at::empty(mu.sizes(), mu.options()) : at::empty({0}, mu.options());
  const SeedArg seed_arg = make_seed_arg(seed);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (n > 0) {
    const int64_t grid = grid_for(philox_blocks_spanned(n, start));
    const void* gw_ptr = has_grad_w ? grad_w.data_ptr() : nullptr;
    const void* w_ptr = return_weight ? w.data_ptr() : nullptr;
    if (can_vectorise(mu.scalar_type(), start, mu.data_ptr(), rho.data_ptr(), gw_ptr, w_ptr, grad_mu.data_ptr(),
                      grad_rho.data_ptr())) {
      backward_kernel<float, true><<<grid, kThreads, 0, stream>>>(
          has_grad_w ? grad_w.data_ptr<float>() : nullptr, glq.data_ptr<float>(), glp.data_ptr<float>(),
          mu.data_ptr<float>(), rho.data_ptr<float>(), grad_mu.data_ptr<float>(), grad_rho.data_ptr<float>(),
          return_weight ? w.data_ptr<float>() : nullptr, n, start, seed_arg, static_cast<uint64_t>(offset),
          make_prior<float>(prior_pi, prior_sigma1, prior_sigma2), noise_only);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "sample_weight_backward_cuda", [&] {
        const auto prior = make_prior<scalar_t>(prior_pi, prior_sigma1, prior_sigma2);
        backward_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
            has_grad_w ? grad_w.data_ptr<scalar_t>() : nullptr, glq.data_ptr<scalar_t>(), glp.data_ptr<scalar_t>(),
            mu.data_ptr<scalar_t>(), rho.data_ptr<scalar_t>(), grad_mu.data_ptr<scalar_t>(),
            grad_rho.data_ptr<scalar_t>(), return_weight ? w.data_ptr<scalar_t>() : nullptr, n, start, seed_arg,
            static_cast<uint64_t>(offset), prior, noise_only);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  return w;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_weight_backward_cuda(
    const c10::optional<at::Tensor>& grad_w, const at::Tensor& grad_log_q, const at::Tensor& grad_log_p,
    const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& seed, int64_t offset, double prior_pi,
    double prior_sigma1, double prior_sigma2, bool return_weight, int64_t start, bool noise_only) {
  check_posterior_params(mu, rho);
  at::Tensor grad_mu = at::empty(mu.sizes(), mu.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_rho = at::empty_like(grad_mu);
  at::Tensor w = backward_cuda(grad_mu, grad_rho, grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset, prior_pi,
                               prior_sigma1, prior_sigma2, return_weight, start, noise_only);
  return {grad_mu, grad_rho, w};
}

// Writes straight into the given gradients (no copies): the linear backward passes its grad_w
// buffer as grad_mu, so a training step holds one weight-sized gradient fewer.
at::Tensor sample_weight_backward_into_cuda(at::Tensor& grad_mu, at::Tensor& grad_rho,
                                            const c10::optional<at::Tensor>& grad_w, const at::Tensor& grad_log_q,
                                            const at::Tensor& grad_log_p, const at::Tensor& mu, const at::Tensor& rho,
                                            const at::Tensor& seed, int64_t offset, double prior_pi,
                                            double prior_sigma1, double prior_sigma2, bool return_weight,
                                            int64_t start, bool noise_only) {
  check_posterior_params(mu, rho);
  check_accumulator(grad_mu, mu, "grad_mu");
  check_accumulator(grad_rho, mu, "grad_rho");
  return backward_cuda(grad_mu, grad_rho, grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset, prior_pi,
                       prior_sigma1, prior_sigma2, return_weight, start, noise_only);
}

at::Tensor philox_normal_cuda(const at::Tensor& like, const at::Tensor& seed, int64_t offset, int64_t start) {
  check_floating(like, "like");
  check_cuda(like);
  check_seed(seed, like);
  check_offset(offset);
  check_start(start, like.numel());
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = out.numel();
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "philox_normal_cuda", [&] {
      normal_kernel<scalar_t><<<grid_for(philox_blocks_spanned(n, start)), kThreads, 0,
                                at::cuda::getCurrentCUDAStream()>>>(out.data_ptr<scalar_t>(), n, start,
                                                                    make_seed_arg(seed), static_cast<uint64_t>(offset));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out;
}

// The multi-seed ops (see cpu/sample_samples_cpu.cpp) as N launches of the single-seed kernels:
// on a GPU a launch costs microseconds, the per-call Python cost they save is on the host side.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_weight_samples_cuda(const at::Tensor& mu, const at::Tensor& rho,
                                                                          const at::Tensor& seeds, int64_t offset,
                                                                          double prior_pi, double prior_sigma1,
                                                                          double prior_sigma2) {
  check_seeds(seeds, mu);
  std::vector<at::Tensor> ws, qs, ps;
  for (int64_t s = 0; s < seeds.numel(); ++s) {
    const auto out = sample_cuda(mu, rho, seeds[s], offset, prior_pi, prior_sigma1, prior_sigma2, 0, true);
    ws.push_back(std::get<0>(out));
    qs.push_back(std::get<1>(out));
    ps.push_back(std::get<2>(out));
  }
  return {at::stack(ws), at::stack(qs), at::stack(ps)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_weight_samples_backward_cuda(
    const c10::optional<at::Tensor>& grad_w, const at::Tensor& grad_log_q, const at::Tensor& grad_log_p,
    const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& seeds, int64_t offset, double prior_pi,
    double prior_sigma1, double prior_sigma2, bool return_weight) {
  check_posterior_params(mu, rho);
  check_seeds(seeds, mu);
  const int64_t samples = seeds.numel();
  check_samples_grad_w(grad_w, mu, samples);
  check_per_sample(grad_log_q, mu, samples, "grad_log_q");
  check_per_sample(grad_log_p, mu, samples, "grad_log_p");
  const bool has_grad_w = grad_w.has_value() && grad_w->defined();
  at::Tensor grad_mu, grad_rho;
  std::vector<at::Tensor> ws;
  for (int64_t s = 0; s < samples; ++s) {
    const c10::optional<at::Tensor> gw_s = has_grad_w ? c10::optional<at::Tensor>((*grad_w)[s]) : c10::nullopt;
    const auto out = sample_weight_backward_cuda(gw_s, grad_log_q[s], grad_log_p[s], mu, rho, seeds[s], offset,
                                                 prior_pi, prior_sigma1, prior_sigma2, return_weight, 0, false);
    if (s == 0) {
      grad_mu = std::get<0>(out);
      grad_rho = std::get<1>(out);
    } else {  // in sample order: deterministic
      grad_mu.add_(std::get<0>(out));
      grad_rho.add_(std::get<1>(out));
    }
    if (return_weight) ws.push_back(std::get<2>(out));
  }
  return {grad_mu, grad_rho, return_weight ? at::stack(ws) : at::empty({0}, mu.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(bayes_ext, CUDA, m) {
  m.impl("sample_weight", &sample_weight_cuda);
  m.impl("sample_weight_backward", &sample_weight_backward_cuda);
  m.impl("sample_weight_backward_into", &sample_weight_backward_into_cuda);
  m.impl("sample_kl", &sample_kl_cuda);
  m.impl("sample_weight_as", &sample_weight_as_cuda);
  m.impl("sample_weight_samples", &sample_weight_samples_cuda);
  m.impl("sample_weight_samples_backward", &sample_weight_samples_backward_cuda);
  m.impl("philox_normal", &philox_normal_cuda);
}

}  // namespace bayes_ext
