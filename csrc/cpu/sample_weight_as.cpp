// bayes_ext::sample_weight_as on any device: sample_weight, then a cast to the requested dtype
// (the CPU's kernel, and CUDA's in a build without CUDA kernels). The CUDA kernel
// (cuda/sample_weight_cuda.cu) writes W in that dtype directly; both round the same fp32 value
// to nearest even, so they agree bit for bit.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace bayes_ext {
namespace {

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Triple sample_weight_as_composite(const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& seed, int64_t offset,
                                  double prior_pi, double prior_sigma1, double prior_sigma2, at::ScalarType dtype,
                                  bool with_kl) {
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "dtype must be a floating-point dtype, got ", dtype);
  static auto sample = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("bayes_ext::sample_weight", "")
                           .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double,
                                         double, double, int64_t, bool)>();
  auto [w, log_q, log_p] = sample.call(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, 0, false);
  if (!with_kl) {
    log_q = at::empty({0}, log_q.options());
    log_p = at::empty({0}, log_p.options());
  }
  return {w.to(dtype), log_q, log_p};
}

}  // namespace

// Every backend without a kernel of its own (a CUDA kernel, where built, takes precedence).
TORCH_LIBRARY_IMPL(bayes_ext, CompositeExplicitAutograd, m) {
  m.impl("sample_weight_as", &sample_weight_as_composite);
}

}  // namespace bayes_ext
