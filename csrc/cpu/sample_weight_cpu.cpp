// CPU implementation of the sampling ops: argument checks, splitting the weight into fixed chunks
// run with at::parallel_for; the range kernels for this CPU's instruction set come from
// kernel_dispatch.h.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
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

template <typename scalar_t>
void forward_cpu(const at::Tensor& mu, const at::Tensor& rho, at::Tensor& w, uint64_t seed, uint64_t offset,
                 int64_t start, const ScaleMixturePrior<scalar_t>& prior, double* log_q, double* log_p,
                 bool noise_only = false) {
  const int64_t n = mu.numel();
  const int64_t chunks = num_chunks(n);
  std::vector<double> lq(chunks, 0.0), lp(chunks, 0.0);
  const scalar_t* mu_p = mu.data_ptr<scalar_t>();
  const scalar_t* rho_p = rho.data_ptr<scalar_t>();
  scalar_t* w_p = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      ForwardRange<scalar_t> a{mu_p,  rho_p,  w_p,   c * kChunk, std::min(n, (c + 1) * kChunk), start,
                               seed,  offset, prior, &lq[c],     &lp[c]};
      a.noise_only = noise_only;
      run_forward(a);
    }
  });
  double sum_q = 0.0, sum_p = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    sum_q += lq[c];
    sum_p += lp[c];
  }
  *log_q = sum_q - 0.91893853320467274178 * static_cast<double>(n);
  *log_p = sum_p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_weight_cpu(const at::Tensor& mu_in, const at::Tensor& rho_in,
                                                                 const at::Tensor& seed, int64_t offset, double prior_pi,
                                                                 double prior_sigma1, double prior_sigma2, int64_t start,
                                                                 bool noise_only) {
  check_posterior_params(mu_in, rho_in);
  check_seed(seed, mu_in);
  check_offset(offset);
  check_start(start, mu_in.numel());
  check_prior(prior_pi, prior_sigma1, prior_sigma2);
  check_cpu(mu_in);
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  at::Tensor w = at::empty(mu.sizes(), mu.options());
  double log_q = 0.0, log_p = 0.0;
  const uint64_t s = seed_value(seed);
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "sample_weight_cpu", [&] {
    const auto prior = make_prior<scalar_t>(prior_pi, prior_sigma1, prior_sigma2);
    forward_cpu<scalar_t>(mu, rho, w, s, static_cast<uint64_t>(offset), start, prior, &log_q, &log_p, noise_only);
  });
  return {w, at::scalar_tensor(log_q, mu.options()), at::scalar_tensor(log_p, mu.options())};
}

std::tuple<at::Tensor, at::Tensor> sample_kl_cpu(const at::Tensor& mu_in, const at::Tensor& rho_in,
                                                 const at::Tensor& seed, int64_t offset, double prior_pi,
                                                 double prior_sigma1, double prior_sigma2, int64_t start) {
  check_posterior_params(mu_in, rho_in);
  check_seed(seed, mu_in);
  check_offset(offset);
  check_start(start, mu_in.numel());
  check_prior(prior_pi, prior_sigma1, prior_sigma2);
  check_cpu(mu_in);
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  at::Tensor no_weight;  // undefined: the kernel only sums
  double log_q = 0.0, log_p = 0.0;
  const uint64_t s = seed_value(seed);
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "sample_kl_cpu", [&] {
    const auto prior = make_prior<scalar_t>(prior_pi, prior_sigma1, prior_sigma2);
    forward_cpu<scalar_t>(mu, rho, no_weight, s, static_cast<uint64_t>(offset), start, prior, &log_q, &log_p);
  });
  return {at::scalar_tensor(log_q, mu.options()), at::scalar_tensor(log_p, mu.options())};
}

// The backward pass writing into grad_mu / grad_rho (contiguous, mu's shape): fresh tensors for
// sample_weight_backward, slices of whole-weight gradients for sample_weight_backward_into.
void backward_into(at::Tensor& grad_mu, at::Tensor& grad_rho, const c10::optional<at::Tensor>& grad_w_in,
                   const at::Tensor& grad_log_q, const at::Tensor& grad_log_p, const at::Tensor& mu_in,
                   const at::Tensor& rho_in, const at::Tensor& seed, int64_t offset, double prior_pi,
                   double prior_sigma1, double prior_sigma2, at::Tensor& w, int64_t start, bool noise_only) {
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const bool has_grad_w = grad_w_in.has_value() && grad_w_in->defined();
  at::Tensor grad_w = has_grad_w ? grad_w_in->contiguous() : at::Tensor();
  // noise_only subtracts grad_w from grad_mu after the tile wrote grad_mu: a grad_w in grad_mu's
  // memory (the linear backward's in-place call) would be read after it was overwritten
  if (noise_only && has_grad_w && at::get_overlap_status(grad_mu, grad_w) != at::MemOverlapStatus::No) {
    grad_w = grad_w.clone();
  }
  const uint64_t s = seed_value(seed);
  const int64_t n = mu.numel();
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "sample_weight_backward_cpu", [&] {
    const auto prior = make_prior<scalar_t>(prior_pi, prior_sigma1, prior_sigma2);
    const scalar_t glq = host_scalar<scalar_t>(grad_log_q);
    const scalar_t glp = host_scalar<scalar_t>(grad_log_p);
    const scalar_t* gw_p = has_grad_w ? grad_w.data_ptr<scalar_t>() : nullptr;
    scalar_t* w_p = w.defined() && w.numel() ? w.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, num_chunks(n), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        BackwardRange<scalar_t> a{gw_p,   glq,      glp, mu.data_ptr<scalar_t>(), rho.data_ptr<scalar_t>(),
                                  grad_mu.data_ptr<scalar_t>(), grad_rho.data_ptr<scalar_t>(), w_p,
                                  c * kChunk, std::min(n, (c + 1) * kChunk), start, s, static_cast<uint64_t>(offset),
                                  prior};
        a.noise_only = noise_only;
        run_backward(a);
      }
    });
  });
}

void check_backward_args(const c10::optional<at::Tensor>& grad_w, const at::Tensor& grad_log_q,
                         const at::Tensor& grad_log_p, const at::Tensor& mu, const at::Tensor& rho,
                         const at::Tensor& seed, int64_t offset, double prior_pi, double prior_sigma1,
                         double prior_sigma2, int64_t start) {
  check_posterior_params(mu, rho);
  check_cpu(mu);
  check_seed(seed, mu);
  check_offset(offset);
  check_start(start, mu.numel());
  check_prior(prior_pi, prior_sigma1, prior_sigma2);
  check_grad_w(grad_w, mu);
  check_scalar_grad(grad_log_q, mu, "grad_log_q");
  check_scalar_grad(grad_log_p, mu, "grad_log_p");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_weight_backward_cpu(
    const c10::optional<at::Tensor>& grad_w, const at::Tensor& grad_log_q, const at::Tensor& grad_log_p,
    const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& seed, int64_t offset, double prior_pi,
    double prior_sigma1, double prior_sigma2, bool return_weight, int64_t start, bool noise_only) {
  check_backward_args(grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2,
                      start);
  at::Tensor grad_mu = at::empty(mu.sizes(), mu.options());
  at::Tensor grad_rho = at::empty(mu.sizes(), mu.options());
  at::Tensor w = return_weight ? at::empty(mu.sizes(), mu.options()) : at::empty({0}, mu.options());
  backward_into(grad_mu, grad_rho, grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset, prior_pi, prior_sigma1,
                prior_sigma2, w, start, noise_only);
  return {grad_mu, grad_rho, w};
}

at::Tensor sample_weight_backward_into_cpu(at::Tensor& grad_mu, at::Tensor& grad_rho,
                                           const c10::optional<at::Tensor>& grad_w, const at::Tensor& grad_log_q,
                                           const at::Tensor& grad_log_p, const at::Tensor& mu, const at::Tensor& rho,
                                           const at::Tensor& seed, int64_t offset, double prior_pi,
                                           double prior_sigma1, double prior_sigma2, bool return_weight,
                                           int64_t start, bool noise_only) {
  check_backward_args(grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2,
                      start);
  check_accumulator(grad_mu, mu, "grad_mu");
  check_accumulator(grad_rho, mu, "grad_rho");
  at::Tensor w = return_weight ? at::empty(mu.sizes(), mu.options()) : at::empty({0}, mu.options());
  backward_into(grad_mu, grad_rho, grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset, prior_pi, prior_sigma1,
                prior_sigma2, w, start, noise_only);
  return w;
}

at::Tensor philox_normal_cpu(const at::Tensor& like, const at::Tensor& seed, int64_t offset, int64_t start) {
  check_floating(like, "like");
  check_seed(seed, like);
  check_offset(offset);
  check_start(start, like.numel());
  at::Tensor out = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  const uint64_t s = seed_value(seed);
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "philox_normal_cpu", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_chunks(n), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        run_normals(s, static_cast<uint64_t>(offset), start, c * kChunk, std::min(n, (c + 1) * kChunk), p);
    });
  });
  return out;
}

// Raw Philox words for blocks [first_block, first_block + num_blocks): int64 tensor (num_blocks, 4).
at::Tensor philox4x32_cpu(const at::Tensor& seed, int64_t offset, int64_t first_block, int64_t num_blocks) {
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong && seed.numel() == 1, "seed must be a one-element int64 tensor");
  TORCH_CHECK_VALUE(num_blocks >= 0, "num_blocks must be non-negative, got ", num_blocks);
  at::Tensor out = at::empty({num_blocks, 4}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = out.data_ptr<int64_t>();
  const uint64_t s = seed_value(seed);
  for (int64_t b = 0; b < num_blocks; ++b) {
    const PhiloxOut x = philox_block(s, static_cast<uint64_t>(offset), static_cast<uint64_t>(first_block + b));
    for (int k = 0; k < 4; ++k) p[4 * b + k] = static_cast<int64_t>(x.x[k]);
  }
  return out;
}

std::string cpu_kernel_isa() { return float_kernels().name; }

}  // namespace

TORCH_LIBRARY_IMPL(bayes_ext, CPU, m) {
  m.impl("sample_weight", &sample_weight_cpu);
  m.impl("sample_weight_backward", &sample_weight_backward_cpu);
  m.impl("sample_weight_backward_into", &sample_weight_backward_into_cpu);
  m.impl("sample_kl", &sample_kl_cpu);
  m.impl("philox_normal", &philox_normal_cpu);
}

// Ops without tensor inputs to dispatch on.
TORCH_LIBRARY_FRAGMENT(bayes_ext, m) {
  m.def("philox4x32(Tensor seed, int offset, int first_block, int num_blocks) -> Tensor", &philox4x32_cpu);
  m.def("cpu_kernel_isa() -> str", &cpu_kernel_isa);
}

}  // namespace bayes_ext
