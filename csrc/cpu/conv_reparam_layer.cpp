// The reparameterised convolution layer (one weight sample) in one call each way: the same ops in
// the same order as the Python op bayes_ext::conv_reparam (bayes_ext/functional_conv.py), so the
// same values, without the Python between them (a custom op's Python dispatch, its autograd.Function
// and the dozen small calls of its backward: on a GPU, where a mid-sized convolution takes
// microseconds, they are most of the step). Eager calls get their autograd here
// (ConvReparamFunction, AutogradCPU and AutogradCUDA); torch.compile, fake tensors, functorch and
// the pure-PyTorch backend keep the Python op, and so does a recorded backward (create_graph=True).
//
// Device-generic like linear_reparam_cpu.cpp: only dispatcher calls (the sampling ops' CPU or CUDA
// kernels, aten's convolutions), registered for both. Under autocast x arrives in the lower
// precision and W and b are sampled straight into it (sample_weight_as), as the Python op casts them.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "layer_op_helpers.h"
#include "op_calls.h"
#include "recorded_backward.h"

namespace bayes_ext {
namespace {

using layer_op::has;
using layer_op::maybe;
using layer_op::NoAutocast;

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// What the op checks itself (the Python layer checked the rest, with its own wording, before the call):
// the parameters' pairing, dtypes and devices, and x in their dtype or, with float32 parameters,
// autocast's bf16 / fp16.
void check_conv_args(const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                     const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                     bool transposed, int64_t groups) {
  TORCH_CHECK_VALUE(weight_mu.dim() >= 3 && weight_mu.numel() > 0,
                    "weight_mu must be a non-empty 1-d, 2-d or 3-d convolution weight, got shape ", weight_mu.sizes());
  TORCH_CHECK_VALUE(weight_rho.sizes() == weight_mu.sizes(), "weight_rho must have the shape of weight_mu (",
                    weight_mu.sizes(), "), got ", weight_rho.sizes());
  TORCH_CHECK_VALUE(x.device() == weight_mu.device(), "x must be on the device of weight_mu (", weight_mu.device(),
                    "), got ", x.device());
  layer_op::check_x_dtype(x, weight_mu);
  TORCH_CHECK_VALUE(has(bias_mu) == has(bias_rho), "bias_mu and bias_rho must be given together");
  if (has(bias_mu)) {  // (their dtype and device are the sampling ops' checks)
    const int64_t out_channels = transposed ? weight_mu.size(1) * groups : weight_mu.size(0);
    TORCH_CHECK_VALUE(bias_mu->dim() == 1 && bias_mu->size(0) == out_channels, "bias_mu must have shape (",
                      out_channels, ",) (out_channels), got ", bias_mu->sizes());
    TORCH_CHECK_VALUE(bias_rho->sizes() == bias_mu->sizes(), "bias_rho must have the shape of bias_mu (",
                      bias_mu->sizes(), "), got ", bias_rho->sizes());
  }
}

// W (x's dtype, weight_mu's shape) and b, with their summed log q / log p. A (non-transposed)
// convolution's bias has one value per weight row, so on CUDA both are sampled in one launch; the
// noise only depends on the flat index, so the 2-D view draws the 4-D weight's own.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_conv_weight_bias(
    const at::Tensor& weight_mu, const at::Tensor& weight_rho, const c10::optional<at::Tensor>& bias_mu,
    const c10::optional<at::Tensor>& bias_rho, const at::Tensor& seed, double pi, double sigma1, double sigma2,
    at::ScalarType dtype) {
  if (has(bias_mu) && bias_mu->dim() == 1 && bias_mu->size(0) == weight_mu.size(0)) {
    const at::Tensor mu_2d = weight_mu.reshape({weight_mu.size(0), -1});
    const at::Tensor rho_2d = weight_rho.reshape({weight_mu.size(0), -1});
    auto [w, b, log_q, log_p] =
        op_calls::sample_weight_bias_as(mu_2d, rho_2d, *bias_mu, *bias_rho, seed, pi, sigma1, sigma2, dtype);
    return {w.view(weight_mu.sizes()), b, log_q, log_p};
  }
  auto [w, log_q, log_p] = op_calls::sample_weight_as(weight_mu, weight_rho, seed, 0, pi, sigma1, sigma2, dtype, true);
  if (!has(bias_mu)) return {w, at::Tensor(), log_q, log_p};
  auto [b, log_q_b, log_p_b] = op_calls::sample_weight_as(*bias_mu, *bias_rho, seed, 1, pi, sigma1, sigma2, dtype, true);
  return {w, b, log_q + log_q_b, log_p + log_p_b};
}

Triple conv_reparam_layer(const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                          const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                          const at::Tensor& seed, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding, int64_t groups,
                          double pi, double sigma1, double sigma2) {
  check_conv_args(x, weight_mu, weight_rho, bias_mu, bias_rho, transposed, groups);
  const NoAutocast no_autocast;
  auto [w, b, log_q, log_p] =
      sample_conv_weight_bias(weight_mu, weight_rho, bias_mu, bias_rho, seed, pi, sigma1, sigma2, x.scalar_type());
  const c10::optional<at::Tensor> bias = b.defined() ? c10::optional<at::Tensor>(b) : c10::nullopt;
  return {at::convolution(x, w, bias, stride, padding, dilation, transposed, output_padding, groups), log_q, log_p};
}

// (grad_x (empty unless need_x), grad_weight_mu, grad_weight_rho, grad_bias_mu, grad_bias_rho (both
// empty without a bias)). dL/dx first, from W rebuilt by the sampling kernel and freed before the
// weight gradients exist; then dL/dW, whose buffer becomes grad_weight_mu in place.
Grads conv_reparam_layer_backward(const at::Tensor& grad_out_in, const at::Tensor& grad_log_q,
                                  const at::Tensor& grad_log_p, const at::Tensor& x, const at::Tensor& weight_mu,
                                  const at::Tensor& weight_rho, const c10::optional<at::Tensor>& bias_mu,
                                  const c10::optional<at::Tensor>& bias_rho, const at::Tensor& seed,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  bool transposed, at::IntArrayRef output_padding, int64_t groups, double pi,
                                  double sigma1, double sigma2, bool need_x) {
  check_conv_args(x, weight_mu, weight_rho, bias_mu, bias_rho, transposed, groups);
  const NoAutocast no_autocast;
  const at::Tensor grad_out = grad_out_in.to(x.scalar_type());
  at::Tensor grad_x;
  if (need_x) {
    const at::Tensor w =
        std::get<0>(op_calls::sample_weight_as(weight_mu, weight_rho, seed, 0, pi, sigma1, sigma2, x.scalar_type(),
                                               false));
    grad_x = std::get<0>(at::convolution_backward(grad_out, x, w, c10::nullopt, stride, padding, dilation, transposed,
                                                  output_padding, groups, {true, false, false}));
  } else {
    grad_x = at::empty({0}, x.options());
  }
  // with output_mask (False, True, False) the weight argument is only read for its shape, dtype and
  // layout (torch.nn.grad.conv*d_weight passes an expanded placeholder too)
  const at::Tensor weight_like = at::empty({}, weight_mu.options().dtype(x.scalar_type())).expand(weight_mu.sizes());
  const at::Tensor grad_w = std::get<1>(at::convolution_backward(grad_out, x, weight_like, c10::nullopt, stride,
                                                                 padding, dilation, transposed, output_padding,
                                                                 groups, {false, true, false}));
  at::Tensor grad_mu = grad_w.to(weight_mu.scalar_type(), /*non_blocking=*/false, /*copy=*/false,
                                 at::MemoryFormat::Contiguous);
  at::Tensor grad_rho, grad_bias_mu, grad_bias_rho;
  if (has(bias_mu)) {
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < grad_out.dim(); ++d) dims.push_back(d);
    const at::Tensor grad_b = grad_out.sum(dims, false, bias_mu->scalar_type());
    if (bias_mu->dim() == 1 && bias_mu->size(0) == weight_mu.size(0)) {  // one call (one CUDA launch)
      at::Tensor grad_mu_2d = grad_mu.view({weight_mu.size(0), -1});
      std::tie(grad_rho, grad_bias_mu, grad_bias_rho) = op_calls::sample_weight_bias_backward_(
          grad_mu_2d, grad_b, grad_log_q, grad_log_p, weight_mu.reshape({weight_mu.size(0), -1}),
          weight_rho.reshape({weight_mu.size(0), -1}), *bias_mu, *bias_rho, seed, pi, sigma1, sigma2);
      grad_rho = grad_rho.view(weight_mu.sizes());
    } else {
      std::tie(grad_mu, grad_rho, std::ignore) = op_calls::sample_weight_backward(
          grad_mu, grad_log_q, grad_log_p, weight_mu, weight_rho, seed, 0, pi, sigma1, sigma2, false, 0, false);
      std::tie(grad_bias_mu, grad_bias_rho, std::ignore) = op_calls::sample_weight_backward(
          grad_b, grad_log_q, grad_log_p, *bias_mu, *bias_rho, seed, 1, pi, sigma1, sigma2, false, 0, false);
    }
  } else {
    std::tie(grad_mu, grad_rho, std::ignore) = op_calls::sample_weight_backward(
        grad_mu, grad_log_q, grad_log_p, weight_mu, weight_rho, seed, 0, pi, sigma1, sigma2, false, 0, false);
    grad_bias_mu = at::empty({0}, weight_mu.options());
    grad_bias_rho = at::empty({0}, weight_mu.options());
  }
  return {grad_x, grad_mu, grad_rho, grad_bias_mu, grad_bias_rho};
}

// Through the dispatcher: below autograd the calls reach the kernels above (or fake ones).
Triple call_forward(const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                    const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                    const at::Tensor& seed, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    bool transposed, at::IntArrayRef output_padding, int64_t groups, double pi, double sigma1,
                    double sigma2) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::conv_reparam_layer", "")
                       .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                     const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool,
                                     at::IntArrayRef, int64_t, double, double, double)>();
  return op.call(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, stride, padding, dilation, transposed,
                 output_padding, groups, pi, sigma1, sigma2);
}

Grads call_backward(const at::Tensor& grad_out, const at::Tensor& grad_log_q, const at::Tensor& grad_log_p,
                    const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                    const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                    const at::Tensor& seed, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    bool transposed, at::IntArrayRef output_padding, int64_t groups, double pi, double sigma1,
                    double sigma2, bool need_x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::conv_reparam_layer_backward", "")
                       .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                    const c10::optional<at::Tensor>&, const at::Tensor&, at::IntArrayRef,
                                    at::IntArrayRef, at::IntArrayRef, bool, at::IntArrayRef, int64_t, double, double,
                                    double, bool)>();
  return op.call(grad_out, grad_log_q, grad_log_p, x, weight_mu, weight_rho, bias_mu, bias_rho, seed, stride, padding,
                 dilation, transposed, output_padding, groups, pi, sigma1, sigma2, need_x);
}

// Saves what the Python op saves: x, the parameters and the seed (W is rebuilt in backward).
class ConvReparamFunction : public torch::autograd::Function<ConvReparamFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                                                const c10::optional<at::Tensor>& bias_mu,
                                                const c10::optional<at::Tensor>& bias_rho, const at::Tensor& seed,
                                                at::IntArrayRef stride, at::IntArrayRef padding,
                                                at::IntArrayRef dilation, bool transposed,
                                                at::IntArrayRef output_padding, int64_t groups, double pi,
                                                double sigma1, double sigma2) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, log_q, log_p] = call_forward(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, stride, padding, dilation,
                                          transposed, output_padding, groups, pi, sigma1, sigma2);
    ctx->save_for_backward({x, weight_mu, weight_rho, bias_mu.value_or(at::Tensor()),
                            bias_rho.value_or(at::Tensor()), seed});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["transposed"] = transposed;
    ctx->saved_data["output_padding"] = output_padding.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["prior"] = std::vector<double>{pi, sigma1, sigma2};
    return {y, log_q, log_p};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const std::vector<int64_t> dilation = ctx->saved_data["dilation"].toIntVector();
    const std::vector<int64_t> output_padding = ctx->saved_data["output_padding"].toIntVector();
    const bool transposed = ctx->saved_data["transposed"].toBool();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const std::vector<double> prior = ctx->saved_data["prior"].toDoubleVector();
    const bool has_bias = saved[3].defined();
    constexpr size_t kArguments = 15;
    if (at::GradMode::is_enabled()) {  // create_graph=True: the Python op's recorded backward, exact to every order
      std::vector<c10::IValue> args{saved[0], saved[1], saved[2], layer_op::optional_arg(saved[3]),
                                    layer_op::optional_arg(saved[4]), saved[5], stride, padding, dilation,
                                    transposed, output_padding, groups, prior[0], prior[1], prior[2]};
      // (an absent bias has no input edge: needs_input_grad(3) would be out of range)
      std::vector<bool> needs(args.size(), false);
      for (size_t i = 0; i < (has_bias ? 5u : 3u); ++i) needs[i] = ctx->needs_input_grad(i);
      auto recorded = layer_op::recorded_backward("bayes_ext::conv_reparam", std::move(args), needs, grads);
      recorded.resize(kArguments);
      return recorded;
    }
    const at::Tensor &x = saved[0], &weight_mu = saved[1], &weight_rho = saved[2], &seed = saved[5];
    const at::Tensor grad_log_q = grads[1].defined() ? grads[1] : at::zeros({}, weight_mu.options());
    const at::Tensor grad_log_p = grads[2].defined() ? grads[2] : at::zeros({}, weight_mu.options());
    const bool need_x = ctx->needs_input_grad(0) && grads[0].defined();
    const at::Tensor none;
    torch::autograd::variable_list result(kArguments);
    if (!grads[0].defined()) {  // only the KL terms were used: their gradients, no convolution
      layer_op::KernelsOnly kernels_only;
      std::tie(result[1], result[2], std::ignore) = op_calls::sample_weight_backward(
          c10::nullopt, grad_log_q, grad_log_p, weight_mu, weight_rho, seed, 0, prior[0], prior[1], prior[2], false,
          0, false);
      if (has_bias) {
        std::tie(result[3], result[4], std::ignore) = op_calls::sample_weight_backward(
            c10::nullopt, grad_log_q, grad_log_p, saved[3], saved[4], seed, 1, prior[0], prior[1], prior[2], false,
            0, false);
      }
      return result;
    }
    Grads computed;
    {
      layer_op::KernelsOnly kernels_only;
      computed = call_backward(grads[0], grad_log_q, grad_log_p, x, weight_mu, weight_rho, maybe(saved[3]),
                               maybe(saved[4]), seed, stride, padding, dilation, transposed, output_padding, groups,
                               prior[0], prior[1], prior[2], need_x);
    }
    auto [grad_x, grad_mu, grad_rho, grad_bias_mu, grad_bias_rho] = computed;
    result[0] = need_x ? grad_x : none;
    result[1] = grad_mu;
    result[2] = grad_rho;
    result[3] = has_bias ? grad_bias_mu : none;
    result[4] = has_bias ? grad_bias_rho : none;
    return result;
  }
};

Triple conv_reparam_layer_autograd(const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                                   const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                                   const at::Tensor& seed, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                                   int64_t groups, double pi, double sigma1, double sigma2) {
  auto out = ConvReparamFunction::apply(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, stride, padding, dilation,
                                        transposed, output_padding, groups, pi, sigma1, sigma2);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bayes_ext, CPU, m) {
  m.impl("conv_reparam_layer", &conv_reparam_layer);
  m.impl("conv_reparam_layer_backward", &conv_reparam_layer_backward);
}

TORCH_LIBRARY_IMPL(bayes_ext, AutogradCPU, m) {
  m.impl("conv_reparam_layer", &conv_reparam_layer_autograd);
}

// Device-generic (see the top of the file), as linear_reparam_cpu.cpp registers its op.
TORCH_LIBRARY_IMPL(bayes_ext, CUDA, m) {
  m.impl("conv_reparam_layer", &conv_reparam_layer);
  m.impl("conv_reparam_layer_backward", &conv_reparam_layer_backward);
}

TORCH_LIBRARY_IMPL(bayes_ext, AutogradCUDA, m) {
  m.impl("conv_reparam_layer", &conv_reparam_layer_autograd);
}

}  // namespace bayes_ext
