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

// The elementwise loops are templated on everything that would otherwise be a loop-invariant
// branch (prior mode, optional grad_w / w), because GCC does not vectorise loops that keep them.
// Each tile is a function of its own because GCC honours __restrict__ on parameters (kept through
// inlining) but not on local pointers; without it the loops need more run-time alias checks than
// GCC will emit.
template <typename T, int Mode>
static inline __attribute__((always_inline)) void forward_tile(
    int64_t n, const T* __restrict__ e, const T* __restrict__ mu, const T* __restrict__ rho, T* __restrict__ w,
    T* __restrict__ lq_acc, T* __restrict__ lp_acc, const ScaleMixturePrior<T>& prior_in) {
  const ScaleMixturePrior<T> prior = prior_in;
  for (int64_t i = 0; i < n; ++i) {
    const Softplus<T> sp = softplus_terms(rho[i]);
    const T wi = mu[i] + sp.sigma * e[i];
    w[i] = wi;
    lq_acc[i] += -sp.log_sigma - T(0.5) * e[i] * e[i];
    lp_acc[i] += log_prior_mode<Mode>(wi, prior);
  }
}

template <typename T, int Mode>
static inline void forward_range_loop(const ForwardRange<T>& a) {
  T lq_acc[kTile], lp_acc[kTile], eps[kTile];
  for (int64_t i = 0; i < kTile; ++i) {
    lq_acc[i] = T(0);
    lp_acc[i] = T(0);
  }
  for (int64_t start = a.begin; start < a.end;) {
    const int64_t aligned = start & ~int64_t(3);
    tile_normals<T>(a.seed, a.offset, aligned, eps);
    const int64_t stop = aligned + kTile < a.end ? aligned + kTile : a.end;
    forward_tile<T, Mode>(stop - start, eps + (start - aligned), a.mu + start, a.rho + start, a.w + start, lq_acc,
                          lp_acc, a.prior);
    start = stop;
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
static inline void forward_range_impl(const ForwardRange<T>& a) {
  switch (a.prior.mode) {
    case 1: return forward_range_loop<T, 1>(a);
    case 2: return forward_range_loop<T, 2>(a);
    default: return forward_range_loop<T, 0>(a);
  }
}

template <typename T, int Mode, bool HasGradW, bool WriteW>
static inline __attribute__((always_inline)) void backward_tile(
    int64_t n, const T* __restrict__ e, const T* __restrict__ mu, const T* __restrict__ rho,
    const T* __restrict__ gw, T* __restrict__ gmu, T* __restrict__ grho, T* __restrict__ w_out, T glq, T glp,
    const ScaleMixturePrior<T>& prior_in) {
  const ScaleMixturePrior<T> prior = prior_in;
  for (int64_t i = 0; i < n; ++i) {
    const Softplus<T> sp = softplus_terms(rho[i]);
    const T wi = mu[i] + sp.sigma * e[i];
    T g = glp * dlog_prior_mode<Mode>(wi, prior);
    if (HasGradW) g += gw[i];
    gmu[i] = g;
    grho[i] = g * e[i] * sp.sigmoid - glq * sp.dlog_sigma;
    if (WriteW) w_out[i] = wi;
  }
}

template <typename T, int Mode, bool HasGradW, bool WriteW>
static inline void backward_range_loop(const BackwardRange<T>& a) {
  T eps[kTile];
  for (int64_t start = a.begin; start < a.end;) {
    const int64_t aligned = start & ~int64_t(3);
    tile_normals<T>(a.seed, a.offset, aligned, eps);
    const int64_t stop = aligned + kTile < a.end ? aligned + kTile : a.end;
    backward_tile<T, Mode, HasGradW, WriteW>(stop - start, eps + (start - aligned), a.mu + start, a.rho + start,
                                             HasGradW ? a.grad_w + start : nullptr, a.grad_mu + start,
                                             a.grad_rho + start, WriteW ? a.w + start : nullptr, a.grad_log_q,
                                             a.grad_log_p, a.prior);
    start = stop;
  }
}

template <typename T, int Mode>
static inline void backward_range_mode(const BackwardRange<T>& a) {
  const bool has_gw = a.grad_w != nullptr, write_w = a.w != nullptr;
  if (has_gw && write_w) return backward_range_loop<T, Mode, true, true>(a);
  if (has_gw) return backward_range_loop<T, Mode, true, false>(a);
  if (write_w) return backward_range_loop<T, Mode, false, true>(a);
  return backward_range_loop<T, Mode, false, false>(a);
}

template <typename T>
static inline void backward_range_impl(const BackwardRange<T>& a) {
  switch (a.prior.mode) {
    case 1: return backward_range_mode<T, 1>(a);
    case 2: return backward_range_mode<T, 2>(a);
    default: return backward_range_mode<T, 0>(a);
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
