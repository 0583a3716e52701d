// Argument checks shared by the CPU and CUDA implementations of the ops. Messages name the
// argument and what was expected; value problems raise ValueError, type problems TypeError.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

namespace bayes_ext {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be a float32 or float64 tensor, got ", t.scalar_type());
}

// A posterior parameter (mu): float32 / float64. A bf16 / fp16 one (e.g. after model.half()) gets told
// what to do instead, as bayes_ext/_checks.py's check_posterior_params says it.
inline void check_posterior_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() != at::kBFloat16 && t.scalar_type() != at::kHalf, name,
                   " must be a float32 or float64 tensor, got ", t.scalar_type(),
                   "; the posterior parameters stay in float32 (or float64): for bf16 / fp16 compute, use "
                   "torch.autocast");
  check_floating(t, name);
}

// The device a kernel file serves (the dispatcher routes by the tensors' device; a direct call of a
// kernel with another device's tensors gets this error instead of a crash).
inline void check_cpu(const at::Tensor& t, const char* name = "mu") {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernel, got ", t.device());
}

inline void check_cuda(const at::Tensor& t, const char* name = "mu") {
  TORCH_CHECK_VALUE(t.device().is_cuda(), name, " must be a CUDA tensor for the CUDA kernel, got ", t.device());
}

// t has like's dtype, device and shape (in that order of checks).
inline void check_matches(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " must have the dtype of ", like_name, " (",
                   like.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on the device of ", like_name, " (", like.device(),
                    "), got ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), name, " must have the shape of ", like_name, " ", like.sizes(),
                    ", got ", t.sizes());
}

inline void check_posterior_params(const at::Tensor& mu, const at::Tensor& rho) {
  TORCH_CHECK_TYPE(mu.defined() && rho.defined(), "mu and rho must be tensors");
  check_posterior_floating(mu, "mu");
  check_matches(rho, "rho", mu, "mu");
}

// A linear layer's weight posterior (out_features, in_features) and bias posterior (out_features,):
// floating, each pair alike, the bias in the weight's dtype and on its device.
inline void check_weight_bias_params(const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                                     const at::Tensor& bias_mu, const at::Tensor& bias_rho) {
  TORCH_CHECK_TYPE(weight_mu.defined() && weight_rho.defined() && bias_mu.defined() && bias_rho.defined(),
                   "weight_mu, weight_rho, bias_mu and bias_rho must be tensors");
  check_posterior_floating(weight_mu, "weight_mu");
  check_matches(weight_rho, "weight_rho", weight_mu, "weight_mu");
  TORCH_CHECK_VALUE(weight_mu.dim() == 2, "weight_mu must be 2-D (out_features, in_features), got shape ",
                    weight_mu.sizes());
  TORCH_CHECK_TYPE(bias_mu.scalar_type() == weight_mu.scalar_type(), "bias_mu must have the dtype of weight_mu (",
                   weight_mu.scalar_type(), "), got ", bias_mu.scalar_type());
  TORCH_CHECK_VALUE(bias_mu.device() == weight_mu.device(), "bias_mu must be on the device of weight_mu (",
                    weight_mu.device(), "), got ", bias_mu.device());
  TORCH_CHECK_VALUE(bias_mu.dim() == 1 && bias_mu.size(0) == weight_mu.size(0), "bias_mu must have shape (",
                    weight_mu.size(0), ",) (out_features), got ", bias_mu.sizes());
  check_matches(bias_rho, "bias_rho", bias_mu, "bias_mu");
}

inline void check_seed(const at::Tensor& seed, const at::Tensor& like) {
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "seed must be an int64 tensor, got ",
                   seed.scalar_type());
  TORCH_CHECK_VALUE(seed.numel() == 1, "seed must hold exactly one value, got ", seed.numel());
  TORCH_CHECK_VALUE(seed.device().is_cpu() || seed.device() == like.device(),
                    "seed must be on the CPU or on the device of mu (", like.device(), "), got ",
                    seed.device());
}

// The N seeds of the multi-sample ops: a non-empty 1-D int64 tensor on the CPU or mu's device.
inline void check_seeds(const at::Tensor& seeds, const at::Tensor& like) {
  TORCH_CHECK_TYPE(seeds.scalar_type() == at::kLong, "seeds must be an int64 tensor, got ", seeds.scalar_type());
  TORCH_CHECK_VALUE(seeds.dim() == 1 && seeds.numel() >= 1, "seeds must be a 1-D tensor of N >= 1 seeds, got shape ",
                    seeds.sizes());
  TORCH_CHECK_VALUE(seeds.device().is_cpu() || seeds.device() == like.device(),
                    "seeds must be on the CPU or on the device of mu (", like.device(), "), got ", seeds.device());
}

// One value per sample (grad_log_q / grad_log_p of the multi-sample ops).
inline void check_per_sample(const at::Tensor& t, const at::Tensor& like, int64_t samples, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == samples, name, " must have shape (", samples, ",), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device() == like.device(), name,
                    " must be on the CPU or on the device of mu (", like.device(), "), got ", t.device());
}

// grad_w of the multi-sample backward: (N, *mu.shape), mu's dtype and device.
inline void check_samples_grad_w(const c10::optional<at::Tensor>& grad_w, const at::Tensor& mu, int64_t samples) {
  if (!grad_w.has_value() || !grad_w->defined()) return;
  std::vector<int64_t> shape{samples};
  for (int64_t d : mu.sizes()) shape.push_back(d);
  TORCH_CHECK_VALUE(grad_w->sizes() == at::IntArrayRef(shape), "grad_w must have shape (N, *mu.shape) = ", shape,
                    ", got ", grad_w->sizes());
  TORCH_CHECK_TYPE(grad_w->scalar_type() == mu.scalar_type(), "grad_w must have the dtype of mu (",
                   mu.scalar_type(), "), got ", grad_w->scalar_type());
  TORCH_CHECK_VALUE(grad_w->device() == mu.device(), "grad_w must be on the device of mu (", mu.device(), "), got ",
                    grad_w->device());
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

inline void check_prior_sigma(double sigma) {
  TORCH_CHECK_VALUE(sigma > 0.0 && std::isfinite(sigma), "prior_sigma must be positive and finite, got ", sigma);
}

// prior_sigma of the local reparameterisation ops: 0 means "no KL".
inline void check_optional_prior_sigma(double sigma) {
  TORCH_CHECK_VALUE(sigma >= 0.0 && std::isfinite(sigma), "prior_sigma must be finite and >= 0 (0: no KL), got ",
                    sigma);
}

// The two batch-sized tensors of the LRT output-noise ops (var and mean, std and grad): float32 /
// float64, one dtype, one device, one shape.
inline void check_lrt_noise_args(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  check_floating(a, a_name);
  check_matches(b, b_name, a, a_name);
}

// The seed of the LRT output-noise ops: one value, or a 1-D tensor of N seeds that splits `like`'s
// elements (in memory order) into N equal groups, group s drawing stream (seed[s], offset) from its
// own first element (the vectorised ELBO's N samples, their rows grouped in dim 0). Returns N.
inline int64_t check_seed_groups(const at::Tensor& seed, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "seed must be an int64 tensor, got ", seed.scalar_type());
  TORCH_CHECK_VALUE(seed.numel() == 1 || (seed.dim() == 1 && seed.numel() >= 1),
                    "seed must hold one value or be a 1-D tensor of N >= 1 seeds, got shape ", seed.sizes());
  TORCH_CHECK_VALUE(like.numel() % seed.numel() == 0, "the ", seed.numel(), " seeds must split ", like_name, "'s ",
                    like.numel(), " elements into equal groups");
  TORCH_CHECK_VALUE(seed.device().is_cpu() || seed.device() == like.device(), "seed must be on the CPU or on the "
                    "device of ", like_name, " (", like.device(), "), got ", seed.device());
  return seed.numel();
}

// A gradient buffer an op accumulates into: mu's shape, dtype and device, contiguous.
inline void check_accumulator(const at::Tensor& t, const at::Tensor& mu, const char* name) {
  check_matches(t, name, mu, "mu");
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
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

// The row ops (embedding lookups): mu / rho are the (V, D) table, indices int64 on mu's device.
// The index range is checked by the CPU kernel only (on a GPU it would cost a sync).
inline void check_row_args(const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& indices,
                           const at::Tensor& seed, int64_t offset) {
  check_posterior_params(mu, rho);
  TORCH_CHECK_VALUE(mu.dim() == 2, "mu must be 2-D (num_embeddings, embedding_dim), got shape ", mu.sizes());
  TORCH_CHECK_TYPE(indices.defined() && indices.scalar_type() == at::kLong, "indices must be an int64 tensor, got ",
                   indices.defined() ? c10::toString(indices.scalar_type()) : "None");
  TORCH_CHECK_VALUE(indices.device() == mu.device(), "indices must be on the device of mu (", mu.device(), "), got ",
                    indices.device());
  check_seed(seed, mu);
  check_offset(offset);
  check_start(0, mu.numel());
}

// indices.shape + (dim,): the shape of the looked-up rows.
inline std::vector<int64_t> row_shape(const at::Tensor& indices, int64_t dim) {
  std::vector<int64_t> shape = indices.sizes().vec();
  shape.push_back(dim);
  return shape;
}

inline void check_grad_rows(const at::Tensor& grad_rows, const at::Tensor& mu, const at::Tensor& indices) {
  TORCH_CHECK_TYPE(grad_rows.scalar_type() == mu.scalar_type(), "grad_rows must have the dtype of mu (",
                   mu.scalar_type(), "), got ", grad_rows.scalar_type());
  TORCH_CHECK_VALUE(grad_rows.device() == mu.device(), "grad_rows must be on the device of mu (", mu.device(),
                    "), got ", grad_rows.device());
  const std::vector<int64_t> expected = row_shape(indices, mu.size(1));
  TORCH_CHECK_VALUE(grad_rows.sizes() == at::IntArrayRef(expected),
                    "grad_rows must have shape indices.shape + (embedding_dim,) = ", expected, ", got ",
                    grad_rows.sizes());
}

// The seed's bits as the unsigned Philox key (reads a CUDA seed with a sync; CUDA kernels read it
// on the device instead). A CPU seed is read in place: item() goes through the dispatcher, ~1 us a
// read and four reads a small layer's training step. (Callers have checked it: int64, one value.)
inline uint64_t seed_value(const at::Tensor& seed) {
  if (seed.is_cpu()) return static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
  return static_cast<uint64_t>(seed.item<int64_t>());
}

// A one-value tensor (an incoming gradient of log q / log p) as a T, read in place where it is a
// CPU tensor of that type (as seed_value, for the same reason), else through item().
template <typename T>
T host_scalar(const at::Tensor& t) {
  if (t.is_cpu() && t.scalar_type() == c10::CppTypeToScalarType<T>::value) return *t.const_data_ptr<T>();
  return t.item<T>();
}

}  // namespace bayes_ext
