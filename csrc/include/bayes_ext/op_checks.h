// Argument checks shared by the CPU and CUDA implementations of the ops. Messages name the
// argument and what was expected; value problems raise ValueError, type problems TypeError.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace bayes_ext {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be a float32 or float64 tensor, got ", t.scalar_type());
}

inline void check_posterior_params(const at::Tensor& mu, const at::Tensor& rho) {
  TORCH_CHECK_TYPE(mu.defined() && rho.defined(), "mu and rho must be tensors");
  check_floating(mu, "mu");
  TORCH_CHECK_TYPE(rho.scalar_type() == mu.scalar_type(), "rho must have the dtype of mu (",
                   mu.scalar_type(), "), got ", rho.scalar_type());
  TORCH_CHECK_VALUE(rho.device() == mu.device(), "rho must be on the device of mu (", mu.device(),
                    "), got ", rho.device());
  TORCH_CHECK_VALUE(rho.sizes() == mu.sizes(), "rho must have the shape of mu ", mu.sizes(),
                    ", got ", rho.sizes());
}

inline void check_seed(const at::Tensor& seed, const at::Tensor& like) {
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "seed must be an int64 tensor, got ",
                   seed.scalar_type());
  TORCH_CHECK_VALUE(seed.numel() == 1, "seed must hold exactly one value, got ", seed.numel());
  TORCH_CHECK_VALUE(seed.device().is_cpu() || seed.device() == like.device(),
                    "seed must be on the CPU or on the device of mu (", like.device(), "), got ",
                    seed.device());
}

inline void check_offset(int64_t offset) {
  TORCH_CHECK_VALUE(offset >= 0, "offset must be non-negative, got ", offset);
}

// start: the stream index of the tensor's first element (a block of rows of a larger weight).
inline void check_start(int64_t start, int64_t numel) {
  TORCH_CHECK_VALUE(start >= 0 && start <= (int64_t(1) << 62) - numel,
                    "start must be in [0, 2**62 - numel], got ", start);
}

inline void check_prior(double pi, double sigma1, double sigma2) {
  TORCH_CHECK_VALUE(pi >= 0.0 && pi <= 1.0, "prior_pi must be in [0, 1], got ", pi);
  TORCH_CHECK_VALUE(sigma1 > 0.0 && std::isfinite(sigma1), "prior_sigma1 must be positive and finite, got ", sigma1);
  TORCH_CHECK_VALUE(sigma2 > 0.0 && std::isfinite(sigma2), "prior_sigma2 must be positive and finite, got ", sigma2);
}

inline void check_scalar_grad(const at::Tensor& g, const at::Tensor& like, const char* name) {
  TORCH_CHECK_VALUE(g.numel() == 1, name, " must hold exactly one value, got shape ", g.sizes());
  TORCH_CHECK_VALUE(g.device().is_cpu() || g.device() == like.device(), name,
                    " must be on the CPU or on the device of mu (", like.device(), "), got ", g.device());
}

inline void check_grad_w(const c10::optional<at::Tensor>& grad_w, const at::Tensor& mu) {
  if (!grad_w.has_value() || !grad_w->defined()) return;
  TORCH_CHECK_VALUE(grad_w->sizes() == mu.sizes(), "grad_w must have the shape of mu ", mu.sizes(),
                    ", got ", grad_w->sizes());
  TORCH_CHECK_TYPE(grad_w->scalar_type() == mu.scalar_type(), "grad_w must have the dtype of mu (",
                   mu.scalar_type(), "), got ", grad_w->scalar_type());
  TORCH_CHECK_VALUE(grad_w->device() == mu.device(), "grad_w must be on the device of mu (",
                    mu.device(), "), got ", grad_w->device());
}

// The seed's bits as the unsigned Philox key (reads a CUDA seed with a sync; CUDA kernels read it
// on the device instead).
inline uint64_t seed_value(const at::Tensor& seed) {
  return static_cast<uint64_t>(seed.item<int64_t>());
}

}  // namespace bayes_ext
