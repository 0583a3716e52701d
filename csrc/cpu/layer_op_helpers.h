// Small helpers of the whole-layer CPU ops (linear_samples_cpu.cpp, linear_reparam_cpu.cpp,
// linear_lrt_cpu.cpp): optional tensors as the dispatcher passes them, output shapes, argument
// checks and the guard of their backwards' kernel calls.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <tuple>
#include <vector>

namespace bayes_ext {
namespace layer_op {

// An optional tensor argument that is given (the dispatcher may pass an undefined tensor too).
inline bool has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A saved tensor (undefined when there was none) back as an optional argument.
inline c10::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// For the kernels a C++ autograd Function's backward calls: no graph is recorded (no grad), and
// their nested op calls skip the autograd dispatch keys, where ops without an autograd kernel take
// the boxed not-implemented fallback (~7% of the vectorised ELBO step when it ran there).
struct KernelsOnly {
  at::NoGradGuard no_grad;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
};

// The ops inside a layer op run in the dtypes it chose (W cast to x's), not autocast's.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// `shape` with its last size replaced: the output of a linear layer for input shape `shape`.
inline std::vector<int64_t> with_last(at::IntArrayRef shape, int64_t last) {
  std::vector<int64_t> out = shape.vec();
  out.back() = last;
  return out;
}

// Two uninitialised weight-shaped gradients (mu's and rho's), halves of one allocation: see
// functional.weight_grad_pair (glibc unmapped two separate fresh gradients freed
// together and they page-faulted in again every step).
// Each half has a storage of its own, which keeps the allocation alive. Autograd adds a later
// sample's gradient in place only into a storage that nothing else shares: with two views of one
// storage, a step of sample_nbr > 1 forwards left rho's .grad holding the whole pair, twice its size.
inline std::tuple<at::Tensor, at::Tensor> weight_grad_pair(const at::Tensor& weight) {
  std::vector<int64_t> shape = weight.sizes().vec();
  shape.insert(shape.begin(), 2);
  const at::Tensor pair = at::empty(shape, weight.options());
  const auto half = [&](int64_t i) {
    return at::from_blob(pair[i].data_ptr(), weight.sizes(), [pair](void*) {}, weight.options());
  };
  return {half(0), half(1)};
}

// `t` in `dtype`: itself when it already is. Tensor::to returns self then too, but through a
// dispatcher call; the fp32 path of the LRT and Flipout ops made ~10 of those a step.
inline at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// x in the weights' dtype, or (autocast) a lower floating precision than fp32 weights: the x the
// layer ops take (linear_reparam_rows, conv_reparam_layer, linear_lrt_rows, linear_flipout_rows);
// their GEMMs run in x's dtype, the weight passes in the weights'.
inline void check_x_dtype(const at::Tensor& x, const at::Tensor& weight_mu) {
  const auto xt = x.scalar_type();
  const bool lower = (xt == at::kBFloat16 || xt == at::kHalf) && weight_mu.scalar_type() == at::kFloat;
  TORCH_CHECK_TYPE(xt == weight_mu.scalar_type() || lower, "x must have the dtype of weight_mu (",
                   weight_mu.scalar_type(), ") or, under autocast, bfloat16 / float16 with float32 weights; got ", xt);
}

// out = a b where out may be in a higher precision than a and b (autocast's x with float32 weights:
// the product in a's dtype, then cast into out), as functional_estimators.mm_into.
inline void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    out.copy_(a.mm(b));
  }
}

// out += a b, likewise (functional_estimators._add_mm).
inline void add_mm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    out.addmm_(a, b);
  } else {
    out.add_(a.mm(b).to(out.scalar_type()));
  }
}

// The arguments every one-sample layer op checks: a non-empty 2-D weight, x (..., in_features) in its dtype
// and on its device, bias_mu and bias_rho together and in the weight's dtype and on its device, a
// positive block size. An op that accepts other x dtypes (autocast's) checks the dtype itself and
// passes check_dtype = false.
inline void check_layer_args(const at::Tensor& x, const at::Tensor& weight_mu,
                             const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                             int64_t block_rows, bool check_dtype = true) {
  TORCH_CHECK_VALUE(weight_mu.dim() == 2, "weight_mu must be (out_features, in_features), got shape ",
                    weight_mu.sizes());
  // as the Python checks: an empty layer would return an empty (or all-bias) output without a word
  TORCH_CHECK_VALUE(weight_mu.numel() > 0, "weight_mu must not be empty, got shape ", weight_mu.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight_mu.size(1), "x must be (..., in_features) = (..., ",
                    weight_mu.size(1), "), got shape ", x.sizes());
  TORCH_CHECK_TYPE(!check_dtype || x.scalar_type() == weight_mu.scalar_type(), "x must have the dtype of weight_mu (",
                   weight_mu.scalar_type(), "), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == weight_mu.device(), "x must be on the device of weight_mu (", weight_mu.device(),
                    "), got ", x.device());
  TORCH_CHECK_VALUE(has(bias_mu) == has(bias_rho), "bias_mu and bias_rho must be given together");
  if (has(bias_mu)) {  // (the bias's own shape and rho's match are the sampling ops' checks)
    TORCH_CHECK_TYPE(bias_mu->scalar_type() == weight_mu.scalar_type(), "bias_mu must have the dtype of weight_mu (",
                     weight_mu.scalar_type(), "), got ", bias_mu->scalar_type());
    TORCH_CHECK_VALUE(bias_mu->device() == weight_mu.device(), "bias_mu must be on the device of weight_mu (",
                      weight_mu.device(), "), got ", bias_mu->device());
  }
  TORCH_CHECK_VALUE(block_rows >= 1, "block_rows must be positive, got ", block_rows);
}

}  // namespace layer_op
}  // namespace bayes_ext
