// Schemas of the bayes_ext ops. Implementations: cpu/sample_weight_cpu.cpp (CPU) and
// cuda/sample_weight_cuda.cu (CUDA); fake kernels and autograd are registered in Python
// (bayes_ext/_ops.py), following pytorch/extension-cpp.
#include <Python.h>
#include <torch/library.h>

// Lets `import bayes_ext._C` load this library (and run the registrations below) like a module.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(bayes_ext, m) {
  // w = mu + softplus(rho) * eps with eps from Philox (seed, offset); also log q(w) and log p(w)
  // under the scale-mixture prior. Returns (w, log_q, log_p). Element i draws stream element
  // start + i (start > 0 samples a block of rows of a larger weight with the noise it has there).
  // noise_only: return the noise w - mu (Flipout's dW, rounded as that subtraction) instead of w;
  // log q / log p are still w's.
  m.def("sample_weight(Tensor mu, Tensor rho, Tensor seed, int offset, float prior_pi, "
        "float prior_sigma1, float prior_sigma2, int start=0, bool noise_only=False) -> (Tensor, Tensor, Tensor)");
  // Gradients of sample_weight w.r.t. mu and rho, regenerating eps; optionally also w.
  // Returns (grad_mu, grad_rho, w) with w empty unless return_weight. noise_only: the backward of
  // sample_weight(noise_only=True): grad_w (of the noise) reaches grad_rho but not grad_mu, and the
  // returned w is the noise.
  m.def("sample_weight_backward(Tensor? grad_w, Tensor grad_log_q, Tensor grad_log_p, Tensor mu, "
        "Tensor rho, Tensor seed, int offset, float prior_pi, float prior_sigma1, float prior_sigma2, "
        "bool return_weight, int start=0, bool noise_only=False) -> (Tensor, Tensor, Tensor)");
  // sample_weight_backward writing its gradients into grad_mu / grad_rho (contiguous, mu's shape,
  // e.g. a block of rows of whole-weight gradients) instead of fresh tensors; returns w or empty.
  m.def("sample_weight_backward_into(Tensor(a!) grad_mu, Tensor(b!) grad_rho, Tensor? grad_w, Tensor grad_log_q, "
        "Tensor grad_log_p, Tensor mu, Tensor rho, Tensor seed, int offset, float prior_pi, float prior_sigma1, "
        "float prior_sigma2, bool return_weight, int start=0, bool noise_only=False) -> Tensor");
  // (log_q, log_p) of sample_weight's w without writing w: the MC KL of layers that sample no
  // weight (local reparameterisation with a scale-mixture prior). Backward: sample_weight_backward
  // with grad_w = None.
  m.def("sample_kl(Tensor mu, Tensor rho, Tensor seed, int offset, float prior_pi, float prior_sigma1, "
        "float prior_sigma2, int start=0) -> (Tensor, Tensor)");
  // N samples at once: sample s is sample_weight's with seed seeds[s] (seeds: 1-D int64).
  // Returns (w (N, *mu.shape), log_q (N,), log_p (N,)). Impl: cpu/sample_samples_cpu.cpp.
  m.def("sample_weight_samples(Tensor mu, Tensor rho, Tensor seeds, int offset, float prior_pi, "
        "float prior_sigma1, float prior_sigma2) -> (Tensor, Tensor, Tensor)");
  // Its backward: grad_w (N, *mu.shape) or None, grad_log_q / grad_log_p (N,); returns the
  // gradients w.r.t. mu and rho summed over the samples, and the N samples if return_weight.
  m.def("sample_weight_samples_backward(Tensor? grad_w, Tensor grad_log_q, Tensor grad_log_p, Tensor mu, "
        "Tensor rho, Tensor seeds, int offset, float prior_pi, float prior_sigma1, float prior_sigma2, "
        "bool return_weight) -> (Tensor, Tensor, Tensor)");
  // The vectorised ELBO's whole layer for small weights in one call (CPU only; the Python path in
  // bayes_ext/functional_samples.py does the same elsewhere): y[s] = x[s] W_s^T + b_s for x
  // (N, ..., I) and seeds (N,), with W_s, b_s on streams (seeds[s], 0) and (seeds[s], 1); x may also
  // be (N*B, ..., I), sample s its rows [s*B, (s+1)*B), as the vectorised ELBO's layers see it (y
  // likewise, so no reshape in between). Returns (y, log_q (N,), log_p (N,)).
  // Impl: cpu/linear_samples_cpu.cpp.
  m.def("linear_samples_stacked(Tensor x, Tensor weight_mu, Tensor weight_rho, Tensor? bias_mu, Tensor? bias_rho, "
        "Tensor seeds, float prior_pi, float prior_sigma1, float prior_sigma2) -> (Tensor, Tensor, Tensor)");
  // Its backward: (grad_x (empty unless need_x), grad_weight_mu, grad_weight_rho, grad_bias_mu,
  // grad_bias_rho (both empty without a bias)), the gradients summed over the samples.
  m.def("linear_samples_stacked_backward(Tensor grad_out, Tensor grad_log_q, Tensor grad_log_p, Tensor x, "
        "Tensor weight_mu, Tensor weight_rho, Tensor? bias_mu, Tensor? bias_rho, Tensor seeds, float prior_pi, "
        "float prior_sigma1, float prior_sigma2, bool need_x) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The reparameterised linear layer in one call (CPU and CUDA; bayes_ext::linear_reparam in
  // bayes_ext/functional.py is the same computation in Python): y = x W^T + b with W on stream
  // (seed, 0), sampled in blocks of block_rows rows (>= out_features: one block), b on (seed, 1);
  // x in the weights' dtype or, under autocast, bf16 / fp16 with fp32 weights.
  // Returns (y, log_q, log_p). Impl: cpu/linear_reparam_cpu.cpp (device-generic).
  m.def("linear_reparam_rows(Tensor x, Tensor weight_mu, Tensor weight_rho, Tensor? bias_mu, Tensor? bias_rho, "
        "Tensor seed, float prior_pi, float prior_sigma1, float prior_sigma2, int block_rows) "
        "-> (Tensor, Tensor, Tensor)");
  // Its backward: (grad_x (empty unless need_x), grad_weight_mu, grad_weight_rho, grad_bias_mu,
  // grad_bias_rho (both empty without a bias)).
  m.def("linear_reparam_rows_backward(Tensor grad_out, Tensor grad_log_q, Tensor grad_log_p, Tensor x, "
        "Tensor weight_mu, Tensor weight_rho, Tensor? bias_mu, Tensor? bias_rho, Tensor seed, float prior_pi, "
        "float prior_sigma1, float prior_sigma2, int block_rows, bool need_x) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The reparameterised convolution layer in one call (CPU and CUDA; bayes_ext::conv_reparam in
  // bayes_ext/functional_conv.py is the same computation in Python): y = aten::convolution(x, W, b,
  // ...) with W on stream (seed, 0) and b on (seed, 1), in x's dtype (the weights' or, under autocast,
  // bf16 / fp16 with fp32 weights). Returns (y, log_q, log_p). Impl: cpu/conv_reparam_layer.cpp.
  m.def("conv_reparam_layer(Tensor x, Tensor weight_mu, Tensor weight_rho, Tensor? bias_mu, Tensor? bias_rho, "
        "Tensor seed, int[] stride, int[] padding, int[] dilation, bool transposed, int[] output_padding, "
        "int groups, float prior_pi, float prior_sigma1, float prior_sigma2) -> (Tensor, Tensor, Tensor)");
  // Its backward: (grad_x (empty unless need_x), grad_weight_mu, grad_weight_rho, grad_bias_mu,
  // grad_bias_rho (both empty without a bias)).
  m.def("conv_reparam_layer_backward(Tensor grad_out, Tensor grad_log_q, Tensor grad_log_p, Tensor x, "
        "Tensor weight_mu, Tensor weight_rho, Tensor? bias_mu, Tensor? bias_rho, Tensor seed, int[] stride, "
        "int[] padding, int[] dilation, bool transposed, int[] output_padding, int groups, float prior_pi, "
        "float prior_sigma1, float prior_sigma2, bool need_x) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // sample_weight's w written straight in `dtype` (the autocast dtype of the layer op's matmul: no
  // separate cast kernel) and, when with_kl, its (log_q, log_p) in mu's dtype; without with_kl they
  // are two empty tensors, which the CUDA kernel does not compute (the backward's rebuilt W needs no KL). Internal to
  // linear_reparam_rows. Impl: cpu/sample_weight_as.cpp (any device: sample_weight, then a cast),
  // cuda/sample_weight_cuda.cu (fp32 parameters into fp32 / bf16 / fp16 in the sampling kernel).
  m.def("sample_weight_as(Tensor mu, Tensor rho, Tensor seed, int offset, float prior_pi, float prior_sigma1, "
        "float prior_sigma2, ScalarType dtype, bool with_kl) -> (Tensor, Tensor, Tensor)");
  // A linear layer's weight and bias at once, for the layer op (fewer launches on a GPU):
  // sample_weight_as(weight_mu, weight_rho, seed, 0, ..., dtype, True) and
  // sample_weight_as(bias_mu, bias_rho, seed, 1, ..., dtype, True), returned as (w, b, log_q, log_p)
  // with the two log q and the two log p added. Impl: cpu/sample_weight_bias.cpp (any device: those
  // two calls), cuda/sample_weight_bias_cuda.cu (one launch, the same bits).
  m.def("sample_weight_bias_as(Tensor weight_mu, Tensor weight_rho, Tensor bias_mu, Tensor bias_rho, Tensor seed, "
        "float prior_pi, float prior_sigma1, float prior_sigma2, ScalarType dtype) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Its backward: grad_weight (dL/dW, contiguous) becomes dL/dweight_mu in place; returns
  // (grad_weight_rho, grad_bias_mu, grad_bias_rho) for grad_bias = dL/db.
  m.def("sample_weight_bias_backward_(Tensor(a!) grad_weight, Tensor grad_bias, Tensor grad_log_q, Tensor grad_log_p, "
        "Tensor weight_mu, Tensor weight_rho, Tensor bias_mu, Tensor bias_rho, Tensor seed, float prior_pi, "
        "float prior_sigma1, float prior_sigma2) -> (Tensor, Tensor, Tensor)");
  // The standard normals of stream (seed, offset) in the shape, dtype and device of `like`.
  m.def("philox_normal(Tensor like, Tensor seed, int offset, int start=0) -> Tensor");
  // Rows `indices` (int64, any shape, values in [0, V)) of a sample of the (V, D) table
  // w = mu + softplus(rho) * eps, with the noise the whole table has there (row r draws stream
  // elements r*D .. r*D + D - 1). Returns shape indices.shape + (D,). Impl: cpu/sample_rows_cpu.cpp.
  m.def("sample_rows(Tensor mu, Tensor rho, Tensor indices, Tensor seed, int offset) -> Tensor");
  // Dense (V, D) gradients of sample_rows w.r.t. mu and rho; repeated indices accumulate, rows not
  // looked up get zero. Returns (grad_mu, grad_rho).
  m.def("sample_rows_backward(Tensor grad_rows, Tensor mu, Tensor rho, Tensor indices, Tensor seed, "
        "int offset) -> (Tensor, Tensor)");
  // The same gradients added into existing dense buffers (e.g. the closed-form KL's gradients).
  m.def("sample_rows_backward_add_(Tensor(a!) grad_mu, Tensor(b!) grad_rho, Tensor grad_rows, Tensor mu, "
        "Tensor rho, Tensor indices, Tensor seed, int offset) -> ()");
  // sum over the tensor of KL(N(mu, softplus(rho)^2) || N(0, prior_sigma^2)), a 0-d tensor of mu's
  // dtype (summed in double). Impl: cpu/gaussian_kl_cpu.cpp, cuda/gaussian_kl_cuda.cu.
  m.def("gaussian_kl(Tensor mu, Tensor rho, float prior_sigma) -> Tensor");
  // grad (one value) times the gradients of gaussian_kl w.r.t. mu and rho: (grad_mu, grad_rho).
  m.def("gaussian_kl_backward(Tensor grad, Tensor mu, Tensor rho, float prior_sigma) -> (Tensor, Tensor)");
  // The local-reparameterisation linear layer in one call (CPU only; bayes_ext::linear_lrt in
  // bayes_ext/functional_estimators.py is the same computation in Python): (y, std, kl) for
  // y = x mu^T + b_mu + std * eps, std = sqrt(x^2 (sigma^2)^T + sigma_b^2), eps on stream (seed, 2),
  // sigma^2 built in blocks of block_rows rows (>= out_features: one block), kl the closed-form KL
  // against N(0, prior_sigma^2) (0 for prior_sigma = 0). Impl: cpu/linear_lrt_cpu.cpp.
  m.def("linear_lrt_rows(Tensor x, Tensor weight_mu, Tensor weight_rho, Tensor? bias_mu, Tensor? bias_rho, "
        "Tensor seed, float prior_sigma, int block_rows) -> (Tensor, Tensor, Tensor)");
  // Its backward: (grad_x, grad_weight_mu, grad_weight_rho, grad_bias_mu, grad_bias_rho), each empty
  // unless asked for (need_x, need_w, need_b); std is the forward's.
  m.def("linear_lrt_rows_backward(Tensor grad_y, Tensor grad_kl, Tensor x, Tensor weight_mu, Tensor weight_rho, "
        "Tensor? bias_mu, Tensor? bias_rho, Tensor seed, Tensor std, float prior_sigma, int block_rows, "
        "bool need_x, bool need_w, bool need_b) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The Flipout linear layer in one call (CPU only; bayes_ext::linear_flipout in
  // bayes_ext/functional_estimators.py is the same computation in Python): (y, log_q, log_p) for
  // y = x mu^T + b + ((x * S) dW^T) * R, dW = W - mu with W on stream (seed, 0) and b on (seed, 1)
  // (their log q / log p returned), S and R the signs of streams 3 and 4; dW built in blocks of
  // block_rows rows (>= out_features: one block). Impl: cpu/linear_flipout_cpu.cpp.
  m.def("linear_flipout_rows(Tensor x, Tensor weight_mu, Tensor weight_rho, Tensor? bias_mu, Tensor? bias_rho, "
        "Tensor seed, float prior_pi, float prior_sigma1, float prior_sigma2, int block_rows) -> "
        "(Tensor, Tensor, Tensor)");
  // Its backward: (grad_x, grad_weight_mu, grad_weight_rho, grad_bias_mu, grad_bias_rho), each empty
  // unless asked for (need_x, need_w, need_b); dW and the signs regenerated.
  m.def("linear_flipout_rows_backward(Tensor grad_y, Tensor grad_log_q, Tensor grad_log_p, Tensor x, "
        "Tensor weight_mu, Tensor weight_rho, Tensor? bias_mu, Tensor? bias_rho, Tensor seed, float prior_pi, "
        "float prior_sigma1, float prior_sigma2, int block_rows, bool need_x, bool need_w, bool need_b) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Local reparameterisation's output noise, one fused pass each way; eps is stream (seed, offset),
  // element i of the contiguous tensor drawing stream element i (philox_normal(var, seed, offset)).
  // lrt_output_: var becomes std = sqrt(max(var, 0)) in place (var must be contiguous); returns
  // y = mean + std * eps. lrt_noise_grad: dL/dvar = grad * eps / (2 std) for that y, 0 where std is
  // not > 0 (sqrt has no derivative at 0). seed may also hold N seeds (1-D): the elements then form
  // N equal consecutive groups, group s drawing (seed[s], offset) from its own element 0 (N samples
  // of the vectorised ELBO in one call). Impl: cpu/lrt_noise_cpu.cpp, cuda/lrt_noise_cuda.cu.
  m.def("lrt_output_(Tensor(a!) var, Tensor mean, Tensor seed, int offset) -> Tensor");
  m.def("lrt_noise_grad(Tensor grad, Tensor std, Tensor seed, int offset) -> Tensor");
  // Local reparameterisation's weight pass: (sigma2 = softplus(rho)^2, closed-form KL against
  // N(0, prior_sigma^2)); prior_sigma = 0 skips the KL (returns 0). Impl: cpu/lrt_weight_cpu.cpp.
  m.def("lrt_weight_forward(Tensor mu, Tensor rho, float prior_sigma) -> (Tensor, Tensor)");
  // Its backward in place: grad_mu holds dL/dmu and grad_rho dL/dsigma2 from the data on entry,
  // the full gradients (with grad_kl times the KL's) on exit. Returns sigma2 again (same pass).
  m.def("lrt_weight_backward_(Tensor(a!) grad_mu, Tensor(b!) grad_rho, Tensor grad_kl, Tensor mu, Tensor rho, "
        "float prior_sigma) -> Tensor");
}
