// The float32 GEMMs of the whole-layer ops: oneDNN's (torch's own copy, through the op
// mkldnn::_linear_pointwise) where it beats torch's matmul (MKL), torch's everywhere else.
//
// Why: on AMD CPUs MKL runs its generic sgemm path. On a 2-core AMD EPYC (torch 2.13, MKL 2024.2,
// oneDNN 3.12) oneDNN took 64x1024x1024 in 0.76 ms against MKL's 1.1-1.3 (two threads), 1024^3 in
// 11.2 against 14.1 ms, 64x4096^2 in 11.8 against 16.2 ms; below ~4M multiply-adds its fixed cost
// (~20 us) loses (bench/results/onednn_gemms_cpu_2c-amd-epyc.md). Not measured on Intel CPUs, where
// MKL is Intel's own, so "auto" keeps torch's GEMMs there. The layer ops take these for their
// forward and dL/dx GEMMs; the weight gradients (the batch as the inner dimension, written into
// the gradients' own buffers by at::mm_out) keep torch's.
//
// BAYES_EXT_CPU_GEMM picks, read at every call: "auto" (default: oneDNN on AMD CPUs), "onednn"
// (wherever torch has it) or "torch". The two round differently (float32 sums in another order),
// so a layer's values move by float32 rounding between them; the small GEMMs below the size
// threshold always take torch's, which keeps a small layer's C++ op bit for bit equal to its
// Python op.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace bayes_ext {
namespace cpu_gemm {

// Multiply-adds from which oneDNN's GEMM is used (64x256x256: the two were level there).
constexpr int64_t kOneDnnMinMacs = int64_t(1) << 22;

// a w^T + bias for a (..., K), w (N, K), bias (N) or none: at::linear's contract.
at::Tensor linear(const at::Tensor& a, const at::Tensor& w, const c10::optional<at::Tensor>& bias = c10::nullopt);

// a b for 2-D a (M, K) and b (K, N): at::mm's contract.
at::Tensor mm(const at::Tensor& a, const at::Tensor& b);

// c + a b (at::addmm) and c += a b (Tensor::addmm_); through oneDNN as the product, then an add.
at::Tensor addmm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b);
at::Tensor& addmm_(at::Tensor& c, const at::Tensor& a, const at::Tensor& b);

}  // namespace cpu_gemm
}  // namespace bayes_ext
