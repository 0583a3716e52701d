// The CPU sample / backward loops over one index range, as templates. Each ISA variant
// (range_kernels_{portable,avx2,avx512}.cpp) includes this file inside its own namespace-free
// translation unit compiled for that ISA and exports the instantiations through the
// declarations in range_kernels_api.h. Nothing here touches ATen, so no ATen inline function is
// ever compiled with a wider ISA than the portable build.
//
// Work is done in tiles of 64 elements (16 Philox blocks): first the Philox words for the tile,
// then Box-Muller into a small buffer, then one elementwise pass. Each loop is branch-free so the
// compiler vectorises it; reductions go into per-lane accumulators to stay vectorisable and to
// make the summation order independent of the thread count.
#pragma once

#include <cstdint>

#include "bayes_ext/posterior_math.h"
#include "range_kernels_api.h"

namespace bayes_ext {
namespace cpu_kernel {

constexpr int64_t kTile = 64;
constexpr int64_t kBlocksPerTile = kTile / 4;

// eps for elements [base, base + 64) of stream (seed, offset); base is a multiple of 4. Ranges
// may start anywhere (embedding rows): the loops below align each tile down to its Philox block.
template <typename T>
static inline void tile_normals(uint64_t seed, uint64_t offset, int64_t base, T* eps) {
  uint32_t x0[kBlocksPerTile], x1[kBlocksPerTile], x2[kBlocksPerTile], x3[kBlocksPerTile];
  const uint64_t first_block = static_cast<uint64_t>(base) / 4;
  for (int64_t j = 0; j < kBlocksPerTile; ++j) {
    const PhiloxOut x = philox_block(seed, offset, first_block + static_cast<uint64_t>(j));
    x0[j] = x.x[0];
    x1[j] = x.x[1];
    x2[j] = x.x[2];
    x3[j] = x.x[3];
  }
  T e0[kBlocksPerTile], e1[kBlocksPerTile], e2[kBlocksPerTile], e3[kBlocksPerTile];
  for (int64_t j = 0; j < kBlocksPerTile; ++j) {
    const T r01 = bx_sqrt(T(-2) * bx_log(radius_uniform<T>(x0[j])));
    const T r23 = bx_sqrt(T(-2) * bx_log(radius_uniform<T>(x2[j])));
    T s01, c01, s23, c23;
    bx_sincos_2pi(angle_uniform<T>(x1[j]), &s01, &c01);
    bx_sincos_2pi(angle_uniform<T>(x3[j]), &s23, &c23);
    e0[j] = r01 * c01;
    e1[j] = r01 * s01;
    e2[j] = r23 * c23;
    e3[j] = r23 * s23;
  }
  for (int64_t j = 0; j < kBlocksPerTile; ++j) {
    eps[4 * j + 0] = e0[j];
    eps[4 * j + 1] = e1[j];
    eps[4 * j + 2] = e2[j];
    eps[4 * j + 3] = e3[j];
  }
}

template <typename T>
static inline void forward_range_impl(const ForwardRange<T>& a) {
  T lq_acc[kTile], lp_acc[kTile], eps[kTile];
  for (int64_t i = 0; i < kTile; ++i) {
    lq_acc[i] = T(0);
    lp_acc[i] = T(0);
  }
  const ScaleMixturePrior<T> prior = a.prior;
  for (int64_t start = a.begin; start < a.end;) {
    const int64_t aligned = start & ~int64_t(3);
    tile_normals<T>(a.seed, a.offset, aligned, eps);
    const int64_t stop = aligned + kTile < a.end ? aligned + kTile : a.end;
    const int64_t n = stop - start;
    const T* e = eps + (start - aligned);
    const T* mu = a.mu + start;
    const T* rho = a.rho + start;
    T* w = a.w + start;
    start = stop;
    for (int64_t i = 0; i < n; ++i) {
      const Softplus<T> sp = softplus_terms(rho[i]);
      const T wi = mu[i] + sp.sigma * e[i];
      w[i] = wi;
      lq_acc[i] += -sp.log_sigma - T(0.5) * e[i] * e[i];
      lp_acc[i] += log_prior(wi, prior);
    }
  }
  double lq = 0.0, lp = 0.0;
  for (int64_t i = 0; i < kTile; ++i) {
    lq += static_cast<double>(lq_acc[i]);
    lp += static_cast<double>(lp_acc[i]);
  }
  *a.log_q_partial = lq;
  *a.log_p_partial = lp;
}

template <typename T>
static inline void backward_range_impl(const BackwardRange<T>& a) {
  T eps[kTile];
  const ScaleMixturePrior<T> prior = a.prior;
  const T glq = a.grad_log_q, glp = a.grad_log_p;
  for (int64_t start = a.begin; start < a.end;) {
    const int64_t aligned = start & ~int64_t(3);
    tile_normals<T>(a.seed, a.offset, aligned, eps);
    const int64_t stop = aligned + kTile < a.end ? aligned + kTile : a.end;
    const int64_t n = stop - start;
    const T* e = eps + (start - aligned);
    const T* mu = a.mu + start;
    const T* rho = a.rho + start;
    T* gmu = a.grad_mu + start;
    T* grho = a.grad_rho + start;
    const T* gw = a.grad_w == nullptr ? nullptr : a.grad_w + start;
    T* w_out = a.w == nullptr ? nullptr : a.w + start;
    start = stop;
    for (int64_t i = 0; i < n; ++i) {
      const Softplus<T> sp = softplus_terms(rho[i]);
      const T wi = mu[i] + sp.sigma * e[i];
      const T g = (gw == nullptr ? T(0) : gw[i]) + glp * dlog_prior(wi, prior);
      gmu[i] = g;
      grho[i] = g * e[i] * sp.sigmoid - glq * sp.dlog_sigma;
      if (w_out != nullptr) w_out[i] = wi;
    }
  }
}

template <typename T>
static inline void normals_range_impl(uint64_t seed, uint64_t offset, int64_t begin, int64_t end, T* out) {
  T eps[kTile];
  for (int64_t start = begin; start < end;) {
    const int64_t aligned = start & ~int64_t(3);
    tile_normals<T>(seed, offset, aligned, eps);
    const int64_t stop = aligned + kTile < end ? aligned + kTile : end;
    for (int64_t i = start; i < stop; ++i) out[i] = eps[i - aligned];
    start = stop;
  }
}

}  // namespace cpu_kernel
}  // namespace bayes_ext

// Defines the exported entry points of one ISA variant.
#define BAYES_EXT_DEFINE_RANGE_KERNELS(ISA, T)                                                    \
  namespace bayes_ext {                                                                           \
  namespace cpu_kernel {                                                                          \
  void forward_range_##ISA(const ForwardRange<T>& a) { forward_range_impl<T>(a); }                \
  void backward_range_##ISA(const BackwardRange<T>& a) { backward_range_impl<T>(a); }             \
  void normals_range_##ISA(uint64_t seed, uint64_t offset, int64_t begin, int64_t end, T* out) {  \
    normals_range_impl<T>(seed, offset, begin, end, out);                                         \
  }                                                                                               \
  }                                                                                               \
  }
