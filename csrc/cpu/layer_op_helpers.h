// Small helpers of the whole-layer CPU ops (linear_samples_cpu.cpp, linear_reparam_cpu.cpp):
// optional tensors as the dispatcher passes them, and output shapes.
#pragma once

#include <ATen/ATen.h>

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

// `shape` with its last size replaced: the output of a linear layer for input shape `shape`.
inline std::vector<int64_t> with_last(at::IntArrayRef shape, int64_t last) {
  std::vector<int64_t> out = shape.vec();
  out.back() = last;
  return out;
}

}  // namespace layer_op
}  // namespace bayes_ext
