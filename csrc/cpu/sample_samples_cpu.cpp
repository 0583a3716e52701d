// CPU implementation of the multi-seed sampling ops: N samples of one (mu, rho), sample s drawn
// from Philox stream (seeds[s], offset) exactly as sample_weight draws it. One call instead of N
// saves the per-call dispatcher and Python cost that dominates small layers (the vectorised
// multi-sample ELBO); the backward sums the N samples' gradients in sample order per chunk
// (deterministic) without N weight-sized temporaries.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

// Below this many elements in all, one thread: an OpenMP region costs more than the work.
constexpr int64_t kParallelElements = 32768;
// Element ranges of the backward's tasks are multiples of this: whole tiles of the range kernels.
constexpr int64_t kRangeMultiple = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Weights up to this many elements share their softplus terms across the samples (2 MB in fp32).
constexpr int64_t kScratchElements = 1 << 19;

// The small per-sample inputs are read in place when they are CPU tensors of the usual dtypes:
// converting each through .to() costs an allocation and a dispatcher round trip per call, a
// noticeable share of a small layer's step (the vectorised ELBO calls these ops 8 times a step).
std::vector<uint64_t> seed_values(const at::Tensor& seeds) {
  const at::Tensor s = seeds.is_cpu() ? seeds : seeds.to(at::kCPU);
  const auto a = s.accessor<int64_t, 1>();
  std::vector<uint64_t> out(static_cast<size_t>(s.numel()));
  for (int64_t i = 0; i < s.numel(); ++i) out[i] = static_cast<uint64_t>(a[i]);
  return out;
}

std::vector<double> per_sample_values(const at::Tensor& t) {
  const at::Tensor c = t.is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble)
                           ? t
                           : t.to(at::kCPU, at::kDouble);
  std::vector<double> out(static_cast<size_t>(c.numel()));
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "per_sample_values", [&] {
    const auto a = c.accessor<scalar_t, 1>();
    for (int64_t i = 0; i < c.numel(); ++i) out[i] = static_cast<double>(a[i]);
  });
  return out;
}

std::vector<int64_t> stacked_shape(int64_t samples, const at::Tensor& mu) {
  std::vector<int64_t> shape{samples};
  for (int64_t d : mu.sizes()) shape.push_back(d);
  return shape;
}

// softplus(rho) and the terms derived from it are the same for every sample: with N > 1 they are
// computed once per element (softplus_range) and the N sampling passes read them, instead of N
// times exp, log1p, log and a division per element (about half of a pass's arithmetic). Only for
// weights up to kScratchElements: beyond, the shared terms would be weight-sized temporaries.
template <typename scalar_t>
struct SharedSoftplus {
  std::vector<scalar_t> sigma, log_sigma, sigmoid, dlog_sigma;

  SharedSoftplus(const scalar_t* rho, int64_t n, bool with_grads)
      : sigma(static_cast<size_t>(n)), log_sigma(sigma.size()), sigmoid(with_grads ? sigma.size() : 0),
        dlog_sigma(sigmoid.size()) {
    // Pieces of kRangeMultiple-aligned ranges, so small weights use every thread while the kernels'
    // tiles (whose fast path is chosen per tile) start at the same elements whatever the split:
    // the values do not depend on the number of threads.
    const int64_t pieces = ceil_div(n, kRangeMultiple);
    at::parallel_for(0, pieces, kParallelElements / 4 / kRangeMultiple, [&](int64_t b, int64_t e) {
      run_softplus(SoftplusRange<scalar_t>{rho, sigma.data(), log_sigma.data(), with_grads ? sigmoid.data() : nullptr,
                                           with_grads ? dlog_sigma.data() : nullptr, b * kRangeMultiple,
                                           std::min(n, e * kRangeMultiple)});
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_weight_samples_cpu(const at::Tensor& mu_in,
                                                                         const at::Tensor& rho_in,
                                                                         const at::Tensor& seeds, int64_t offset,
                                                                         double prior_pi, double prior_sigma1,
                                                                         double prior_sigma2) {
  check_posterior_params(mu_in, rho_in);
  check_seeds(seeds, mu_in);
  check_offset(offset);
  check_prior(prior_pi, prior_sigma1, prior_sigma2);
  check_cpu(mu_in);
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const std::vector<uint64_t> seed = seed_values(seeds);
  const int64_t samples = static_cast<int64_t>(seed.size()), n = mu.numel(), chunks = num_chunks(n);
  at::Tensor w = at::empty(stacked_shape(samples, mu), mu.options());
  std::vector<double> lq(static_cast<size_t>(samples * chunks), 0.0), lp(lq.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "sample_weight_samples_cpu", [&] {
    const auto prior = make_prior<scalar_t>(prior_pi, prior_sigma1, prior_sigma2);
    const scalar_t* mu_p = mu.data_ptr<scalar_t>();
    const scalar_t* rho_p = rho.data_ptr<scalar_t>();
    scalar_t* w_p = w.data_ptr<scalar_t>();
    const int64_t task_elements = std::max<int64_t>(1, std::min(n, kChunk));
    const int64_t grain = std::max<int64_t>(1, kParallelElements / task_elements);
    const bool share = samples > 1 && n > 0 && n <= kScratchElements;  // no weight-sized temporaries
    const SharedSoftplus<scalar_t> shared(rho_p, share ? n : 0, false);
    at::parallel_for(0, samples * chunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t s = t / chunks, c = t % chunks;
        ForwardRange<scalar_t> a{mu_p,    rho_p,  w_p + s * n, c * kChunk, std::min(n, (c + 1) * kChunk), 0,
                                 seed[s], static_cast<uint64_t>(offset), prior, &lq[t], &lp[t],
                                 share ? shared.sigma.data() : nullptr, share ? shared.log_sigma.data() : nullptr};
        run_forward(a);
      }
    });
  });
  // summed in double, rounded once to mu's dtype
  at::Tensor log_q = at::empty({samples}, mu.options());
  at::Tensor log_p = at::empty({samples}, mu.options());
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "sample_weight_samples_sums", [&] {
    scalar_t* q = log_q.data_ptr<scalar_t>();
    scalar_t* p = log_p.data_ptr<scalar_t>();
    for (int64_t s = 0; s < samples; ++s) {
      double sum_q = 0.0, sum_p = 0.0;
      for (int64_t c = 0; c < chunks; ++c) {
        sum_q += lq[s * chunks + c];
        sum_p += lp[s * chunks + c];
      }
      q[s] = static_cast<scalar_t>(sum_q - 0.91893853320467274178 * static_cast<double>(n));
      p[s] = static_cast<scalar_t>(sum_p);
    }
  });
  return {w, log_q, log_p};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_weight_samples_backward_cpu(
    const c10::optional<at::Tensor>& grad_w_in, const at::Tensor& grad_log_q, const at::Tensor& grad_log_p,
    const at::Tensor& mu_in, const at::Tensor& rho_in, const at::Tensor& seeds, int64_t offset, double prior_pi,
    double prior_sigma1, double prior_sigma2, bool return_weight) {
  check_posterior_params(mu_in, rho_in);
  check_seeds(seeds, mu_in);
  check_offset(offset);
  check_prior(prior_pi, prior_sigma1, prior_sigma2);
  check_cpu(mu_in);
  const int64_t samples = seeds.numel();
  check_samples_grad_w(grad_w_in, mu_in, samples);
  check_per_sample(grad_log_q, mu_in, samples, "grad_log_q");
  check_per_sample(grad_log_p, mu_in, samples, "grad_log_p");
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const bool has_grad_w = grad_w_in.has_value() && grad_w_in->defined();
  const at::Tensor grad_w = has_grad_w ? grad_w_in->contiguous() : at::Tensor();
  const std::vector<uint64_t> seed = seed_values(seeds);
  const std::vector<double> glq = per_sample_values(grad_log_q), glp = per_sample_values(grad_log_p);
  const int64_t n = mu.numel();
  at::Tensor grad_mu = at::empty(mu.sizes(), mu.options());
  at::Tensor grad_rho = at::empty(mu.sizes(), mu.options());
  at::Tensor w = return_weight ? at::empty(stacked_shape(samples, mu), mu.options()) : at::empty({0}, mu.options());
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "sample_weight_samples_backward_cpu", [&] {
    const auto prior = make_prior<scalar_t>(prior_pi, prior_sigma1, prior_sigma2);
    const scalar_t* mu_p = mu.data_ptr<scalar_t>();
    const scalar_t* rho_p = rho.data_ptr<scalar_t>();
    const scalar_t* gw_p = has_grad_w ? grad_w.data_ptr<scalar_t>() : nullptr;
    scalar_t* gmu_p = grad_mu.data_ptr<scalar_t>();
    scalar_t* grho_p = grad_rho.data_ptr<scalar_t>();
    scalar_t* w_p = return_weight ? w.data_ptr<scalar_t>() : nullptr;
    const bool share = samples > 1 && n > 0 && n <= kScratchElements;  // no weight-sized temporaries
    const SharedSoftplus<scalar_t> shared(rho_p, share ? n : 0, true);
    auto sample_range = [&](int64_t s, int64_t c0, int64_t len, scalar_t* out_mu, scalar_t* out_rho) {
      BackwardRange<scalar_t> a{gw_p == nullptr ? nullptr : gw_p + s * n + c0,
                                static_cast<scalar_t>(glq[s]), static_cast<scalar_t>(glp[s]), mu_p + c0,
                                rho_p + c0, out_mu, out_rho, w_p == nullptr ? nullptr : w_p + s * n + c0, 0, len,
                                c0, seed[s], static_cast<uint64_t>(offset), prior,
                                share ? shared.sigma.data() + c0 : nullptr, share ? shared.sigmoid.data() + c0 : nullptr,
                                share ? shared.dlog_sigma.data() + c0 : nullptr};
      run_backward(a);
    };
    // Tasks are element ranges (whole tiles; a chunk at most), each running the N samples in order:
    // sample 0 writes the range of the sums, the others add to it from a range-sized buffer. Every
    // element's sum has the same terms in the same order whatever the split, so the result does
    // not depend on the number of threads, and a one-chunk weight still splits into enough tasks
    // for every thread without a sample-sized scratch.
    const int64_t threads = samples * n >= kParallelElements ? at::get_num_threads() : 1;
    const int64_t range = std::min(kChunk, std::max(kRangeMultiple, round_up(ceil_div(n, threads), kRangeMultiple)));
    const int64_t ranges = ceil_div(n, range);
    at::parallel_for(0, ranges, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> part_mu(static_cast<size_t>(std::min(n, range))), part_rho(part_mu.size());
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c0 = r * range, len = std::min(n, c0 + range) - c0;
        for (int64_t s = 0; s < samples; ++s) {
          scalar_t* out_mu = s == 0 ? gmu_p + c0 : part_mu.data();
          scalar_t* out_rho = s == 0 ? grho_p + c0 : part_rho.data();
          sample_range(s, c0, len, out_mu, out_rho);
          if (s > 0) {
            for (int64_t i = 0; i < len; ++i) {
              gmu_p[c0 + i] += part_mu[i];
              grho_p[c0 + i] += part_rho[i];
            }
          }
        }
      }
    });
  });
  return {grad_mu, grad_rho, w};
}

}  // namespace

TORCH_LIBRARY_IMPL(bayes_ext, CPU, m) {
  m.impl("sample_weight_samples", &sample_weight_samples_cpu);
  m.impl("sample_weight_samples_backward", &sample_weight_samples_backward_cpu);
}

}  // namespace bayes_ext
