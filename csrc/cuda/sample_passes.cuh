// The per-thread loops of the sampling kernels, shared by the one-tensor kernels
// (sample_weight_cuda.cu) and the kernels that sample a layer's weight and bias in one launch
// (sample_weight_bias_cuda.cu). Each thread owns whole Philox blocks (4 elements), so the noise is
// the same as on the CPU whatever the launch geometry; a pass covers the blocks j = block *
// blockDim.x + threadIdx.x, stepping by grid * blockDim.x, so a kernel may give each tensor its own
// range of CUDA blocks and every block still sums exactly what the one-tensor kernel's would.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <type_traits>

#include "bayes_ext/posterior_math.h"

namespace bayes_ext {

// Philox blocks covering stream elements [start, start + n).
__host__ __device__ __forceinline__ int64_t philox_blocks_spanned(int64_t n, int64_t start) {
  return n == 0 ? 0 : (start + n + 3) / 4 - start / 4;
}

// The vectorised passes (Vec = true, float only) move a whole Philox block, 4 consecutive
// elements, with one 16-byte access per tensor instead of four strided 4-byte ones. They need the
// stream to start on a block boundary (start % 4 == 0, so thread j owns elements 4j..4j+3) and
// 16-byte aligned pointers; a partial last block falls back to the element loop.
inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename... P>
bool can_vectorise(c10::ScalarType dtype, int64_t start, const P*... ptrs) {
  return dtype == c10::kFloat && start % 4 == 0 && (aligned16(ptrs) && ...);
}

__device__ __forceinline__ void load4(const float* p, int64_t j, float v[4]) {
  const float4 q = reinterpret_cast<const float4*>(p)[j];
  v[0] = q.x;
  v[1] = q.y;
  v[2] = q.z;
  v[3] = q.w;
}

__device__ __forceinline__ void store4(float* p, int64_t j, const float v[4]) {
  reinterpret_cast<float4*>(p)[j] = make_float4(v[0], v[1], v[2], v[3]);
}

// The four values of a whole Philox block in W's dtype: one 16-byte store in fp32, one 8-byte store
// of the four rounded values in bf16 / fp16 (rounded to nearest even, as at::Tensor::to does).
__device__ __forceinline__ void store4_as(float* p, int64_t j, const float v[4]) { store4(p, j, v); }

template <typename WT>
__device__ __forceinline__ void store4_as(WT* p, int64_t j, const float v[4]) {
  static_assert(sizeof(WT) == 2, "bf16 / fp16");
  uint32_t bits[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) bits[k] = WT(v[k]).x;
  reinterpret_cast<uint2*>(p)[j] = make_uint2(bits[0] | (bits[1] << 16), bits[2] | (bits[3] << 16));
}

// w = mu + softplus(rho) * eps for this thread's blocks of one tensor, adding its log q / log p
// terms to lq / lp (a caller that never reads them lets the compiler drop their logs and exps).
// WT: w's dtype (T, or bf16 / fp16 for fp32 parameters); w null: only the sums. noise_only: w
// receives w - mu (Flipout's dW), the KL terms stay w's.
template <typename T, bool Vec, typename WT>
__device__ __forceinline__ void sample_pass(const T* __restrict__ mu, const T* __restrict__ rho, WT* __restrict__ w,
                                            int64_t n, int64_t start, uint64_t seed, uint64_t offset,
                                            const ScaleMixturePrior<T>& prior, bool noise_only, int64_t block,
                                            int64_t grid, T& lq, T& lp) {
  static_assert(!Vec || std::is_same<T, float>::value, "the vectorised pass is float only");
  const int64_t first_block = start / 4;
  const int64_t num_blocks = philox_blocks_spanned(n, start);
  for (int64_t j = block * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < num_blocks;
       j += grid * static_cast<int64_t>(blockDim.x)) {
    const int64_t b = first_block + j;
    T eps[4];
    block_normals<T>(seed, offset, static_cast<uint64_t>(b), eps);
    if constexpr (Vec) {
      if (4 * j + 4 <= n) {  // a whole block: elements 4j..4j+3
        float m[4], r[4], wv[4];
        load4(mu, j, m);
        load4(rho, j, r);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const Softplus<float> sp = softplus_forward_terms(r[k]);
          wv[k] = m[k] + sp.sigma * eps[k];
          lq += -sp.log_sigma - 0.5f * eps[k] * eps[k];
          lp += log_prior(wv[k], prior);
        }
        if (noise_only) {
#pragma unroll
          for (int k = 0; k < 4; ++k) wv[k] -= m[k];
        }
        if (w != nullptr) store4_as(w, j, wv);
        continue;
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * b + k - start;  // array index of stream element 4b + k
      if (i >= 0 && i < n) {
        const Softplus<T> sp = softplus_forward_terms(rho[i]);
        const T wi = mu[i] + sp.sigma * eps[k];
        if (w != nullptr) w[i] = static_cast<WT>(noise_only ? wi - mu[i] : wi);  // null: only the KL sums
        lq += -sp.log_sigma - T(0.5) * eps[k] * eps[k];
        lp += log_prior(wi, prior);
      }
    }
  }
}

// The gradients of sample_pass's w and log q / log p w.r.t. mu and rho for this thread's blocks,
// regenerating eps; glq / glp are the incoming gradients of log q / log p. grad_mu may be grad_w
// itself (the linear backward's in-place call): each element is read before it is written, by the
// same thread, so neither pointer is __restrict__. grad_w null: zero. noise_only: grad_w is the
// gradient of the noise w - mu (it reaches grad_rho, not grad_mu) and w_out receives the noise.
template <typename T, bool Vec>
__device__ __forceinline__ void backward_pass(const T* grad_w, T glq, T glp, const T* __restrict__ mu,
                                              const T* __restrict__ rho, T* grad_mu, T* __restrict__ grad_rho,
                                              T* __restrict__ w_out, int64_t n, int64_t start, uint64_t seed,
                                              uint64_t offset, const ScaleMixturePrior<T>& prior, bool noise_only,
                                              int64_t block, int64_t grid) {
  static_assert(!Vec || std::is_same<T, float>::value, "the vectorised pass is float only");
  const int64_t first_block = start / 4;
  const int64_t num_blocks = philox_blocks_spanned(n, start);
  for (int64_t j = block * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < num_blocks;
       j += grid * static_cast<int64_t>(blockDim.x)) {
    const int64_t b = first_block + j;
    T eps[4];
    block_normals<T>(seed, offset, static_cast<uint64_t>(b), eps);
    if constexpr (Vec) {
      if (4 * j + 4 <= n) {  // a whole block: elements 4j..4j+3
        float m[4], r[4], gw[4] = {0.f, 0.f, 0.f, 0.f}, gm[4], gr[4], wv[4];
        load4(mu, j, m);
        load4(rho, j, r);
        if (grad_w != nullptr) load4(grad_w, j, gw);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const Softplus<float> sp = softplus_terms(r[k]);
          wv[k] = m[k] + sp.sigma * eps[k];
          gm[k] = gw[k] + glp * dlog_prior(wv[k], prior);
          gr[k] = gm[k] * eps[k] * sp.sigmoid - glq * sp.dlog_sigma;
          if (noise_only) {
            gm[k] -= gw[k];
            wv[k] -= m[k];
          }
        }
        store4(grad_mu, j, gm);
        store4(grad_rho, j, gr);
        if (w_out != nullptr) store4(w_out, j, wv);
        continue;
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * b + k - start;  // array index of stream element 4b + k
      if (i >= 0 && i < n) {
        const Softplus<T> sp = softplus_terms(rho[i]);
        const T wi = mu[i] + sp.sigma * eps[k];
        const T gwi = grad_w == nullptr ? T(0) : grad_w[i];
        const T g = gwi + glp * dlog_prior(wi, prior);
        grad_mu[i] = noise_only ? g - gwi : g;
        grad_rho[i] = g * eps[k] * sp.sigmoid - glq * sp.dlog_sigma;
        if (w_out != nullptr) w_out[i] = noise_only ? wi - mu[i] : wi;
      }
    }
  }
}

}  // namespace bayes_ext
