// The local-reparameterisation linear layer (estimator="lrt") in one call each way, CPU: the same
// ops in the same order as the Python implementation of bayes_ext::linear_lrt
// (bayes_ext/functional_estimators.py), so the same values (to float32 rounding where a GEMM takes
// oneDNN's path: cpu_gemm.h); what it saves is the Python between those ops. On two threads its
// pairs of independent GEMMs run side by side, one per thread (side_by_side.h): faster, and the
// same values to float32 rounding (bit for bit for small layers). A large weight's sigma^2 is built
// and consumed block of rows by block of rows, as there. Eager calls get their autograd here too
// (LinearLrtFunction, registered for AutogradCPU); torch.compile, fake tensors and the other
// backends keep the Python custom op. Under autocast x arrives in bf16 / fp16 with float32 weights:
// the GEMMs run in x's dtype (the weights cast to it), mean, var, std and the weight passes in the
// weights' dtype, y comes back in x's, as in the Python op.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cpu_gemm.h"
#include "layer_op_helpers.h"
#include "recorded_backward.h"
#include "lrt_weight_cpu.h"
#include "scratch.h"
#include "side_by_side.h"

namespace bayes_ext {
namespace {

using layer_op::check_layer_args;
using layer_op::check_x_dtype;
using layer_op::has;
using layer_op::in_dtype;
using layer_op::maybe;
using layer_op::mm_into;
using layer_op::NoAutocast;
using layer_op::ScratchLease;
using layer_op::weight_grad_pair;
using layer_op::with_last;

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr int64_t kNoiseOffset = 2;  // Philox stream of the output noise (LRT_NOISE_OFFSET)

// sigma^2 into `sigma2` (a scratch lease's tensor) and the closed-form KL as mu's dtype, as
// bayes_ext::lrt_weight_forward returns it; the kernels directly (this file is CPU-only).
at::Tensor lrt_weight_forward(at::Tensor& sigma2, const at::Tensor& mu, const at::Tensor& rho, double prior_sigma) {
  return at::scalar_tensor(lrt_weight_forward_into(sigma2, mu, rho, prior_sigma), mu.options());
}

// y = mean + std * eps with std = sqrt(max(var, 0)) written over var (bayes_ext::lrt_output_).
at::Tensor lrt_output_(at::Tensor& var, const at::Tensor& mean, const at::Tensor& seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::lrt_output_", "")
                       .typed<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(var, mean, seed, kNoiseOffset);
}

// dL/dvar = grad * eps / (2 std), eps regenerated in the same pass (bayes_ext::lrt_noise_grad).
at::Tensor lrt_noise_grad(const at::Tensor& g, const at::Tensor& std, const at::Tensor& seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::lrt_noise_grad", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(g, std, seed, kNoiseOffset);
}

// (y, std, kl): y = x mu^T + b_mu + std * eps with std = sqrt(x^2 (sigma^2)^T + sigma_b^2) (kept
// for backward) and eps on stream (seed, 2); kl against N(0, prior_sigma^2) (0 when prior_sigma = 0).
Triple linear_lrt_rows(const at::Tensor& x, const at::Tensor& weight_mu_in, const at::Tensor& weight_rho_in,
                       const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                       const at::Tensor& seed, double prior_sigma, int64_t block_rows) {
  check_x_dtype(x, weight_mu_in);
  check_layer_args(x, weight_mu_in, bias_mu, bias_rho, block_rows, /*check_dtype=*/false);
  const NoAutocast no_autocast;
  const at::Tensor weight_mu = weight_mu_in.contiguous(), weight_rho = weight_rho_in.contiguous();
  const int64_t out_features = weight_mu.size(0), in_features = weight_mu.size(1);
  const auto x_dtype = x.scalar_type(), w_dtype = weight_mu.scalar_type();
  // mean = x mu^T + b_mu, its GEMM in x's dtype, the result in the weights'
  const auto mean_of_x = [&] {
    const auto bias = has(bias_mu) ? c10::optional<at::Tensor>(in_dtype(*bias_mu, x_dtype)) : c10::nullopt;
    return in_dtype(cpu_gemm::linear(x, in_dtype(weight_mu, x_dtype), bias), w_dtype);
  };
  at::Tensor mean, var, kl;
  if (block_rows >= out_features) {
    ScratchLease sigma2_lease(weight_mu);
    at::Tensor& sigma2 = sigma2_lease.tensor();
    kl = lrt_weight_forward(sigma2, weight_mu, weight_rho, prior_sigma);
    const at::Tensor x2 = x * x;
    side_by_side(x.numel() * out_features, [&] { mean = mean_of_x(); },
                 [&] { var = in_dtype(cpu_gemm::linear(x2, in_dtype(sigma2, x_dtype)), w_dtype); });
  } else {
    mean = mean_of_x();
    // sigma^2 one cache-sized block of rows at a time, never weight-sized
    const at::Tensor x_2d = x.reshape({-1, in_features});
    const at::Tensor x2 = x_2d * x_2d;
    var = at::empty({x_2d.size(0), out_features}, weight_mu.options());
    for (int64_t r0 = 0; r0 < out_features; r0 += block_rows) {
      const int64_t r1 = std::min(r0 + block_rows, out_features);
      const at::Tensor mu_rows = weight_mu.slice(0, r0, r1);
      ScratchLease sigma2_lease(mu_rows);
      at::Tensor& sigma2 = sigma2_lease.tensor();
      const at::Tensor block_kl = lrt_weight_forward(sigma2, mu_rows, weight_rho.slice(0, r0, r1), prior_sigma);
      var.slice(1, r0, r1).copy_(cpu_gemm::linear(x2, in_dtype(sigma2, x_dtype)));
      kl = kl.defined() ? kl + block_kl : block_kl;
    }
    var = var.reshape(with_last(x.sizes(), out_features));
  }
  if (has(bias_rho)) {
    at::Tensor bias_sigma2 = at::empty(bias_mu->sizes(), bias_mu->options());
    const at::Tensor bias_kl = lrt_weight_forward(bias_sigma2, *bias_mu, *bias_rho, prior_sigma);
    var.add_(bias_sigma2);
    kl = kl + bias_kl;
  }
  const at::Tensor y = lrt_output_(var, mean, seed);  // var becomes std in place
  return {in_dtype(y, x_dtype), var, kl};
}

// (grad_x, grad_weight_mu, grad_weight_rho, grad_bias_mu, grad_bias_rho), each empty where not
// asked for (need_x, need_w, need_b); eps regenerated from the seed, sigma^2 rebuilt in the pass
// that turns dL/dsigma^2 into dL/drho.
Grads linear_lrt_rows_backward(const at::Tensor& grad_y, const at::Tensor& grad_kl, const at::Tensor& x,
                               const at::Tensor& weight_mu_in, const at::Tensor& weight_rho_in,
                               const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                               const at::Tensor& seed, const at::Tensor& std_in, double prior_sigma,
                               int64_t block_rows, bool need_x, bool need_w, bool need_b) {
  check_x_dtype(x, weight_mu_in);
  check_layer_args(x, weight_mu_in, bias_mu, bias_rho, block_rows, /*check_dtype=*/false);
  const NoAutocast no_autocast;
  const at::Tensor weight_mu = weight_mu_in.contiguous(), weight_rho = weight_rho_in.contiguous();
  const int64_t out_features = weight_mu.size(0), in_features = weight_mu.size(1);
  const auto x_dtype = x.scalar_type(), w_dtype = weight_mu.scalar_type();
  const std::vector<int64_t> y_shape = with_last(x.sizes(), out_features);
  TORCH_CHECK_VALUE(grad_y.sizes() == at::IntArrayRef(y_shape) && std_in.sizes() == at::IntArrayRef(y_shape),
                    "grad_y and std must have shape x.shape[:-1] + (", out_features, ",) = ", y_shape, ", got ",
                    grad_y.sizes(), " and ", std_in.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x_dtype && std_in.scalar_type() == w_dtype,
                   "grad_y must have the dtype of x (", x_dtype, ") and std that of weight_mu (", w_dtype,
                   "), got ", grad_y.scalar_type(), " and ", std_in.scalar_type());
  need_b = need_b && has(bias_mu);
  const at::Tensor std = std_in.reshape({-1, out_features});
  const at::Tensor g = grad_y.reshape({-1, out_features});
  const at::Tensor x_2d = x.reshape({-1, in_features});
  const at::Tensor half_u = lrt_noise_grad(in_dtype(g, w_dtype), std, seed);  // dL/dvar, in the weights' dtype
  const at::Tensor half_u_x = in_dtype(half_u, x_dtype);                        // for the GEMMs
  const int64_t macs = x_2d.numel() * out_features;  // of each GEMM
  at::Tensor grad_x, grad_mu, grad_rho;
  if (need_w && block_rows < out_features) {
    std::tie(grad_mu, grad_rho) = weight_grad_pair(weight_mu);
    const at::Tensor x2 = x_2d * x_2d;
    at::Tensor var_grad_x = need_x ? at::zeros(x_2d.sizes(), x_2d.options()) : at::Tensor();
    for (int64_t r0 = 0; r0 < out_features; r0 += block_rows) {
      const int64_t r1 = std::min(r0 + block_rows, out_features);
      at::Tensor grad_mu_rows = grad_mu.slice(0, r0, r1), grad_rho_rows = grad_rho.slice(0, r0, r1);
      side_by_side(x_2d.numel() * (r1 - r0), [&] { mm_into(grad_mu_rows, g.slice(1, r0, r1).t(), x_2d); },
                   [&] { mm_into(grad_rho_rows, half_u_x.slice(1, r0, r1).t(), x2); });
      const at::Tensor mu_rows = weight_mu.slice(0, r0, r1);
      ScratchLease sigma2_lease(mu_rows);
      at::Tensor& block_sigma2 = sigma2_lease.tensor();
      lrt_weight_backward_into(block_sigma2, grad_mu_rows, grad_rho_rows, grad_kl, mu_rows,
                               weight_rho.slice(0, r0, r1), prior_sigma);
      if (need_x) cpu_gemm::addmm_(var_grad_x, half_u_x.slice(1, r0, r1), in_dtype(block_sigma2, x_dtype));
    }
    if (need_x) grad_x = at::addcmul(cpu_gemm::mm(g, in_dtype(weight_mu, x_dtype)), x_2d, var_grad_x, 2);
  } else if (need_w || need_x) {
    ScratchLease sigma2_lease(weight_mu);
    at::Tensor& sigma2 = sigma2_lease.tensor();
    if (need_w) {
      // the GEMMs give dL/dmu and dL/dsigma2 of the data term; one fused pass adds the KL's
      // gradients, turns dL/dsigma2 into dL/drho and rebuilds sigma2 for grad_x
      std::tie(grad_mu, grad_rho) = weight_grad_pair(weight_mu);
      const at::Tensor x2 = x_2d * x_2d;
      side_by_side(macs, [&] { mm_into(grad_mu, g.t(), x_2d); }, [&] { mm_into(grad_rho, half_u_x.t(), x2); });
      lrt_weight_backward_into(sigma2, grad_mu, grad_rho, grad_kl, weight_mu, weight_rho, prior_sigma);
    } else {
      lrt_weight_forward_into(sigma2, weight_mu, weight_rho, 0.0);
    }
    if (need_x) {  // d/dx of x mu^T and of x^2 (sigma^2)^T
      at::Tensor mean_grad_x, var_grad_x;
      side_by_side(macs, [&] { mean_grad_x = cpu_gemm::mm(g, in_dtype(weight_mu, x_dtype)); },
                   [&] { var_grad_x = cpu_gemm::mm(half_u_x, in_dtype(sigma2, x_dtype)); });
      grad_x = at::addcmul(mean_grad_x, x_2d, var_grad_x, 2);
    }
  }
  at::Tensor grad_bias_mu, grad_bias_rho;
  if (need_b) {
    grad_bias_mu = g.sum(0, false, bias_mu->scalar_type());
    grad_bias_rho = in_dtype(half_u.sum(0), bias_rho->scalar_type());
    at::Tensor bias_sigma2 = at::empty(bias_mu->sizes(), bias_mu->options());
    lrt_weight_backward_into(bias_sigma2, grad_bias_mu, grad_bias_rho, grad_kl, *bias_mu, *bias_rho, prior_sigma);
  }
  const at::Tensor none = at::empty({0}, weight_mu.options());
  return {need_x ? grad_x.reshape(x.sizes()) : none, need_w ? grad_mu : none, need_w ? grad_rho : none,
          need_b ? grad_bias_mu : none, need_b ? grad_bias_rho : none};
}

// Through the dispatcher: below autograd the call reaches the CPU kernel above (or a fake one).
Triple call_forward(const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                    const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                    const at::Tensor& seed, double prior_sigma, int64_t block_rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::linear_lrt_rows", "")
                       .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                     const at::Tensor&, double, int64_t)>();
  return op.call(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, prior_sigma, block_rows);
}

Grads call_backward(const at::Tensor& grad_y, const at::Tensor& grad_kl, const at::Tensor& x,
                    const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                    const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                    const at::Tensor& seed, const at::Tensor& std, double prior_sigma, int64_t block_rows,
                    bool need_x, bool need_w, bool need_b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::linear_lrt_rows_backward", "")
                       .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const c10::optional<at::Tensor>&,
                                    const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double,
                                    int64_t, bool, bool, bool)>();
  return op.call(grad_y, grad_kl, x, weight_mu, weight_rho, bias_mu, bias_rho, seed, std, prior_sigma, block_rows,
                 need_x, need_w, need_b);
}

// Saves what the Python op saves: x, the parameters, the seed and std (batch-sized; eps is
// regenerated). A recorded backward (create_graph=True) differentiates the Python op instead
// (recorded_backward.h): exact to every order.
class LinearLrtFunction : public torch::autograd::Function<LinearLrtFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                                                const c10::optional<at::Tensor>& bias_mu,
                                                const c10::optional<at::Tensor>& bias_rho, const at::Tensor& seed,
                                                double prior_sigma, int64_t block_rows) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, std, kl] = call_forward(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, prior_sigma, block_rows);
    ctx->mark_non_differentiable({std});
    ctx->save_for_backward({x, weight_mu, weight_rho, bias_mu.value_or(at::Tensor()),
                            bias_rho.value_or(at::Tensor()), seed, std});
    ctx->saved_data["prior_sigma"] = prior_sigma;
    ctx->saved_data["block_rows"] = block_rows;
    return {y, std, kl};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (at::GradMode::is_enabled()) {  // create_graph=True: exact to every order (recorded_backward.h)
      return layer_op::recorded_layer_backward(ctx, "bayes_ext::linear_lrt", saved,
                                               {ctx->saved_data["prior_sigma"].toDouble()}, grads, 8);
    }
    const at::Tensor &x = saved[0], &weight_mu = saved[1], &weight_rho = saved[2], &seed = saved[5], &std = saved[6];
    const double prior_sigma = ctx->saved_data["prior_sigma"].toDouble();
    const int64_t block_rows = ctx->saved_data["block_rows"].toInt();
    const bool has_bias = saved[3].defined();
    // an output that was not used gets no gradient from autograd: zeros of its shape
    const at::Tensor grad_y =
        grads[0].defined() ? in_dtype(grads[0], x.scalar_type()) : at::zeros(std.sizes(), x.options());
    const at::Tensor grad_kl = grads[2].defined() ? grads[2] : at::zeros({}, weight_mu.options());
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    const bool need_b = has_bias && (ctx->needs_input_grad(3) || ctx->needs_input_grad(4));
    Grads computed;
    {
      layer_op::KernelsOnly kernels_only;
      computed = call_backward(grad_y, grad_kl, x, weight_mu, weight_rho, maybe(saved[3]), maybe(saved[4]), seed, std,
                               prior_sigma, block_rows, need_x, need_w, need_b);
    }
    auto [grad_x, grad_mu, grad_rho, grad_bias_mu, grad_bias_rho] = computed;
    const at::Tensor none;
    return {need_x ? grad_x : none, need_w ? grad_mu : none, need_w ? grad_rho : none,
            need_b ? grad_bias_mu : none, need_b ? grad_bias_rho : none, none, none, none};
  }
};

Triple linear_lrt_rows_autograd(const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                                const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                                const at::Tensor& seed, double prior_sigma, int64_t block_rows) {
  auto out = LinearLrtFunction::apply(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, prior_sigma, block_rows);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bayes_ext, CPU, m) {
  m.impl("linear_lrt_rows", &linear_lrt_rows);
  m.impl("linear_lrt_rows_backward", &linear_lrt_rows_backward);
}

TORCH_LIBRARY_IMPL(bayes_ext, AutogradCPU, m) {
  m.impl("linear_lrt_rows", &linear_lrt_rows_autograd);
}

}  // namespace bayes_ext
