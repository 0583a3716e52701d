// A recorded backward (create_graph=True) of the whole-layer CPU ops: their kernels are first-order
// (what they return carries no derivatives), so the backward differentiates the same layer's Python
// custom op instead, whose recorded backward rebuilds the forward from differentiable compositions
// on the same Philox noise (bayes_ext/_recorded.py). The C++ op and its Python op draw the same
// streams, so this is the derivative of the forward that ran, exact to every order.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <vector>

namespace bayes_ext {
namespace layer_op {

// The gradients of python_op(args...) for `grads` with respect to its first num_inputs arguments,
// recorded; undefined for an argument that is not a tensor needing and requiring grad. `needs`:
// ctx->needs_input_grad of those arguments.
inline torch::autograd::variable_list recorded_backward(const char* python_op, std::vector<c10::IValue> args,
                                                        const std::vector<bool>& needs,
                                                        const torch::autograd::variable_list& grads) {
  torch::autograd::variable_list result(needs.size());
  std::vector<at::Tensor> inputs;
  std::vector<size_t> positions;
  for (size_t i = 0; i < needs.size(); ++i) {
    if (needs[i] && args[i].isTensor() && args[i].toTensor().defined() && args[i].toTensor().requires_grad()) {
      inputs.push_back(args[i].toTensor());
      positions.push_back(i);
    }
  }
  if (inputs.empty()) return result;
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(python_op, "");  // registered by bayes_ext
  torch::jit::Stack stack(args.begin(), args.end());
  op.callBoxed(&stack);
  std::vector<at::Tensor> outputs, grad_outputs;
  for (size_t k = 0; k < stack.size() && k < grads.size(); ++k) {
    const at::Tensor output = stack[k].toTensor();
    if (grads[k].defined() && output.requires_grad()) {
      outputs.push_back(output);
      grad_outputs.push_back(grads[k]);
    }
  }
  if (outputs.empty()) return result;
  const auto got = torch::autograd::grad(outputs, inputs, grad_outputs, /*retain_graph=*/true,
                                         /*create_graph=*/true, /*allow_unused=*/true);
  for (size_t j = 0; j < positions.size(); ++j) result[positions[j]] = got[j];
  return result;
}

// The saved optional tensor as the argument a Python op takes (None when there was none).
inline c10::IValue optional_arg(const at::Tensor& saved) {
  return saved.defined() ? c10::IValue(saved) : c10::IValue();
}

// recorded_backward of a linear layer op whose Python twin takes (x, weight_mu, weight_rho, bias_mu,
// bias_rho, seed or seeds, scalars...) and whose own inputs, num_inputs of them (a block size after
// the scalars), were saved in that order.
inline torch::autograd::variable_list recorded_layer_backward(torch::autograd::AutogradContext* ctx,
                                                              const char* python_op,
                                                              const torch::autograd::variable_list& saved,
                                                              const std::vector<double>& scalars,
                                                              const torch::autograd::variable_list& grads,
                                                              size_t num_inputs) {
  std::vector<c10::IValue> args{saved[0], saved[1], saved[2], optional_arg(saved[3]), optional_arg(saved[4]), saved[5]};
  for (double s : scalars) args.emplace_back(s);
  // (an absent bias has no input edge: needs_input_grad(3) would be out of range)
  const size_t tensors = saved[3].defined() ? 5 : 3;
  std::vector<bool> needs(args.size(), false);
  for (size_t i = 0; i < tensors; ++i) needs[i] = ctx->needs_input_grad(i);
  auto recorded = recorded_backward(python_op, std::move(args), needs, grads);
  recorded.resize(num_inputs);
  return recorded;
}

}  // namespace layer_op
}  // namespace bayes_ext
