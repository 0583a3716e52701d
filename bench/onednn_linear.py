"""nn.Linear with the GEMMs bayes_ext's layer ops take on AMD CPUs: a reference row, not a product.

Under BAYES_EXT_CPU_GEMM="auto" the layer ops send their large float32 forward and dL/dx GEMMs to
oneDNN on AMD CPUs, where torch's own matmul (MKL) runs a generic path (csrc/cpu/cpu_gemm.h). Their
ratio to nn.Linear then contains that GEMM gain; this layer gives nn.Linear the same GEMMs
(forward and dL/dx through torch's mkldnn::_linear_pointwise, the weight gradient torch's mm), so
the benchmark also shows what the Bayesian layers cost against a deterministic layer on equal
GEMMs.
"""
import torch
from torch import nn


def available(device):
    """(ok, note): the oneDNN op exists in this torch build and the run is on the CPU."""
    if device != "cpu":
        return False, "skipped: a CPU reference"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False, "skipped: this torch build has no oneDNN linear"
    return True, ""


def _onednn_linear(x, w, b=None):
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], None)


class _OneDnnLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = _onednn_linear(grad, weight.t()) if ctx.needs_input_grad[0] else None
        return grad_x, g2.t().mm(x2), g2.sum(0)


class OneDnnLinear(nn.Linear):
    def forward(self, x):
        return _OneDnnLinearFn.apply(x, self.weight, self.bias)
