// The reparameterised linear layer (one weight sample) in one call each way. On the CPU the weight
// is sampled block of rows by block of rows (each block with the noise it has in the whole weight)
// and consumed by the matmul while in cache, and the backward rebuilds it the same way. The same
// ops in the same order as the Python implementation of bayes_ext::linear_reparam
// (bayes_ext/functional.py), so the same values (to float32 rounding where a GEMM takes oneDNN's
// path: cpu_gemm.h); what it saves is the Python between those ops
// (~0.6 ms a step at 1024 x 1024 on the CPU, 10% of it; on a GPU, where a layer's kernels take
// microseconds, the Python is most of a mid-sized layer's step). Eager calls get their autograd
// here too (LinearReparamFunction, registered for AutogradCPU and AutogradCUDA); torch.compile, fake
// tensors and the pure-PyTorch backend keep the Python custom op.
//
// Device-generic: everything goes through the dispatcher (the sampling ops' CPU or CUDA kernels),
// so the same functions are registered for CUDA (cpu_gemm's GEMMs are torch's for CUDA tensors).
// Under autocast x arrives in the lower precision and W is cast to it for the matmuls, as the
// Python op does.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "bayes_ext/op_checks.h"
#include "cpu_gemm.h"
#include "layer_op_helpers.h"
#include "recorded_backward.h"
#include "op_calls.h"

namespace bayes_ext {
namespace {

using layer_op::check_layer_args;
using layer_op::check_x_dtype;
using layer_op::has;
using layer_op::in_dtype;
using layer_op::maybe;
using layer_op::NoAutocast;
using layer_op::with_last;

using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The sampling ops with this layer's arguments: W's noise itself (not noise_only), W on stream 0.
Triple sample_weight(const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& seed, int64_t offset, double pi,
                     double sigma1, double sigma2, int64_t start) {
  return op_calls::sample_weight(mu, rho, seed, offset, pi, sigma1, sigma2, start, false);
}

Triple sample_weight_backward(const at::Tensor& grad_w, const at::Tensor& grad_log_q, const at::Tensor& grad_log_p,
                              const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& seed, int64_t offset,
                              double pi, double sigma1, double sigma2, bool return_weight) {
  return op_calls::sample_weight_backward(grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset, pi, sigma1, sigma2,
                                          return_weight, 0, false);
}

at::Tensor sample_weight_backward_into(at::Tensor& grad_mu, at::Tensor& grad_rho, const at::Tensor& grad_w,
                                       const at::Tensor& grad_log_q, const at::Tensor& grad_log_p,
                                       const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& seed,
                                       double pi, double sigma1, double sigma2, bool return_weight, int64_t start) {
  return op_calls::sample_weight_backward_into(grad_mu, grad_rho, grad_w, grad_log_q, grad_log_p, mu, rho, seed, 0,
                                               pi, sigma1, sigma2, return_weight, start, false);
}

// a @ b as a `dtype` tensor: on CUDA, bf16 / fp16 operands accumulate straight into fp32
// (aten::mm.dtype, torch >= 2.8, looked up at run time) instead of a low-precision product cast up;
// elsewhere, or where that overload is missing or refuses the dtypes, mm then a cast. As
// bayes_ext.functional.mm_in_dtype.
at::Tensor mm_in_dtype(const at::Tensor& a, const at::Tensor& b, at::ScalarType dtype) {
  if (a.scalar_type() == dtype) return a.mm(b);
  static const auto mm_dtype = c10::Dispatcher::singleton().findSchema({"aten::mm", "dtype"});
  static bool usable = mm_dtype.has_value();
  if (a.is_cuda() && usable) {
    try {
      return mm_dtype->typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>().call(a, b, dtype);
    } catch (const c10::Error&) {
      usable = false;
    }
  }
  return in_dtype(a.mm(b), dtype);
}

// (y (x.shape[:-1] + (out_features,)), log_q, log_p): W on stream (seed, 0) in blocks of
// block_rows rows (one block when block_rows >= out_features), b on (seed, 1).
Triple linear_reparam_rows(const at::Tensor& x, const at::Tensor& weight_mu_in, const at::Tensor& weight_rho_in,
                           const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                           const at::Tensor& seed, double pi, double sigma1, double sigma2, int64_t block_rows) {
  check_x_dtype(x, weight_mu_in);
  check_layer_args(x, weight_mu_in, bias_mu, bias_rho, block_rows, /*check_dtype=*/false);
  const NoAutocast no_autocast;
  const at::Tensor weight_mu = weight_mu_in.contiguous(), weight_rho = weight_rho_in.contiguous();
  const int64_t out_features = weight_mu.size(0), in_features = weight_mu.size(1);
  const auto x_dtype = x.scalar_type();
  if (block_rows >= out_features && has(bias_mu)) {
    // W and b in one call (on CUDA one launch; elsewhere the two sample_weight_as calls)
    auto [w, b, log_q, log_p] = op_calls::sample_weight_bias_as(weight_mu, weight_rho, *bias_mu, *bias_rho, seed,
                                                                pi, sigma1, sigma2, x_dtype);
    return {cpu_gemm::linear(x, w, b), log_q, log_p};
  }
  if (block_rows >= out_features) {
    // W (and its log q / log p) in x's dtype: on CUDA the sampling kernel writes bf16 / fp16 directly
    auto [w, log_q, log_p] =
        op_calls::sample_weight_as(weight_mu, weight_rho, seed, 0, pi, sigma1, sigma2, x_dtype, true);
    return {cpu_gemm::linear(x, w), log_q, log_p};
  }
  const at::Tensor x_2d = x.reshape({-1, in_features});
  at::Tensor y = at::empty({x_2d.size(0), out_features}, x.options());
  at::Tensor log_q, log_p;
  for (int64_t r0 = 0; r0 < out_features; r0 += block_rows) {
    const int64_t r1 = std::min(r0 + block_rows, out_features);
    auto [w, q, p] = sample_weight(weight_mu.slice(0, r0, r1), weight_rho.slice(0, r0, r1), seed, 0, pi, sigma1,
                                   sigma2, r0 * in_features);
    y.slice(1, r0, r1).copy_(cpu_gemm::linear(x_2d, in_dtype(w, x_dtype)));
    log_q = log_q.defined() ? log_q + q : q;
    log_p = log_p.defined() ? log_p + p : p;
  }
  y = y.reshape(with_last(x.sizes(), out_features));
  if (has(bias_mu)) {
    auto [b, log_q_b, log_p_b] = sample_weight(*bias_mu, *bias_rho, seed, 1, pi, sigma1, sigma2, 0);
    y = y + in_dtype(b, x_dtype);
    log_q.add_(log_q_b);  // fresh tensors: summed in place
    log_p.add_(log_p_b);
  }
  return {y, log_q, log_p};
}

// (grad_x (x's shape; empty unless need_x), grad_weight_mu, grad_weight_rho, grad_bias_mu,
// grad_bias_rho (both empty without a bias)), W rebuilt from the seed block by block.
Grads linear_reparam_rows_backward(const at::Tensor& grad_out, const at::Tensor& grad_log_q,
                                   const at::Tensor& grad_log_p, const at::Tensor& x,
                                   const at::Tensor& weight_mu_in, const at::Tensor& weight_rho_in,
                                   const c10::optional<at::Tensor>& bias_mu,
                                   const c10::optional<at::Tensor>& bias_rho, const at::Tensor& seed, double pi,
                                   double sigma1, double sigma2, int64_t block_rows, bool need_x) {
  check_x_dtype(x, weight_mu_in);
  check_layer_args(x, weight_mu_in, bias_mu, bias_rho, block_rows, /*check_dtype=*/false);
  const NoAutocast no_autocast;
  const at::Tensor weight_mu = weight_mu_in.contiguous(), weight_rho = weight_rho_in.contiguous();
  const int64_t out_features = weight_mu.size(0), in_features = weight_mu.size(1);
  const auto x_dtype = x.scalar_type(), w_dtype = weight_mu.scalar_type();
  const std::vector<int64_t> y_shape = with_last(x.sizes(), out_features);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(y_shape), "grad_out must have shape x.shape[:-1] + (",
                    out_features, ",) = ", y_shape, ", got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x_dtype, "grad_out must have the dtype of x (", x_dtype, "), got ",
                   grad_out.scalar_type());
  const at::Tensor grad_out_2d = grad_out.reshape({-1, out_features});
  const at::Tensor x_2d = x.reshape({-1, in_features});
  at::Tensor grad_x, grad_mu, grad_rho, grad_bias_mu, grad_bias_rho;
  if (block_rows >= out_features && weight_mu.is_cuda()) {
    // dL/dx first, from W rebuilt by the sampling kernel and freed before the two gradients exist;
    // then grad_W's buffer becomes grad_mu in place (the kernel reads each element before writing
    // it). The step holds nn.Linear's memory plus one weight copy (grad_rho), not three.
    if (need_x) {
      grad_x = grad_out_2d.mm(
          std::get<0>(op_calls::sample_weight_as(weight_mu, weight_rho, seed, 0, pi, sigma1, sigma2, x_dtype, false)));
    }
    grad_mu = mm_in_dtype(grad_out_2d.t(), x_2d, w_dtype);
    if (has(bias_mu)) {  // W's and b's gradients in one call (one launch on CUDA)
      std::tie(grad_rho, grad_bias_mu, grad_bias_rho) = op_calls::sample_weight_bias_backward_(
          grad_mu, grad_out_2d.sum(0, false, bias_mu->scalar_type()), grad_log_q, grad_log_p, weight_mu, weight_rho,
          *bias_mu, *bias_rho, seed, pi, sigma1, sigma2);
    } else {
      grad_rho = at::empty_like(grad_mu);
      sample_weight_backward_into(grad_mu, grad_rho, grad_mu, grad_log_q, grad_log_p, weight_mu, weight_rho, seed, pi,
                                  sigma1, sigma2, false, 0);
    }
  } else if (block_rows >= out_features) {
    // The CPU kernels take __restrict__ pointers (no in-place call); W comes out of the same pass.
    at::Tensor w;
    std::tie(grad_mu, grad_rho, w) = sample_weight_backward(mm_in_dtype(grad_out_2d.t(), x_2d, w_dtype), grad_log_q,
                                                            grad_log_p, weight_mu, weight_rho, seed, 0, pi, sigma1,
                                                            sigma2, need_x);
    if (need_x) grad_x = cpu_gemm::mm(grad_out_2d, in_dtype(w, x_dtype));
  } else {
    std::tie(grad_mu, grad_rho) = layer_op::weight_grad_pair(weight_mu);
    if (need_x) grad_x = at::zeros(x_2d.sizes(), x_2d.options());
    for (int64_t r0 = 0; r0 < out_features; r0 += block_rows) {
      const int64_t r1 = std::min(r0 + block_rows, out_features);
      const at::Tensor g_block = grad_out_2d.slice(1, r0, r1);
      at::Tensor grad_mu_rows = grad_mu.slice(0, r0, r1), grad_rho_rows = grad_rho.slice(0, r0, r1);
      const at::Tensor w = sample_weight_backward_into(
          grad_mu_rows, grad_rho_rows, mm_in_dtype(g_block.t(), x_2d, w_dtype), grad_log_q, grad_log_p,
          weight_mu.slice(0, r0, r1), weight_rho.slice(0, r0, r1), seed, pi, sigma1, sigma2, need_x,
          r0 * in_features);
      if (need_x) cpu_gemm::addmm_(grad_x, g_block, in_dtype(w, x_dtype));
    }
  }
  grad_x = need_x ? grad_x.reshape(x.sizes()) : at::empty({0}, x.options());
  if (!has(bias_mu)) {
    grad_bias_mu = at::empty({0}, weight_mu.options());
    grad_bias_rho = at::empty({0}, weight_mu.options());
  } else if (!grad_bias_mu.defined()) {
    std::tie(grad_bias_mu, grad_bias_rho, std::ignore) =
        sample_weight_backward(grad_out_2d.sum(0, false, bias_mu->scalar_type()), grad_log_q, grad_log_p, *bias_mu,
                               *bias_rho, seed, 1, pi, sigma1, sigma2, false);
  }
  return {grad_x, grad_mu, grad_rho, grad_bias_mu, grad_bias_rho};
}

// Through the dispatcher: below autograd the call reaches the CPU kernel above (or a fake one).
Triple call_forward(const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                    const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                    const at::Tensor& seed, double pi, double sigma1, double sigma2, int64_t block_rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::linear_reparam_rows", "")
                       .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                     const at::Tensor&, double, double, double, int64_t)>();
  return op.call(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, pi, sigma1, sigma2, block_rows);
}

Grads call_backward(const at::Tensor& grad_out, const at::Tensor& grad_log_q, const at::Tensor& grad_log_p,
                    const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                    const c10::optional<at::Tensor>& bias_mu, const c10::optional<at::Tensor>& bias_rho,
                    const at::Tensor& seed, double pi, double sigma1, double sigma2, int64_t block_rows, bool need_x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bayes_ext::linear_reparam_rows_backward", "")
                       .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                    const c10::optional<at::Tensor>&, const at::Tensor&, double, double, double,
                                    int64_t, bool)>();
  return op.call(grad_out, grad_log_q, grad_log_p, x, weight_mu, weight_rho, bias_mu, bias_rho, seed, pi, sigma1,
                 sigma2, block_rows, need_x);
}

// Saves what the Python op saves: x, the parameters and the seed (W is rebuilt in backward). A
// recorded backward (create_graph=True) differentiates the Python op instead (recorded_backward.h):
// exact to every order.
class LinearReparamFunction : public torch::autograd::Function<LinearReparamFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                                                const c10::optional<at::Tensor>& bias_mu,
                                                const c10::optional<at::Tensor>& bias_rho, const at::Tensor& seed,
                                                double pi, double sigma1, double sigma2, int64_t block_rows) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, log_q, log_p] = call_forward(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, pi, sigma1, sigma2,
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
      return layer_op::recorded_layer_backward(ctx, "bayes_ext::linear_reparam", saved,
                                               ctx->saved_data["prior"].toDoubleVector(), grads, 10);
    }
    const at::Tensor &x = saved[0], &weight_mu = saved[1], &weight_rho = saved[2], &seed = saved[5];
    const std::vector<double> prior = ctx->saved_data["prior"].toDoubleVector();
    const int64_t block_rows = ctx->saved_data["block_rows"].toInt();
    const bool has_bias = saved[3].defined();
    // an output that was not used gets no gradient from autograd: zeros of its shape
    const at::Tensor grad_out = grads[0].defined()
                                    ? in_dtype(grads[0], x.scalar_type())
                                    : at::zeros(with_last(x.sizes(), weight_mu.size(0)), x.options());
    const at::Tensor grad_log_q = grads[1].defined() ? grads[1] : at::zeros({}, weight_mu.options());
    const at::Tensor grad_log_p = grads[2].defined() ? grads[2] : at::zeros({}, weight_mu.options());
    const bool need_x = ctx->needs_input_grad(0);
    Grads computed;
    {
      layer_op::KernelsOnly kernels_only;
      computed = call_backward(grad_out, grad_log_q, grad_log_p, x, weight_mu, weight_rho, maybe(saved[3]),
                               maybe(saved[4]), seed, prior[0], prior[1], prior[2], block_rows, need_x);
    }
    auto [grad_x, grad_mu, grad_rho, grad_bias_mu, grad_bias_rho] = computed;
    const at::Tensor none;
    return {need_x ? grad_x : none, grad_mu, grad_rho, has_bias ? grad_bias_mu : none,
            has_bias ? grad_bias_rho : none, none, none, none, none, none};
  }
};

Triple linear_reparam_rows_autograd(const at::Tensor& x, const at::Tensor& weight_mu, const at::Tensor& weight_rho,
                                    const c10::optional<at::Tensor>& bias_mu,
                                    const c10::optional<at::Tensor>& bias_rho, const at::Tensor& seed, double pi,
                                    double sigma1, double sigma2, int64_t block_rows) {
  auto out = LinearReparamFunction::apply(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, pi, sigma1, sigma2,
                                          block_rows);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bayes_ext, CPU, m) {
  m.impl("linear_reparam_rows", &linear_reparam_rows);
  m.impl("linear_reparam_rows_backward", &linear_reparam_rows_backward);
}

TORCH_LIBRARY_IMPL(bayes_ext, AutogradCPU, m) {
  m.impl("linear_reparam_rows", &linear_reparam_rows_autograd);
}

// Device-generic (see the top of the file): the CUDA build runs the same functions on the sampling
// ops' CUDA kernels. A CPU-only build registers them too: under a torch with CUDA they then reach the
// pure-PyTorch kernels that bayes_ext/_ops.py registers for the CUDA key.
TORCH_LIBRARY_IMPL(bayes_ext, CUDA, m) {
  m.impl("linear_reparam_rows", &linear_reparam_rows);
  m.impl("linear_reparam_rows_backward", &linear_reparam_rows_backward);
}

TORCH_LIBRARY_IMPL(bayes_ext, AutogradCUDA, m) {
  m.impl("linear_reparam_rows", &linear_reparam_rows_autograd);
}

}  // namespace bayes_ext
