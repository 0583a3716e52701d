// The vectorised ELBO's layer for small weights, whole, in one call each way (CPU): N weight
// samples from the multi-seed sampling op, one batched matmul, the bias samples added; and the
// backward (grad_W by bmm, the multi-seed backward, grad_x by bmm, the bias). The same ops in the
// same order as the Python path of bayes_ext/functional_samples.py (so the same values); one call
// instead of a dozen saves the Python and dispatcher cost between them, which is most of a small
// layer's step (the seed's 13 -> 512 -> 1 model). Eager calls also get their autograd here, in
// C++ (LinearSamplesStackedFunction): the Python autograd.Function around the op cost ~50 us a
// layer, forward and backward; torch.compile and the other paths use the Python custom op, whose
// implementation calls these ops below autograd.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "bayes_ext/op_checks.h"
#include "layer_op_helpers.h"
#include "recorded_backward.h"

namespace bayes_ext {
namespace {

using layer_op::has;
using layer_op::maybe;
using layer_op::with_last;

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

Triple sample_weight_samples(const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& seeds, int64_t offset,
                             double pi, double sigma1, double sigma2) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::sample_weight_samples", "")
                       .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, double,
                                     double)>();
  return op.call(mu, rho, seeds, offset, pi, sigma1, sigma2);
}

Triple sample_weight_samples_backward(const at::Tensor& grad_w, const at::Tensor& grad_log_q,
                                      const at::Tensor& grad_log_p, const at::Tensor& mu, const at::Tensor& rho,
                                      const at::Tensor& seeds, int64_t offset, double pi, double sigma1, double sigma2,
                                      bool return_weight) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::sample_weight_samples_backward", "")
                       .typed<Triple(const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, double,
                                     double, bool)>();
  return op.call(grad_w, grad_log_q, grad_log_p, mu, rho, seeds, offset, pi, sigma1, sigma2, return_weight);
}

// x: (N * B, ..., in_features) with N = seeds.numel() (B >= 1; sample s takes the B entries from
// s * B in dim 0), weight_mu's dtype and device.
void check_samples_input(const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& seeds) {
  TORCH_CHECK_VALUE(weight_mu.dim() == 2, "weight_mu must be (out_features, in_features), got shape ",
                    weight_mu.sizes());
  const int64_t n = seeds.numel();
  TORCH_CHECK_VALUE(x.dim() >= 2 && n > 0 && x.size(0) > 0 && x.size(0) % n == 0 && x.size(-1) == weight_mu.size(1),
                    "x must be (N * B, ..., in_features) with N = ", n, " samples (one per seed) of B >= 1 in "
                    "dim 0 and in_features = ", weight_mu.size(1), ", got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == weight_mu.scalar_type(), "x must have the dtype of weight_mu (",
                   weight_mu.scalar_type(), "), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == weight_mu.device(), "x must be on the device of weight_mu (", weight_mu.device(),
                    "), got ", x.device());
}

void check_bias(const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho) {
  TORCH_CHECK_VALUE(has(bias_mu) == has(bias_rho), "bias_mu and bias_rho must be given together");
}

// (y (x.shape[:-1] + (out_features,)), log_q (N,), log_p (N,)), sample s with seeds[s]'s streams 0
// (weight) and 1 (bias).
Triple linear_samples_stacked(const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                              const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                              const at::Tensor& seeds, double pi, double sigma1, double sigma2) {
  check_seeds(seeds, weight_mu);
  check_samples_input(x, weight_mu, seeds);
  check_bias(bias_mu, bias_rho);
  const int64_t n = seeds.numel(), out_features = weight_mu.size(0), in_features = weight_mu.size(1);
  auto [w, log_q, log_p] = sample_weight_samples(weight_mu, weight_rho, seeds, 0, pi, sigma1, sigma2);
  at::Tensor y = at::empty(with_last(x.sizes(), out_features), x.options());
  at::Tensor y3 = y.view({n, -1, out_features});
  at::bmm_out(y3, x.reshape({n, -1, in_features}), w.transpose(1, 2));
  if (has(bias_mu)) {
    auto [b, log_q_b, log_p_b] = sample_weight_samples(*bias_mu, *bias_rho, seeds, 1, pi, sigma1, sigma2);
    y3.add_(b.unsqueeze(1));
    log_q.add_(log_q_b);  // weight + bias per sample, as the single-sample op adds them (fresh tensors)
    log_p.add_(log_p_b);
  }
  return {y, log_q, log_p};
}

// (grad_x (x's shape; empty unless need_x), grad_weight_mu, grad_weight_rho, grad_bias_mu,
// grad_bias_rho (empty without a bias)): every W_s rebuilt from seeds[s], gradients summed over s.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_samples_stacked_backward(
    const at::Tensor& grad_out, const at::Tensor& grad_log_q, const at::Tensor& grad_log_p, const at::Tensor& x,
    const at::Tensor& weight_mu, const at::Tensor& weight_rho, const c10::optional<at::Tensor>& bias_mu,
    const c10::optional<at::Tensor>& bias_rho, const at::Tensor& seeds, double pi, double sigma1, double sigma2,
    bool need_x) {
  check_seeds(seeds, weight_mu);
  check_samples_input(x, weight_mu, seeds);
  check_bias(bias_mu, bias_rho);
  const int64_t n = seeds.numel(), out_features = weight_mu.size(0), in_features = weight_mu.size(1);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(with_last(x.sizes(), out_features)),
                    "grad_out must have shape x.shape[:-1] + (out_features,) = ", with_last(x.sizes(), out_features),
                    ", got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "grad_out must have the dtype of x (", x.scalar_type(),
                   "), got ", grad_out.scalar_type());
  const at::Tensor g3 = grad_out.reshape({n, -1, out_features});
  const at::Tensor x3 = x.reshape({n, -1, in_features});
  const at::Tensor grad_w = at::bmm(g3.transpose(1, 2), x3);
  auto [grad_mu, grad_rho, w] = sample_weight_samples_backward(grad_w, grad_log_q, grad_log_p, weight_mu, weight_rho,
                                                               seeds, 0, pi, sigma1, sigma2, need_x);
  at::Tensor grad_x = need_x ? at::bmm(g3, w).view(x.sizes()) : at::empty({0}, x.options());
  at::Tensor grad_bias_mu = at::empty({0}, weight_mu.options()), grad_bias_rho = at::empty({0}, weight_mu.options());
  if (has(bias_mu)) {
    std::tie(grad_bias_mu, grad_bias_rho, std::ignore) = sample_weight_samples_backward(
        g3.sum(1), grad_log_q, grad_log_p, *bias_mu, *bias_rho, seeds, 1, pi, sigma1, sigma2, false);
  }
  return {grad_x, grad_mu, grad_rho, grad_bias_mu, grad_bias_rho};
}

using LinearSamplesOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using LinearSamplesGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Through the dispatcher (not the functions above): below autograd the call reaches the CPU kernel,
// or a fake kernel for fake tensors.
LinearSamplesOutputs call_linear_samples_stacked(const at::Tensor& x, const at::Tensor& weight_mu,
                                                 const at::Tensor& weight_rho, const c10::optional<at::Tensor>& bias_mu,
                                                 const c10::optional<at::Tensor>& bias_rho, const at::Tensor& seeds,
                                                 double pi, double sigma1, double sigma2) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::linear_samples_stacked", "")
                       .typed<LinearSamplesOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const c10::optional<at::Tensor>&,
                                                   const c10::optional<at::Tensor>&, const at::Tensor&, double, double,
                                                   double)>();
  return op.call(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds, pi, sigma1, sigma2);
}

LinearSamplesGrads call_linear_samples_stacked_backward(
    const at::Tensor& grad_out, const at::Tensor& grad_log_q, const at::Tensor& grad_log_p, const at::Tensor& x,
    const at::Tensor& weight_mu, const at::Tensor& weight_rho, const c10::optional<at::Tensor>& bias_mu,
    const c10::optional<at::Tensor>& bias_rho, const at::Tensor& seeds, double pi, double sigma1, double sigma2,
    bool need_x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::linear_samples_stacked_backward", "")
                       .typed<LinearSamplesGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                                 const at::Tensor&, double, double, double, bool)>();
  return op.call(grad_out, grad_log_q, grad_log_p, x, weight_mu, weight_rho, bias_mu, bias_rho, seeds, pi, sigma1,
                 sigma2, need_x);
}

// Saves what the Python path saves: x, the parameters and the seeds (every W_s is rebuilt from its
// seed in backward). A recorded backward (create_graph=True) differentiates the Python op
// linear_reparam_samples instead (recorded_backward.h): exact to every order.
class LinearSamplesStackedFunction : public torch::autograd::Function<LinearSamplesStackedFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                                                const c10::optional<at::Tensor>& bias_mu,
                                                const c10::optional<at::Tensor>& bias_rho, const at::Tensor& seeds,
                                                double pi, double sigma1, double sigma2) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, log_q, log_p] =
        call_linear_samples_stacked(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds, pi, sigma1, sigma2);
    ctx->save_for_backward({x, weight_mu, weight_rho, bias_mu.value_or(at::Tensor()),
                            bias_rho.value_or(at::Tensor()), seeds});
    ctx->saved_data["prior"] = std::vector<double>{pi, sigma1, sigma2};
    return {y, log_q, log_p};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (at::GradMode::is_enabled()) {  // create_graph=True: exact to every order (recorded_backward.h)
      return layer_op::recorded_layer_backward(ctx, "bayes_ext::linear_reparam_samples", saved,
                                               ctx->saved_data["prior"].toDoubleVector(), grads, 9);
    }
    const at::Tensor &x = saved[0], &weight_mu = saved[1], &weight_rho = saved[2], &seeds = saved[5];
    const std::vector<double> prior = ctx->saved_data["prior"].toDoubleVector();
    const bool has_bias = saved[3].defined();
    const int64_t n = seeds.numel();
    // an output that was not used gets no gradient from autograd: zeros of its shape
    const at::Tensor grad_out = grads[0].defined()
                                    ? grads[0].to(x.scalar_type())
                                    : at::zeros(with_last(x.sizes(), weight_mu.size(0)), x.options());
    const at::Tensor grad_log_q = grads[1].defined() ? grads[1] : at::zeros({n}, weight_mu.options());
    const at::Tensor grad_log_p = grads[2].defined() ? grads[2] : at::zeros({n}, weight_mu.options());
    const bool need_x = ctx->needs_input_grad(0);
    LinearSamplesGrads computed;
    {
      layer_op::KernelsOnly kernels_only;
      computed = call_linear_samples_stacked_backward(grad_out, grad_log_q, grad_log_p, x, weight_mu, weight_rho,
                                                      maybe(saved[3]), maybe(saved[4]), seeds, prior[0], prior[1],
                                                      prior[2], need_x);
    }
    auto [grad_x, grad_mu, grad_rho, grad_bias_mu, grad_bias_rho] = computed;
    const at::Tensor none;
    return {need_x ? grad_x : none, grad_mu, grad_rho, has_bias ? grad_bias_mu : none,
            has_bias ? grad_bias_rho : none, none, none, none, none};
  }
};

LinearSamplesOutputs linear_samples_stacked_autograd(const at::Tensor& x, const at::Tensor& weight_mu,
                                                     const at::Tensor& weight_rho,
                                                     const c10::optional<at::Tensor>& bias_mu,
                                                     const c10::optional<at::Tensor>& bias_rho,
                                                     const at::Tensor& seeds, double pi, double sigma1,
                                                     double sigma2) {
  auto out = LinearSamplesStackedFunction::apply(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds, pi, sigma1,
                                                 sigma2);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bayes_ext, CPU, m) {
  m.impl("linear_samples_stacked", &linear_samples_stacked);
  m.impl("linear_samples_stacked_backward", &linear_samples_stacked_backward);
}

TORCH_LIBRARY_IMPL(bayes_ext, AutogradCPU, m) {
  m.impl("linear_samples_stacked", &linear_samples_stacked_autograd);
}

}  // namespace bayes_ext
