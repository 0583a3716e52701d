// cpu_gemm.h: which GEMM a layer op's float32 CPU matmul takes, and the call.
#include "cpu_gemm.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace bayes_ext {
namespace cpu_gemm {
namespace {

using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                   c10::string_view, c10::List<c10::optional<c10::Scalar>>,
                                   c10::optional<c10::string_view>);

// The compiler's CPU model query, as kernel_dispatch.h asks it for the ISA.
bool amd_cpu() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return amd;
#else
  return false;
#endif
}

// torch's oneDNN linear, where this torch build has it with the signature used here.
const c10::optional<c10::TypedOperatorHandle<LinearPointwise>>& onednn_linear_op() {
  static const auto op = []() -> c10::optional<c10::TypedOperatorHandle<LinearPointwise>> {
    if (!at::hasMKLDNN()) return c10::nullopt;
    const auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!handle.has_value()) return c10::nullopt;
    try {
      return handle->typed<LinearPointwise>();
    } catch (const c10::Error&) {  // another signature in this torch version
      return c10::nullopt;
    }
  }();
  return op;
}

// Cleared when a oneDNN call fails (an input it does not take in this torch version): from then
// on torch's GEMMs, as if it were not there.
std::atomic<bool> onednn_usable{true};

enum class Choice { kAuto, kOneDnn, kTorch };

Choice choice_from_env() {
  const char* value = std::getenv("BAYES_EXT_CPU_GEMM");
  if (value == nullptr || value[0] == '\0' || std::strcmp(value, "auto") == 0) return Choice::kAuto;
  if (std::strcmp(value, "onednn") == 0) return Choice::kOneDnn;
  if (std::strcmp(value, "torch") == 0) return Choice::kTorch;
  TORCH_CHECK_VALUE(false, "BAYES_EXT_CPU_GEMM must be \"auto\", \"onednn\" or \"torch\", got \"", value, "\"");
}

bool float_cpu(const at::Tensor& t) { return t.device().is_cpu() && t.scalar_type() == at::kFloat; }

// Whether a (..., K) x (N, K)^T product takes oneDNN: float32 CPU operands (and bias), nothing
// autograd would need to differentiate, enough work, and the choice says so.
bool onednn_for(const at::Tensor& a, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  // (shapes that do not fit go to torch's call, whose error names them)
  if (!float_cpu(a) || !float_cpu(w) || a.dim() < 1 || w.dim() != 2 || a.size(-1) != w.size(1) || a.numel() == 0 ||
      w.numel() == 0) {
    return false;
  }
  if (bias.has_value() && bias->defined() &&
      (!float_cpu(*bias) || bias->dim() != 1 || bias->size(0) != w.size(0))) {
    return false;
  }
  const Choice choice = choice_from_env();  // (an unknown value is an error at any size)
  if (choice == Choice::kTorch || (choice == Choice::kAuto && !amd_cpu())) return false;
  if (a.numel() / a.size(-1) * w.numel() < kOneDnnMinMacs) return false;
  if (at::GradMode::is_enabled() && (a.requires_grad() || w.requires_grad() ||
                                     (bias.has_value() && bias->defined() && bias->requires_grad()))) {
    return false;  // the oneDNN op has no derivative formula
  }
  return onednn_usable.load(std::memory_order_relaxed) && onednn_linear_op().has_value();
}

// a w^T + bias through oneDNN, or an undefined tensor where oneDNN is not taken (or failed).
at::Tensor onednn_linear_or_undefined(const at::Tensor& a, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  if (!onednn_for(a, w, bias)) return at::Tensor();
  try {
    return onednn_linear_op()->call(a, w, bias, "none", c10::List<c10::optional<c10::Scalar>>(), c10::nullopt);
  } catch (const c10::Error&) {
    onednn_usable.store(false, std::memory_order_relaxed);
    return at::Tensor();
  }
}

}  // namespace

at::Tensor linear(const at::Tensor& a, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const at::Tensor y = onednn_linear_or_undefined(a, w, bias);
  return y.defined() ? y : at::linear(a, w, bias);
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor y = onednn_linear_or_undefined(a, b.t(), c10::nullopt);
  return y.defined() ? y : a.mm(b);
}

at::Tensor addmm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor product = onednn_linear_or_undefined(a, b.t(), c10::nullopt);
  return product.defined() ? product.add_(c) : at::addmm(c, a, b);
}

at::Tensor& addmm_(at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor product = onednn_linear_or_undefined(a, b.t(), c10::nullopt);
  return product.defined() ? c.add_(product) : c.addmm_(a, b);
}

}  // namespace cpu_gemm
}  // namespace bayes_ext
