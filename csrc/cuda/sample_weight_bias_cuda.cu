// A linear layer's weight and bias sampled in one launch each way (the layer op's calls, see
// cpu/sample_weight_bias.cpp for the ops' definition). The first CUDA blocks of the grid run W's
// pass and the rest b's, each with the grid its own launch would have had, so values, per-block
// partial sums and therefore log q / log p are bit for bit those of two sample_weight_as /
// sample_weight_backward calls. Why: a small layer's step is host-bound on a GPU, every launch and
// dispatch costs microseconds (H200, bench/overhead.py), and the separate calls took four kernels
// forward (two samples, two finalisations) plus two adds where this takes two.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "../cpu/op_calls.h"
#include "bayes_ext/op_checks.h"
#include "bayes_ext/posterior_math.h"
#include "block_sum.cuh"
#include "finalize.cuh"
#include "launch.cuh"
#include "sample_passes.cuh"
#include "seed_arg.cuh"

namespace bayes_ext {
namespace {

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Quad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr double kHalfLog2Pi = 0.91893853320467274178;

// Blocks [0, grid_w) sample W on stream (seed, 0), the rest b on (seed, 1); every block writes its
// row of partials (log q, log p).
template <typename WT>
__global__ void forward_pair_kernel(const float* __restrict__ weight_mu, const float* __restrict__ weight_rho,
                                    WT* __restrict__ w, int64_t n_w, int64_t grid_w,
                                    const float* __restrict__ bias_mu, const float* __restrict__ bias_rho,
                                    WT* __restrict__ b, int64_t n_b, SeedArg seed_arg,
                                    ScaleMixturePrior<float> prior, double* __restrict__ partials) {
  __shared__ float shared[32];
  const uint64_t seed = load_seed(seed_arg);
  float lq = 0.f, lp = 0.f;
  if (blockIdx.x < grid_w) {
    sample_pass<float, true, WT>(weight_mu, weight_rho, w, n_w, 0, seed, 0, prior, false, blockIdx.x, grid_w, lq, lp);
  } else {
    sample_pass<float, true, WT>(bias_mu, bias_rho, b, n_b, 0, seed, 1, prior, false, blockIdx.x - grid_w,
                                 gridDim.x - grid_w, lq, lp);
  }
  lq = block_sum(lq, shared);
  lp = block_sum(lp, shared);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = static_cast<double>(lq);
    partials[2 * blockIdx.x + 1] = static_cast<double>(lp);
  }
}

// grad_weight holds dL/dW on entry and grad_weight_mu on exit (read before written, same thread).
__global__ void backward_pair_kernel(float* grad_weight, float* __restrict__ grad_weight_rho,
                                     const float* __restrict__ weight_mu, const float* __restrict__ weight_rho,
                                     int64_t n_w, int64_t grid_w, const float* __restrict__ grad_bias,
                                     float* __restrict__ grad_bias_mu, float* __restrict__ grad_bias_rho,
                                     const float* __restrict__ bias_mu, const float* __restrict__ bias_rho,
                                     int64_t n_b, const float* __restrict__ grad_log_q,
                                     const float* __restrict__ grad_log_p, SeedArg seed_arg,
                                     ScaleMixturePrior<float> prior) {
  const uint64_t seed = load_seed(seed_arg);
  const float glq = *grad_log_q, glp = *grad_log_p;
  if (blockIdx.x < grid_w) {
    backward_pass<float, true>(grad_weight, glq, glp, weight_mu, weight_rho, grad_weight, grad_weight_rho, nullptr,
                               n_w, 0, seed, 0, prior, false, blockIdx.x, grid_w);
  } else {
    backward_pass<float, true>(grad_bias, glq, glp, bias_mu, bias_rho, grad_bias_mu, grad_bias_rho, nullptr, n_b, 0,
                               seed, 1, prior, false, blockIdx.x - grid_w, gridDim.x - grid_w);
  }
}

int64_t grid_for_elements(int64_t n) { return capped_grid(philox_blocks_spanned(n, 0)); }

// The one-launch kernels need fp32 parameters, 16-byte aligned (the vectorised pass), and both
// tensors non-empty; anything else takes the separate calls (the ops' definition).
bool pair_kernel_applies(const at::Tensor& weight_mu, const at::Tensor& weight_rho, const at::Tensor& bias_mu,
                         const at::Tensor& bias_rho) {
  return weight_mu.numel() > 0 && bias_mu.numel() > 0 &&
         can_vectorise(weight_mu.scalar_type(), 0, weight_mu.data_ptr(), weight_rho.data_ptr(), bias_mu.data_ptr(),
                       bias_rho.data_ptr());
}

Quad sample_weight_bias_as_cuda(const at::Tensor& weight_mu_in, const at::Tensor& weight_rho_in,
                                const at::Tensor& bias_mu_in, const at::Tensor& bias_rho_in, const at::Tensor& seed,
                                double prior_pi, double prior_sigma1, double prior_sigma2, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "dtype must be a floating-point dtype, got ", dtype);
  check_weight_bias_params(weight_mu_in, weight_rho_in, bias_mu_in, bias_rho_in);
  check_cuda(weight_mu_in, "weight_mu");
  check_seed(seed, weight_mu_in);
  check_prior(prior_pi, prior_sigma1, prior_sigma2);
  const c10::cuda::CUDAGuard guard(weight_mu_in.device());
  const at::Tensor weight_mu = weight_mu_in.contiguous(), weight_rho = weight_rho_in.contiguous();
  const at::Tensor bias_mu = bias_mu_in.contiguous(), bias_rho = bias_rho_in.contiguous();
  const bool direct = dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
  if (!direct || !pair_kernel_applies(weight_mu, weight_rho, bias_mu, bias_rho)) {
    auto [w, log_q, log_p] = op_calls::sample_weight_as(weight_mu, weight_rho, seed, 0, prior_pi, prior_sigma1,
                                                        prior_sigma2, dtype, true);
    auto [b, log_q_b, log_p_b] = op_calls::sample_weight_as(bias_mu, bias_rho, seed, 1, prior_pi, prior_sigma1,
                                                            prior_sigma2, dtype, true);
    return {w, b, log_q + log_q_b, log_p + log_p_b};
  }
  const int64_t n_w = weight_mu.numel(), n_b = bias_mu.numel();
  const int64_t grid_w = grid_for_elements(n_w), grid_b = grid_for_elements(n_b);
  at::Tensor w = at::empty(weight_mu.sizes(), weight_mu.options().dtype(dtype));
  at::Tensor b = at::empty(bias_mu.sizes(), bias_mu.options().dtype(dtype));
  at::Tensor partials = partials_for(grid_w + grid_b, 2, weight_mu);
  const SeedArg seed_arg = make_seed_arg(seed);
  const auto prior = make_prior<float>(prior_pi, prior_sigma1, prior_sigma2);
  auto launch = [&](auto* w_ptr, auto* b_ptr) {
    using WT = std::remove_pointer_t<decltype(w_ptr)>;
    forward_pair_kernel<WT><<<grid_w + grid_b, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        weight_mu.data_ptr<float>(), weight_rho.data_ptr<float>(), w_ptr, n_w, grid_w, bias_mu.data_ptr<float>(),
        bias_rho.data_ptr<float>(), b_ptr, n_b, seed_arg, prior, partials.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (dtype == at::kBFloat16) {
    launch(reinterpret_cast<c10::BFloat16*>(w.data_ptr()), reinterpret_cast<c10::BFloat16*>(b.data_ptr()));
  } else if (dtype == at::kHalf) {
    launch(reinterpret_cast<c10::Half*>(w.data_ptr()), reinterpret_cast<c10::Half*>(b.data_ptr()));
  } else {
    launch(w.data_ptr<float>(), b.data_ptr<float>());
  }
  auto [log_q, log_p] = finalize_pair_partials(partials, grid_w, grid_b, -kHalfLog2Pi * static_cast<double>(n_w),
                                               -kHalfLog2Pi * static_cast<double>(n_b), weight_mu);
  return {w, b, log_q, log_p};
}

Triple sample_weight_bias_backward_cuda(at::Tensor& grad_weight, const at::Tensor& grad_bias_in,
                                        const at::Tensor& grad_log_q, const at::Tensor& grad_log_p,
                                        const at::Tensor& weight_mu_in, const at::Tensor& weight_rho_in,
                                        const at::Tensor& bias_mu_in, const at::Tensor& bias_rho_in,
                                        const at::Tensor& seed, double prior_pi, double prior_sigma1,
                                        double prior_sigma2) {
  check_weight_bias_params(weight_mu_in, weight_rho_in, bias_mu_in, bias_rho_in);
  check_cuda(weight_mu_in, "weight_mu");
  check_accumulator(grad_weight, weight_mu_in, "grad_weight");
  check_matches(grad_bias_in, "grad_bias", bias_mu_in, "bias_mu");
  check_scalar_grad(grad_log_q, weight_mu_in, "grad_log_q");
  check_scalar_grad(grad_log_p, weight_mu_in, "grad_log_p");
  check_seed(seed, weight_mu_in);
  check_prior(prior_pi, prior_sigma1, prior_sigma2);
  const c10::cuda::CUDAGuard guard(weight_mu_in.device());
  const at::Tensor weight_mu = weight_mu_in.contiguous(), weight_rho = weight_rho_in.contiguous();
  const at::Tensor bias_mu = bias_mu_in.contiguous(), bias_rho = bias_rho_in.contiguous();
  const at::Tensor grad_bias = grad_bias_in.contiguous();
  at::Tensor grad_weight_rho = at::empty_like(grad_weight);
  if (!pair_kernel_applies(weight_mu, weight_rho, bias_mu, bias_rho) || !aligned16(grad_weight.data_ptr()) ||
      !aligned16(grad_bias.data_ptr())) {
    op_calls::sample_weight_backward_into(grad_weight, grad_weight_rho, grad_weight, grad_log_q, grad_log_p,
                                          weight_mu, weight_rho, seed, 0, prior_pi, prior_sigma1, prior_sigma2,
                                          false, 0, false);
    auto [grad_bias_mu, grad_bias_rho, unused] =
        op_calls::sample_weight_backward(grad_bias, grad_log_q, grad_log_p, bias_mu, bias_rho, seed, 1, prior_pi,
                                         prior_sigma1, prior_sigma2, false, 0, false);
    return {grad_weight_rho, grad_bias_mu, grad_bias_rho};
  }
  const at::Tensor glq = grad_log_q.reshape({}).to(weight_mu.device(), at::kFloat);
  const at::Tensor glp = grad_log_p.reshape({}).to(weight_mu.device(), at::kFloat);
  at::Tensor grad_bias_mu = at::empty_like(bias_mu), grad_bias_rho = at::empty_like(bias_mu);
  const int64_t n_w = weight_mu.numel(), n_b = bias_mu.numel();
  const int64_t grid_w = grid_for_elements(n_w), grid_b = grid_for_elements(n_b);
  backward_pair_kernel<<<grid_w + grid_b, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      grad_weight.data_ptr<float>(), grad_weight_rho.data_ptr<float>(), weight_mu.data_ptr<float>(),
      weight_rho.data_ptr<float>(), n_w, grid_w, grad_bias.data_ptr<float>(), grad_bias_mu.data_ptr<float>(),
      grad_bias_rho.data_ptr<float>(), bias_mu.data_ptr<float>(), bias_rho.data_ptr<float>(), n_b,
      glq.data_ptr<float>(), glp.data_ptr<float>(), make_seed_arg(seed),
      make_prior<float>(prior_pi, prior_sigma1, prior_sigma2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_weight_rho, grad_bias_mu, grad_bias_rho};
}

}  // namespace

TORCH_LIBRARY_IMPL(bayes_ext, CUDA, m) {
  m.impl("sample_weight_bias_as", &sample_weight_bias_as_cuda);
  m.impl("sample_weight_bias_backward_", &sample_weight_bias_backward_cuda);
}

}  // namespace bayes_ext
