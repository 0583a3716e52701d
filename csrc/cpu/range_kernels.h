// The CPU sample / backward loops over one index range, as templates. Each ISA variant
// (range_kernels_{portable,avx2,avx512}.cpp) includes this file inside its own namespace-free
// translation unit compiled for that ISA and exports the instantiations through the
// declarations in range_kernels_api.h. Nothing here touches ATen, so no ATen inline function is
// ever compiled with a wider ISA than the portable build.
//
// Work is done in tiles of 256 elements (64 Philox blocks): first the Philox words for the tile,
// then Box-Muller into a small buffer, then one elementwise pass. Each loop is branch-free so the
// compiler vectorises it; reductions go into per-lane accumulators to stay vectorisable and to
// make the summation order independent of the thread count.
#pragma once

#include <cstdint>
#if defined(BAYES_EXT_CPU_AVX512) || defined(BAYES_EXT_CPU_AVX2)
#include <immintrin.h>
#endif

#include "bayes_ext/posterior_math.h"
#include "range_kernels_api.h"

namespace bayes_ext {
namespace cpu_kernel {

constexpr int64_t kTile = 256;
constexpr int64_t kBlocksPerTile = kTile / 4;

#if defined(BAYES_EXT_CPU_AVX512)
using PhiloxVec = __m512i;
constexpr int kPhiloxLanes = 16;
static inline PhiloxVec vset1(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
static inline PhiloxVec vload(const uint32_t* p) { return _mm512_load_si512(p); }
static inline void vstore(uint32_t* p, PhiloxVec v) { _mm512_storeu_si512(p, v); }
static inline PhiloxVec vxor(PhiloxVec a, PhiloxVec b) { return _mm512_xor_si512(a, b); }
// 32x32->64-bit products of every lane: vpmuludq on the even lanes and on the odd lanes shifted
// down, recombined with blends.
static inline void vmulhilo(PhiloxVec a, PhiloxVec m, PhiloxVec* hi, PhiloxVec* lo) {
  const PhiloxVec even = _mm512_mul_epu32(a, m);
  const PhiloxVec odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
#elif defined(BAYES_EXT_CPU_AVX2)
using PhiloxVec = __m256i;
constexpr int kPhiloxLanes = 8;
static inline PhiloxVec vset1(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
static inline PhiloxVec vload(const uint32_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
static inline void vstore(uint32_t* p, PhiloxVec v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
static inline PhiloxVec vxor(PhiloxVec a, PhiloxVec b) { return _mm256_xor_si256(a, b); }
static inline void vmulhilo(PhiloxVec a, PhiloxVec m, PhiloxVec* hi, PhiloxVec* lo) {
  const PhiloxVec even = _mm256_mul_epu32(a, m);
  const PhiloxVec odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
#endif

// Philox words of blocks [first_block, first_block + kPhiloxGroup), one lane per block: with AVX2 /
// AVX-512 in 32-bit lanes (compilers widen the scalar code to 64-bit lanes, twice the work),
// otherwise the scalar header function. Several vectors of blocks at a time hide the multiplies'
// latency (rounds depend on each other); four AVX-512 vectors, two AVX2 ones (more would not stay
// in AVX2's 16 registers).
#if defined(BAYES_EXT_CPU_AVX512)
constexpr int64_t kPhiloxGroup = 4 * kPhiloxLanes;
#elif defined(BAYES_EXT_CPU_AVX2)
constexpr int64_t kPhiloxGroup = 2 * kPhiloxLanes;
#else
constexpr int64_t kPhiloxGroup = 16;
#endif
static_assert(kBlocksPerTile % kPhiloxGroup == 0, "a tile is a whole number of Philox groups");

static inline void philox_group(uint64_t seed, uint64_t offset, uint64_t first_block, uint32_t* x0, uint32_t* x1,
                                uint32_t* x2, uint32_t* x3) {
#if defined(BAYES_EXT_CPU_AVX512) || defined(BAYES_EXT_CPU_AVX2)
  alignas(64) uint32_t lo_words[kPhiloxGroup], hi_words[kPhiloxGroup];
  for (int64_t j = 0; j < kPhiloxGroup; ++j) {
    const uint64_t block = first_block + static_cast<uint64_t>(j);
    lo_words[j] = static_cast<uint32_t>(block);
    hi_words[j] = static_cast<uint32_t>(block >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  constexpr int kVecs = kPhiloxGroup / kPhiloxLanes;
  constexpr int kLanes = kPhiloxLanes;
  PhiloxVec c0[kVecs], c1[kVecs], c2[kVecs], c3[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    c0[v] = vload(lo_words + v * kLanes);
    c1[v] = vload(hi_words + v * kLanes);
    c2[v] = vset1(static_cast<uint32_t>(offset));
    c3[v] = vset1(static_cast<uint32_t>(offset >> 32));
  }
  const PhiloxVec m0 = vset1(kPhiloxM0), m1 = vset1(kPhiloxM1);
  for (int round = 0; round < 10; ++round) {
    const PhiloxVec key0 = vset1(k0), key1 = vset1(k1);
    for (int v = 0; v < kVecs; ++v) {
      PhiloxVec hi0, lo0, hi1, lo1;
      vmulhilo(c0[v], m0, &hi0, &lo0);
      vmulhilo(c2[v], m1, &hi1, &lo1);
      c0[v] = vxor(vxor(hi1, c1[v]), key0);
      c1[v] = lo1;
      c2[v] = vxor(vxor(hi0, c3[v]), key1);
      c3[v] = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int v = 0; v < kVecs; ++v) {
    vstore(x0 + v * kLanes, c0[v]);
    vstore(x1 + v * kLanes, c1[v]);
    vstore(x2 + v * kLanes, c2[v]);
    vstore(x3 + v * kLanes, c3[v]);
  }
#else
  for (int64_t j = 0; j < kPhiloxGroup; ++j) {
    const PhiloxOut x = philox_block(seed, offset, first_block + static_cast<uint64_t>(j));
    x0[j] = x.x[0];
    x1[j] = x.x[1];
    x2[j] = x.x[2];
    x3[j] = x.x[3];
  }
#endif
}

// Philox words of the tile's blocks [first_block, first_block + kBlocksPerTile).
static inline void philox_tile(uint64_t seed, uint64_t offset, uint64_t first_block, uint32_t* x0, uint32_t* x1,
                               uint32_t* x2, uint32_t* x3) {
  for (int64_t g = 0; g < kBlocksPerTile; g += kPhiloxGroup)
    philox_group(seed, offset, first_block + static_cast<uint64_t>(g), x0 + g, x1 + g, x2 + g, x3 + g);
}

// eps for stream elements [base, base + kTile) of stream (seed, offset); base is a multiple of 4.
template <typename T>
static inline void tile_normals(uint64_t seed, uint64_t offset, int64_t base, T* eps) {
  alignas(64) uint32_t x0[kBlocksPerTile], x1[kBlocksPerTile], x2[kBlocksPerTile], x3[kBlocksPerTile];
  philox_tile(seed, offset, static_cast<uint64_t>(base) / 4, x0, x1, x2, x3);
  T e0[kBlocksPerTile], e1[kBlocksPerTile], e2[kBlocksPerTile], e3[kBlocksPerTile];
  for (int64_t j = 0; j < kBlocksPerTile; ++j) {
    const T r01 = bx_sqrt(T(-2) * bx_log_positive(radius_uniform<T>(x0[j])));
    const T r23 = bx_sqrt(T(-2) * bx_log_positive(radius_uniform<T>(x2[j])));
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

// Array element i uses stream element stream_start + i. A tile covers the 64 stream elements from
// the Philox block holding element i's stream index: `aligned` is that tile's first stream index,
// `skip` where element i sits in it, `stop` the array index after the tile (or `end`).
struct TileSpan {
  int64_t aligned, skip, stop;
};

static inline TileSpan tile_span(int64_t i, int64_t end, int64_t stream_start) {
  const int64_t s = stream_start + i;
  const int64_t aligned = s & ~int64_t(3);
  const int64_t stop = i + (aligned + kTile - s);
  return {aligned, s - aligned, stop < end ? stop : end};
}

// Whether every rho[0, n) is <= 0 (NaN is not), so the tile may use softplus_terms_nonpositive.
template <typename T>
static inline __attribute__((always_inline)) bool all_nonpositive(int64_t n, const T* __restrict__ rho) {
  int ok = 1;
  for (int64_t i = 0; i < n; ++i) ok &= rho[i] <= T(0);
  return ok != 0;
}

// sigma and log sigma of rho; NonPos: the caller checked rho <= 0 for the whole tile.
template <bool NonPos, typename T>
static inline __attribute__((always_inline)) Softplus<T> softplus_sigma_terms(T rho) {
  return NonPos ? softplus_terms_nonpositive(rho) : softplus_terms(rho);
}

// The elementwise loops are templated on everything that would otherwise be a loop-invariant
// branch (prior mode, optional grad_w / w), because GCC does not vectorise loops that keep them.
// Each tile is a function of its own because GCC honours __restrict__ on parameters (kept through
// inlining) but not on local pointers; without it the loops need more run-time alias checks than
// GCC will emit.
// Pre: sigma (and log sigma) come from arrays filled by softplus_range instead of rho. NonPos:
// every rho of the tile is <= 0 (all_nonpositive), log sigma comes from the polynomial.
template <typename T, int Mode, bool WriteW, bool Pre, bool NonPos>
static inline __attribute__((always_inline)) void forward_tile(
    int64_t n, const T* __restrict__ e, const T* __restrict__ mu, const T* __restrict__ rho, T* __restrict__ w,
    T* __restrict__ lq_acc, T* __restrict__ lp_acc, const ScaleMixturePrior<T>& prior_in,
    const T* __restrict__ sigma_pre, const T* __restrict__ log_sigma_pre) {
  const ScaleMixturePrior<T> prior = prior_in;
  for (int64_t i = 0; i < n; ++i) {
    const Softplus<T> sp =
        Pre ? Softplus<T>{sigma_pre[i], log_sigma_pre[i], T(0), T(0)} : softplus_sigma_terms<NonPos>(rho[i]);
    const T wi = mu[i] + sp.sigma * e[i];
    if (WriteW) w[i] = wi;
    lq_acc[i] += -sp.log_sigma - T(0.5) * e[i] * e[i];
    lp_acc[i] += log_prior_mode<Mode>(wi, prior);
  }
}

// x[i] -= y[i]: turns a tile of samples into their noise (w - mu) or a tile of grad_mu into the part
// that does not come through w (noise_only), while the tile is in cache.
template <typename T>
static inline __attribute__((always_inline)) void subtract_tile(int64_t n, T* __restrict__ x,
                                                                const T* __restrict__ y) {
  for (int64_t i = 0; i < n; ++i) x[i] -= y[i];
}

template <typename T, int Mode, bool WriteW, bool Pre>
static inline void forward_range_loop(const ForwardRange<T>& a) {
  T lq_acc[kTile], lp_acc[kTile], eps[kTile];
  for (int64_t i = 0; i < kTile; ++i) {
    lq_acc[i] = T(0);
    lp_acc[i] = T(0);
  }
  for (int64_t i = a.begin; i < a.end;) {
    const TileSpan span = tile_span(i, a.end, a.stream_start);
    tile_normals<T>(a.seed, a.offset, span.aligned, eps);
    const int64_t n = span.stop - i;
    if (!Pre && all_nonpositive(n, a.rho + i)) {
      forward_tile<T, Mode, WriteW, false, true>(n, eps + span.skip, a.mu + i, a.rho + i, WriteW ? a.w + i : nullptr,
                                                 lq_acc, lp_acc, a.prior, nullptr, nullptr);
    } else {
      forward_tile<T, Mode, WriteW, Pre, false>(n, eps + span.skip, a.mu + i, a.rho + i, WriteW ? a.w + i : nullptr,
                                                lq_acc, lp_acc, a.prior, Pre ? a.sigma + i : nullptr,
                                                Pre ? a.log_sigma + i : nullptr);
    }
    if (WriteW && a.noise_only) subtract_tile(n, a.w + i, a.mu + i);
    i = span.stop;
  }
  double lq = 0.0, lp = 0.0;
  for (int64_t i = 0; i < kTile; ++i) {
    lq += static_cast<double>(lq_acc[i]);
    lp += static_cast<double>(lp_acc[i]);
  }
  *a.log_q_partial = lq;
  *a.log_p_partial = lp;
}

// w == nullptr: only the log q / log p sums (a KL estimate without writing the sample).
template <typename T, bool WriteW, bool Pre>
static inline void forward_range_write(const ForwardRange<T>& a) {
  switch (a.prior.mode) {
    case 1: return forward_range_loop<T, 1, WriteW, Pre>(a);
    case 2: return forward_range_loop<T, 2, WriteW, Pre>(a);
    default: return forward_range_loop<T, 0, WriteW, Pre>(a);
  }
}

template <typename T>
static inline void forward_range_impl(const ForwardRange<T>& a) {
  const bool pre = a.sigma != nullptr && a.log_sigma != nullptr;
  if (a.w != nullptr) return pre ? forward_range_write<T, true, true>(a) : forward_range_write<T, true, false>(a);
  return pre ? forward_range_write<T, false, true>(a) : forward_range_write<T, false, false>(a);
}

template <typename T, int Mode, bool HasGradW, bool WriteW, bool Pre>
static inline __attribute__((always_inline)) void backward_tile(
    int64_t n, const T* __restrict__ e, const T* __restrict__ mu, const T* __restrict__ rho,
    const T* __restrict__ gw, T* __restrict__ gmu, T* __restrict__ grho, T* __restrict__ w_out, T glq, T glp,
    const ScaleMixturePrior<T>& prior_in, const T* __restrict__ sigma_pre, const T* __restrict__ sigmoid_pre,
    const T* __restrict__ dlog_sigma_pre) {
  const ScaleMixturePrior<T> prior = prior_in;
  for (int64_t i = 0; i < n; ++i) {
    const Softplus<T> sp = Pre ? Softplus<T>{sigma_pre[i], T(0), sigmoid_pre[i], dlog_sigma_pre[i]}
                               : softplus_terms(rho[i]);
    const T wi = mu[i] + sp.sigma * e[i];
    T g = glp * dlog_prior_mode<Mode>(wi, prior);
    if (HasGradW) g += gw[i];
    gmu[i] = g;
    grho[i] = g * e[i] * sp.sigmoid - glq * sp.dlog_sigma;
    if (WriteW) w_out[i] = wi;
  }
}

template <typename T, int Mode, bool HasGradW, bool WriteW, bool Pre>
static inline void backward_range_loop(const BackwardRange<T>& a) {
  T eps[kTile];
  for (int64_t i = a.begin; i < a.end;) {
    const TileSpan span = tile_span(i, a.end, a.stream_start);
    tile_normals<T>(a.seed, a.offset, span.aligned, eps);
    const int64_t n = span.stop - i;
    backward_tile<T, Mode, HasGradW, WriteW, Pre>(
        n, eps + span.skip, a.mu + i, a.rho + i, HasGradW ? a.grad_w + i : nullptr, a.grad_mu + i, a.grad_rho + i,
        WriteW ? a.w + i : nullptr, a.grad_log_q, a.grad_log_p, a.prior, Pre ? a.sigma + i : nullptr,
        Pre ? a.sigmoid + i : nullptr, Pre ? a.dlog_sigma + i : nullptr);
    if (a.noise_only) {
      if (HasGradW) subtract_tile(n, a.grad_mu + i, a.grad_w + i);
      if (WriteW) subtract_tile(n, a.w + i, a.mu + i);
    }
    i = span.stop;
  }
}

template <typename T, int Mode, bool Pre>
static inline void backward_range_mode(const BackwardRange<T>& a) {
  const bool has_gw = a.grad_w != nullptr, write_w = a.w != nullptr;
  if (has_gw && write_w) return backward_range_loop<T, Mode, true, true, Pre>(a);
  if (has_gw) return backward_range_loop<T, Mode, true, false, Pre>(a);
  if (write_w) return backward_range_loop<T, Mode, false, true, Pre>(a);
  return backward_range_loop<T, Mode, false, false, Pre>(a);
}

template <typename T, bool Pre>
static inline void backward_range_pre(const BackwardRange<T>& a) {
  switch (a.prior.mode) {
    case 1: return backward_range_mode<T, 1, Pre>(a);
    case 2: return backward_range_mode<T, 2, Pre>(a);
    default: return backward_range_mode<T, 0, Pre>(a);
  }
}

template <typename T>
static inline void backward_range_impl(const BackwardRange<T>& a) {
  if (a.sigma != nullptr && a.sigmoid != nullptr && a.dlog_sigma != nullptr) return backward_range_pre<T, true>(a);
  return backward_range_pre<T, false>(a);
}

// softplus_terms once per element for the multi-sample ops (Forward/BackwardRange's arrays); the
// same function as inside the sampling loops, compiled for the same ISA, so the same values.
template <typename T>
static inline __attribute__((always_inline)) void softplus_tile(int64_t n, const T* __restrict__ rho,
                                                                T* __restrict__ sigma, T* __restrict__ log_sigma,
                                                                T* __restrict__ sigmoid, T* __restrict__ dlog_sigma) {
  for (int64_t i = 0; i < n; ++i) {
    const Softplus<T> sp = softplus_terms(rho[i]);
    sigma[i] = sp.sigma;
    log_sigma[i] = sp.log_sigma;
    sigmoid[i] = sp.sigmoid;
    dlog_sigma[i] = sp.dlog_sigma;
  }
}

template <typename T, bool NonPos>
static inline __attribute__((always_inline)) void softplus_forward_tile(int64_t n, const T* __restrict__ rho,
                                                                        T* __restrict__ sigma,
                                                                        T* __restrict__ log_sigma) {
  for (int64_t i = 0; i < n; ++i) {
    const Softplus<T> sp = softplus_sigma_terms<NonPos>(rho[i]);
    sigma[i] = sp.sigma;
    log_sigma[i] = sp.log_sigma;
  }
}

template <typename T>
static inline void softplus_range_impl(const SoftplusRange<T>& a) {
  const bool grads = a.sigmoid != nullptr && a.dlog_sigma != nullptr;
  for (int64_t i = a.begin; i < a.end; i += kTile) {
    const int64_t n = a.end - i < kTile ? a.end - i : kTile;
    if (grads) {
      softplus_tile<T>(n, a.rho + i, a.sigma + i, a.log_sigma + i, a.sigmoid + i, a.dlog_sigma + i);
    } else if (all_nonpositive(n, a.rho + i)) {
      softplus_forward_tile<T, true>(n, a.rho + i, a.sigma + i, a.log_sigma + i);
    } else {
      softplus_forward_tile<T, false>(n, a.rho + i, a.sigma + i, a.log_sigma + i);
    }
  }
}

// Closed-form KL: the same per-lane accumulators as the forward, no noise.
template <typename T, bool NonPos>
static inline __attribute__((always_inline)) void kl_forward_tile(int64_t n, const T* __restrict__ mu,
                                                                  const T* __restrict__ rho, T* __restrict__ acc,
                                                                  T inv_two_var) {
  for (int64_t i = 0; i < n; ++i) {
    acc[i] += gaussian_kl_term_of(mu[i], softplus_sigma_terms<NonPos>(rho[i]), inv_two_var);
  }
}

template <typename T>
static inline void kl_forward_range_impl(const KlRange<T>& a) {
  T acc[kTile];
  for (int64_t i = 0; i < kTile; ++i) acc[i] = T(0);
  for (int64_t i = a.begin; i < a.end; i += kTile) {
    const int64_t n = a.end - i < kTile ? a.end - i : kTile;
    if (all_nonpositive(n, a.rho + i)) {
      kl_forward_tile<T, true>(n, a.mu + i, a.rho + i, acc, a.inv_two_var);
    } else {
      kl_forward_tile<T, false>(n, a.mu + i, a.rho + i, acc, a.inv_two_var);
    }
  }
  double sum = 0.0;
  for (int64_t i = 0; i < kTile; ++i) sum += static_cast<double>(acc[i]);
  *a.partial = sum;
}

template <typename T>
static inline __attribute__((always_inline)) void kl_backward_tile(int64_t n, const T* __restrict__ mu,
                                                                   const T* __restrict__ rho, T* __restrict__ gmu,
                                                                   T* __restrict__ grho, T g, T inv_var) {
  for (int64_t i = 0; i < n; ++i) gaussian_kl_grads(g, mu[i], rho[i], inv_var, gmu + i, grho + i);
}

template <typename T>
static inline void kl_backward_range_impl(const KlBackwardRange<T>& a) {
  for (int64_t i = a.begin; i < a.end; i += kTile) {
    const int64_t n = a.end - i < kTile ? a.end - i : kTile;
    kl_backward_tile<T>(n, a.mu + i, a.rho + i, a.grad_mu + i, a.grad_rho + i, a.g, a.inv_var);
  }
}

// Local reparameterisation: sigma^2 for the variance GEMM and, optionally, the closed-form KL.
template <typename T, bool WithKl, bool NonPos>
static inline __attribute__((always_inline)) void lrt_forward_tile(int64_t n, const T* __restrict__ mu,
                                                                   const T* __restrict__ rho, T* __restrict__ s2,
                                                                   T* __restrict__ acc, T inv_two_var) {
  for (int64_t i = 0; i < n; ++i) {
    const Softplus<T> sp = softplus_sigma_terms<NonPos>(rho[i]);
    const T sigma2 = sp.sigma * sp.sigma;
    s2[i] = sigma2;
    if (WithKl) acc[i] += (sigma2 + mu[i] * mu[i]) * inv_two_var - sp.log_sigma;
  }
}

template <typename T, bool WithKl>
static inline void lrt_forward_loop(const LrtForwardRange<T>& a) {
  T acc[kTile];
  for (int64_t i = 0; i < kTile; ++i) acc[i] = T(0);
  for (int64_t i = a.begin; i < a.end; i += kTile) {
    const int64_t n = a.end - i < kTile ? a.end - i : kTile;
    if (WithKl && all_nonpositive(n, a.rho + i)) {  // (without the KL no log is taken)
      lrt_forward_tile<T, WithKl, true>(n, a.mu + i, a.rho + i, a.sigma2 + i, acc, a.inv_two_var);
    } else {
      lrt_forward_tile<T, WithKl, false>(n, a.mu + i, a.rho + i, a.sigma2 + i, acc, a.inv_two_var);
    }
  }
  if (WithKl) {
    double sum = 0.0;
    for (int64_t i = 0; i < kTile; ++i) sum += static_cast<double>(acc[i]);
    *a.kl_partial = sum;
  }
}

template <typename T>
static inline void lrt_forward_range_impl(const LrtForwardRange<T>& a) {
  if (a.kl_partial != nullptr) return lrt_forward_loop<T, true>(a);
  return lrt_forward_loop<T, false>(a);
}

// d sigma^2 / d rho = 2 sigma sigmoid(rho); the KL's gradients as in gaussian_kl_grads.
template <typename T>
static inline __attribute__((always_inline)) void lrt_backward_tile(int64_t n, const T* __restrict__ mu,
                                                                    const T* __restrict__ rho, T* __restrict__ gmu,
                                                                    T* __restrict__ grho, T* __restrict__ s2, T g_kl,
                                                                    T inv_var) {
  for (int64_t i = 0; i < n; ++i) {
    const Softplus<T> sp = softplus_terms(rho[i]);
    const T sigma_sigmoid = sp.sigma * sp.sigmoid;
    s2[i] = sp.sigma * sp.sigma;
    grho[i] = grho[i] * T(2) * sigma_sigmoid + g_kl * (sigma_sigmoid * inv_var - sp.dlog_sigma);
    gmu[i] += g_kl * inv_var * mu[i];
  }
}

template <typename T>
static inline void lrt_backward_range_impl(const LrtBackwardRange<T>& a) {
  for (int64_t i = a.begin; i < a.end; i += kTile) {
    const int64_t n = a.end - i < kTile ? a.end - i : kTile;
    lrt_backward_tile<T>(n, a.mu + i, a.rho + i, a.grad_mu + i, a.grad_rho + i, a.sigma2 + i, a.g_kl, a.inv_var);
  }
}

// Local reparameterisation's output noise (LrtNoiseRange): each tile's normals are used as soon as
// they are drawn, so no noise tensor is written.
template <typename T, typename Pass>
static inline __attribute__((always_inline)) void lrt_noise_tiles(const LrtNoiseRange<T>& a, Pass pass) {
  T eps[kTile];
  for (int64_t i = a.begin; i < a.end;) {
    const TileSpan span = tile_span(i, a.end, 0);
    tile_normals<T>(a.seed, a.offset, span.aligned, eps);
    pass(i, span.stop - i, eps + span.skip);
    i = span.stop;
  }
}

template <typename T>
static inline void lrt_output_range_impl(const LrtNoiseRange<T>& a) {
  lrt_noise_tiles(a, [&](int64_t i, int64_t n, const T* __restrict__ eps) {
    const T* __restrict__ mean = a.in + i;
    T* __restrict__ sd = a.std + i;
    T* __restrict__ y = a.out + i;
    for (int64_t j = 0; j < n; ++j) {
      const T s = bx_sqrt(sd[j] < T(0) ? T(0) : sd[j]);  // a NaN variance stays NaN, as with clamp_min
      sd[j] = s;
      y[j] = mean[j] + s * eps[j];
    }
  });
}

template <typename T>
static inline void lrt_noise_grad_range_impl(const LrtNoiseRange<T>& a) {
  lrt_noise_tiles(a, [&](int64_t i, int64_t n, const T* __restrict__ eps) {
    const T* __restrict__ g = a.in + i;
    const T* __restrict__ sd = a.std + i;
    T* __restrict__ u = a.out + i;
    for (int64_t j = 0; j < n; ++j) {
      // sqrt has no derivative at var = 0: 0 there (a subgradient), never inf or NaN
      const bool positive = sd[j] > T(0);
      const T q = g[j] * eps[j] / (positive ? sd[j] : T(1));
      u[j] = positive ? q * T(0.5) : T(0);
    }
  });
}

template <typename T>
static inline void normals_range_impl(uint64_t seed, uint64_t offset, int64_t stream_start, int64_t begin,
                                      int64_t end, T* out) {
  T eps[kTile];
  for (int64_t i = begin; i < end;) {
    const TileSpan span = tile_span(i, end, stream_start);
    tile_normals<T>(seed, offset, span.aligned, eps);
    for (int64_t j = i; j < span.stop; ++j) out[j] = eps[span.skip + (j - i)];
    i = span.stop;
  }
}

}  // namespace cpu_kernel
}  // namespace bayes_ext

// Defines the exported entry points of one ISA variant.
#define BAYES_EXT_DEFINE_RANGE_KERNELS(ISA, T)                                                    \
  namespace bayes_ext {                                                                           \
  namespace cpu_kernel {                                                                          \
  void lrt_forward_range_##ISA(const LrtForwardRange<T>& a) { lrt_forward_range_impl<T>(a); }     \
  void lrt_backward_range_##ISA(const LrtBackwardRange<T>& a) { lrt_backward_range_impl<T>(a); }  \
  void kl_forward_range_##ISA(const KlRange<T>& a) { kl_forward_range_impl<T>(a); }               \
  void kl_backward_range_##ISA(const KlBackwardRange<T>& a) { kl_backward_range_impl<T>(a); }     \
  void forward_range_##ISA(const ForwardRange<T>& a) { forward_range_impl<T>(a); }                \
  void backward_range_##ISA(const BackwardRange<T>& a) { backward_range_impl<T>(a); }             \
  void softplus_range_##ISA(const SoftplusRange<T>& a) { softplus_range_impl<T>(a); }             \
  void lrt_output_range_##ISA(const LrtNoiseRange<T>& a) { lrt_output_range_impl<T>(a); }         \
  void lrt_noise_grad_range_##ISA(const LrtNoiseRange<T>& a) { lrt_noise_grad_range_impl<T>(a); } \
  void normals_range_##ISA(uint64_t seed, uint64_t offset, int64_t stream_start, int64_t begin,   \
                           int64_t end, T* out) {                                                  \
    normals_range_impl<T>(seed, offset, stream_start, begin, end, out);                            \
  }                                                                                               \
  }                                                                                               \
  }
