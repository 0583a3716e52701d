// The Flipout linear layer (estimator="flipout") in one call each way, CPU: the same ops in the
// same order as the Python implementation of bayes_ext::linear_flipout
// (bayes_ext/functional_estimators.py), so the same values (to float32 rounding where a GEMM takes
// oneDNN's path: cpu_gemm.h); what it saves is the Python and the
// custom-op dispatch between those ops (half of a small layer's step). A large weight's dW is
// sampled and consumed block of rows by block of rows, as there. Eager calls get their autograd
// here too (LinearFlipoutFunction, registered for AutogradCPU); torch.compile, fake tensors and the
// other backends keep the Python custom op. Under autocast x arrives in bf16 / fp16 with float32
// weights: the GEMMs and the signs are in x's dtype, dW, the KL terms and the gradients of the
// parameters in the weights', as in the Python op.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cpu_gemm.h"
#include "layer_op_helpers.h"
#include "recorded_backward.h"
#include "op_calls.h"

namespace bayes_ext {
namespace {

using layer_op::add_mm_;
using layer_op::check_layer_args;
using layer_op::check_x_dtype;
using layer_op::has;
using layer_op::in_dtype;
using layer_op::maybe;
using layer_op::NoAutocast;
using layer_op::with_last;

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Philox streams of the layer (functional_estimators.py): W 0, b 1, the input signs S 3, the
// output signs R 4.
constexpr int64_t kWeightStream = 0, kBiasStream = 1, kSignInStream = 3, kSignOutStream = 4;

struct Prior {
  double pi, sigma1, sigma2;
};

// The sampling ops with this layer's prior.
Triple sample_weight(const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& seed, int64_t offset,
                     const Prior& p, int64_t start, bool noise_only) {
  return op_calls::sample_weight(mu, rho, seed, offset, p.pi, p.sigma1, p.sigma2, start, noise_only);
}

Triple sample_weight_backward(const c10::optional<at::Tensor>& grad_w, const at::Tensor& grad_log_q,
                              const at::Tensor& grad_log_p, const at::Tensor& mu, const at::Tensor& rho,
                              const at::Tensor& seed, int64_t offset, const Prior& p, bool return_weight,
                              int64_t start, bool noise_only) {
  return op_calls::sample_weight_backward(grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset, p.pi, p.sigma1,
                                          p.sigma2, return_weight, start, noise_only);
}

// +1 / -1 of `shape` in `dtype`: the sign of stream (seed, offset)'s normals, drawn in the weights'
// dtype (`weight`'s), +1 for 0 and -0, as functional_estimators.signs. One pass in place: ge_, mul_
// and sub_ with a number each made a 0-dim tensor and copied it (12 of a small layer's step).
at::Tensor signs(at::IntArrayRef shape, const at::Tensor& seed, int64_t offset, const at::Tensor& weight,
                 at::ScalarType dtype) {
  at::Tensor normals = op_calls::philox_normal(at::empty(shape, weight.options()), seed, offset, 0).contiguous();
  AT_DISPATCH_FLOATING_TYPES(normals.scalar_type(), "flipout_signs", [&] {
    scalar_t* values = normals.data_ptr<scalar_t>();
    at::parallel_for(0, normals.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) values[i] = values[i] >= 0 ? scalar_t(1) : scalar_t(-1);
    });
  });
  return in_dtype(normals, dtype);
}

// (y, log_q, log_p): y = x mu^T + b + ((x * S) dW^T) * R with dW = W - mu, W and b sampled on the
// weight's and the bias's streams, whose log q / log p are returned.
Triple linear_flipout_rows(const at::Tensor& x, const at::Tensor& weight_mu_in, const at::Tensor& weight_rho_in,
                           const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                           const at::Tensor& seed, double pi, double sigma1, double sigma2, int64_t block_rows) {
  check_x_dtype(x, weight_mu_in);
  check_layer_args(x, weight_mu_in, bias_mu, bias_rho, block_rows, /*check_dtype=*/false);
  const NoAutocast no_autocast;
  const Prior prior{pi, sigma1, sigma2};
  const int64_t out_features = weight_mu_in.size(0), in_features = weight_mu_in.size(1);
  const auto x_dtype = x.scalar_type();
  const at::Tensor x_signed = x * signs(x.sizes(), seed, kSignInStream, weight_mu_in, x_dtype);
  at::Tensor perturbation, log_q, log_p;
  if (block_rows >= out_features) {
    at::Tensor dw;
    std::tie(dw, log_q, log_p) = sample_weight(weight_mu_in, weight_rho_in, seed, kWeightStream, prior, 0, true);
    perturbation = cpu_gemm::linear(x_signed, in_dtype(dw, x_dtype));
  } else {
    // each block of rows of dW with the noise it has in the whole weight, consumed while in cache
    const at::Tensor weight_mu = weight_mu_in.contiguous(), weight_rho = weight_rho_in.contiguous();
    const at::Tensor x_2d = x_signed.reshape({-1, in_features});
    perturbation = at::empty({x_2d.size(0), out_features}, x.options());
    for (int64_t r0 = 0; r0 < out_features; r0 += block_rows) {
      const int64_t r1 = std::min(r0 + block_rows, out_features);
      auto [dw, q, p] = sample_weight(weight_mu.slice(0, r0, r1), weight_rho.slice(0, r0, r1), seed, kWeightStream,
                                      prior, r0 * in_features, true);
      perturbation.slice(1, r0, r1).copy_(cpu_gemm::linear(x_2d, in_dtype(dw, x_dtype)));
      log_q = log_q.defined() ? log_q + q : q;
      log_p = log_p.defined() ? log_p + p : p;
    }
    perturbation = perturbation.reshape(with_last(x_signed.sizes(), out_features));
  }
  perturbation.mul_(signs(perturbation.sizes(), seed, kSignOutStream, weight_mu_in, x_dtype));
  at::Tensor y = cpu_gemm::addmm(perturbation.reshape({-1, out_features}), x.reshape({-1, in_features}),
                                 in_dtype(weight_mu_in.t(), x_dtype))
                     .reshape(perturbation.sizes());
  if (has(bias_mu)) {
    auto [b, log_q_b, log_p_b] = sample_weight(*bias_mu, *bias_rho, seed, kBiasStream, prior, 0, false);
    y.add_(in_dtype(b, x_dtype));
    log_q = log_q + log_q_b;
    log_p = log_p + log_p_b;
  }
  return {y, log_q, log_p};
}

// (grad_x, grad_weight_mu, grad_weight_rho, grad_bias_mu, grad_bias_rho), each empty where not
// asked for (need_x, need_w, need_b); dW, S and R regenerated from the seed.
Grads linear_flipout_rows_backward(const at::Tensor& grad_y, const at::Tensor& grad_log_q, const at::Tensor& grad_log_p,
                                   const at::Tensor& x, const at::Tensor& weight_mu_in, const at::Tensor& weight_rho_in,
                                   const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                                   const at::Tensor& seed, double pi, double sigma1, double sigma2, int64_t block_rows,
                                   bool need_x, bool need_w, bool need_b) {
  check_x_dtype(x, weight_mu_in);
  check_layer_args(x, weight_mu_in, bias_mu, bias_rho, block_rows, /*check_dtype=*/false);
  const NoAutocast no_autocast;
  const Prior prior{pi, sigma1, sigma2};
  const int64_t out_features = weight_mu_in.size(0), in_features = weight_mu_in.size(1);
  const auto x_dtype = x.scalar_type(), w_dtype = weight_mu_in.scalar_type();
  const std::vector<int64_t> y_shape = with_last(x.sizes(), out_features);
  TORCH_CHECK_VALUE(grad_y.sizes() == at::IntArrayRef(y_shape), "grad_y must have shape x.shape[:-1] + (",
                    out_features, ",) = ", y_shape, ", got ", grad_y.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), "grad_y must have the dtype of x (", x.scalar_type(),
                   "), got ", grad_y.scalar_type());
  need_b = need_b && has(bias_mu);
  const at::Tensor x_2d = x.reshape({-1, in_features});
  const at::Tensor g = grad_y.reshape({-1, out_features});
  const at::Tensor g_signed = g * signs(g.sizes(), seed, kSignOutStream, weight_mu_in, x_dtype);
  const at::Tensor s_in = signs(x_2d.sizes(), seed, kSignInStream, weight_mu_in, x_dtype);
  at::Tensor grad_x, grad_mu, grad_rho, dw;
  if (need_w && block_rows < out_features) {
    // block by block of rows: each block's dW regenerated, differentiated straight into the rows of
    // the whole gradients and consumed by dL/dx while in cache
    const at::Tensor weight_mu = weight_mu_in.contiguous(), weight_rho = weight_rho_in.contiguous();
    std::tie(grad_mu, grad_rho) = layer_op::weight_grad_pair(weight_mu);
    const at::Tensor x_in = x_2d * s_in;
    at::Tensor signed_grad_x = need_x ? at::zeros(x_2d.sizes(), x_2d.options()) : at::Tensor();
    for (int64_t r0 = 0; r0 < out_features; r0 += block_rows) {
      const int64_t r1 = std::min(r0 + block_rows, out_features);
      at::Tensor grad_mu_rows = grad_mu.slice(0, r0, r1), grad_rho_rows = grad_rho.slice(0, r0, r1);
      const at::Tensor grad_dw = in_dtype(g_signed.slice(1, r0, r1).t().mm(x_in), w_dtype);
      // the noise's backward puts the KL's terms in grad_mu and grad_dw into grad_rho; mu's own
      // term is g^T x
      const at::Tensor block_dw = op_calls::sample_weight_backward_into(
          grad_mu_rows, grad_rho_rows, grad_dw, grad_log_q, grad_log_p, weight_mu.slice(0, r0, r1),
          weight_rho.slice(0, r0, r1), seed, kWeightStream, prior.pi, prior.sigma1, prior.sigma2, need_x,
          r0 * in_features, true);
      add_mm_(grad_mu_rows, g.slice(1, r0, r1).t(), x_2d);
      if (need_x) cpu_gemm::addmm_(signed_grad_x, g_signed.slice(1, r0, r1), in_dtype(block_dw, x_dtype));
    }
    if (need_x) grad_x = at::addcmul(cpu_gemm::mm(g, in_dtype(weight_mu, x_dtype)), signed_grad_x, s_in);
  } else if (need_w) {
    const at::Tensor grad_dw = in_dtype(g_signed.t().mm(x_2d * s_in), w_dtype);
    std::tie(grad_mu, grad_rho, dw) = sample_weight_backward(grad_dw, grad_log_q, grad_log_p, weight_mu_in,
                                                             weight_rho_in, seed, kWeightStream, prior, need_x, 0,
                                                             true);
    add_mm_(grad_mu, g.t(), x_2d);
  } else if (need_x) {
    dw = std::get<0>(sample_weight(weight_mu_in, weight_rho_in, seed, kWeightStream, prior, 0, true));
  }
  if (need_x && !grad_x.defined()) {
    grad_x = at::addcmul(cpu_gemm::mm(g, in_dtype(weight_mu_in, x_dtype)),
                         cpu_gemm::mm(g_signed, in_dtype(dw, x_dtype)), s_in);
  }
  at::Tensor grad_bias_mu, grad_bias_rho;
  if (need_b) {
    std::tie(grad_bias_mu, grad_bias_rho, std::ignore) =
        sample_weight_backward(g.sum(0, false, bias_mu->scalar_type()), grad_log_q, grad_log_p, *bias_mu, *bias_rho,
                               seed, kBiasStream, prior, false, 0, false);
  }
  const at::Tensor none = at::empty({0}, weight_mu_in.options());
  return {need_x ? grad_x.reshape(x.sizes()) : none, need_w ? grad_mu : none, need_w ? grad_rho : none,
          need_b ? grad_bias_mu : none, need_b ? grad_bias_rho : none};
}

// Through the dispatcher: below autograd the call reaches the CPU kernel above (or a fake one).
Triple call_forward(const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                    const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                    const at::Tensor& seed, const Prior& p, int64_t block_rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::linear_flipout_rows", "")
                       .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                     const at::Tensor&, double, double, double, int64_t)>();
  return op.call(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, p.pi, p.sigma1, p.sigma2, block_rows);
}

Grads call_backward(const at::Tensor& grad_y, const at::Tensor& grad_log_q, const at::Tensor& grad_log_p,
                    const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                    const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                    const at::Tensor& seed, const Prior& p, int64_t block_rows, bool need_x, bool need_w,
                    bool need_b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::linear_flipout_rows_backward", "")
                       .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                    const c10::optional<at::Tensor>&, const at::Tensor&, double, double, double,
                                    int64_t, bool, bool, bool)>();
  return op.call(grad_y, grad_log_q, grad_log_p, x, weight_mu, weight_rho, bias_mu, bias_rho, seed, p.pi, p.sigma1,
                 p.sigma2, block_rows, need_x, need_w, need_b);
}

// Saves what the Python op saves: x, the parameters and the seed (dW and the signs are
// regenerated). A recorded backward (create_graph=True) differentiates the Python op instead
// (recorded_backward.h): exact to every order.
class LinearFlipoutFunction : public torch::autograd::Function<LinearFlipoutFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                                                const c10::optional<at::Tensor>& bias_mu,
                                                const c10::optional<at::Tensor>& bias_rho, const at::Tensor& seed,
                                                double pi, double sigma1, double sigma2, int64_t block_rows) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, log_q, log_p] = call_forward(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, {pi, sigma1, sigma2},
                                          block_rows);
    ctx->save_for_backward({x, weight_mu, weight_rho, bias_mu.value_or(at::Tensor()),
                            bias_rho.value_or(at::Tensor()), seed});
    ctx->saved_data["prior"] = std::vector<double>{pi, sigma1, sigma2};
    ctx->saved_data["block_rows"] = block_rows;
    return {y, log_q, log_p};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (at::GradMode::is_enabled()) {  // create_graph=True: exact to every order (recorded_backward.h)
      return layer_op::recorded_layer_backward(ctx, "bayes_ext::linear_flipout", saved,
                                               ctx->saved_data["prior"].toDoubleVector(), grads, 10);
    }
    const at::Tensor &x = saved[0], &weight_mu = saved[1], &weight_rho = saved[2], &seed = saved[5];
    const std::vector<double> pv = ctx->saved_data["prior"].toDoubleVector();
    const Prior prior{pv[0], pv[1], pv[2]};
    const int64_t block_rows = ctx->saved_data["block_rows"].toInt();
    const bool has_bias = saved[3].defined();
    const int64_t out_features = weight_mu.size(0);
    // an output that was not used gets no gradient from autograd: zeros of its shape
    const at::Tensor grad_y = grads[0].defined() ? in_dtype(grads[0], x.scalar_type())
                                                 : at::zeros(with_last(x.sizes(), out_features), x.options());
    const at::Tensor grad_log_q = grads[1].defined() ? grads[1] : at::zeros({}, weight_mu.options());
    const at::Tensor grad_log_p = grads[2].defined() ? grads[2] : at::zeros({}, weight_mu.options());
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    const bool need_b = has_bias && (ctx->needs_input_grad(3) || ctx->needs_input_grad(4));
    Grads computed;
    {
      layer_op::KernelsOnly kernels_only;
      computed = call_backward(grad_y, grad_log_q, grad_log_p, x, weight_mu, weight_rho, maybe(saved[3]),
                               maybe(saved[4]), seed, prior, block_rows, need_x, need_w, need_b);
    }
    auto [grad_x, grad_mu, grad_rho, grad_bias_mu, grad_bias_rho] = computed;
    const at::Tensor none;
    return {need_x ? grad_x : none,
            need_w ? grad_mu : none,
            need_w ? grad_rho : none,
            need_b ? grad_bias_mu : none,
            need_b ? grad_bias_rho : none,
            none,
            none,
            none,
            none,
            none};
  }
};

Triple linear_flipout_rows_autograd(const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                                    const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                                    const at::Tensor& seed, double pi, double sigma1, double sigma2,
                                    int64_t block_rows) {
  auto out = LinearFlipoutFunction::apply(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, pi, sigma1, sigma2,
                                          block_rows);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bayes_ext, CPU, m) {
  m.impl("linear_flipout_rows", &linear_flipout_rows);
  m.impl("linear_flipout_rows_backward", &linear_flipout_rows_backward);
}

TORCH_LIBRARY_IMPL(bayes_ext, AutogradCPU, m) {
  m.impl("linear_flipout_rows", &linear_flipout_rows_autograd);
}

}  // namespace bayes_ext
