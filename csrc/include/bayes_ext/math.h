// Scalar math used by the kernels, one definition per platform:
// - CUDA device code: the CUDA math library (accurate to a few ulp, sincospi for exact turns),
//   except log1p on [0, 1], a polynomial shared with the host;
// - host float: branch-free Cephes-style polynomials accurate to ~2 ulp on the ranges the kernels
//   use, written so that GCC vectorises loops that call them (no libm calls, selects not branches);
// - host double: libm (double is for gradcheck and reference runs, not speed).
#pragma once

#include <cstdint>
#include <cmath>

#include "bayes_ext/philox.h"

namespace bayes_ext {

// log(1 + t) for t in [0, 1] (the only range the kernels use: t = exp(-|x|)): t + t^2 r(t) with r a
// degree-9 polynomial fit to (log1p(t) - t) / t^2 on [0, 1] (least squares on Chebyshev nodes;
// within 1.2 ulp of log1p with FMA, 2 ulp without: csrc/tests/test_host_math.cpp). No range
// reduction, no select, no branch: the host and the GPU both use it.
// - CPU: a vectorised exp + log1p loop took 0.51 ns per element instead of 0.67 with the reduced
//   Cephes log it replaces (one AVX-512 thread); sample_weight with the mixture prior -7 to -9%
//   (bench/results/log1p_polynomial_cpu_2c-intel-xeon.md).
// - GPU: CUDA's log1pf handles every float and cost the compute-bound sampling kernel 9-13%
//   (bench/results/cuda_sample_kernel_variants_nvidia-h200.md).
BAYES_HOST_DEVICE float log1p_unit_interval(float t) {
  float r = 2.873899272e-03f;
  r = r * t - 1.751231658e-02f;
  r = r * t + 4.993132856e-02f;
  r = r * t - 9.202979391e-02f;
  r = r * t + 1.307133876e-01f;
  r = r * t - 1.637851299e-01f;
  r = r * t + 1.995935712e-01f;
  r = r * t - 2.499702425e-01f;
  r = r * t + 3.333324757e-01f;
  r = r * t - 4.999999959e-01f;
  return t + (t * t) * r;
}

#if !defined(__CUDA_ARCH__)
static inline float bits_as_float(uint32_t b) {
  float f;
  __builtin_memcpy(&f, &b, sizeof f);
  return f;
}
static inline uint32_t float_as_bits(float f) {
  uint32_t b;
  __builtin_memcpy(&b, &f, sizeof b);
  return b;
}

// Cephes' logf polynomial: log(1 + m) + e log 2 for m in [sqrt(1/2) - 1, sqrt(2) - 1].
static inline float host_log_reduced(float m, float e) {
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

// log (Cephes logf) of a positive, normal, finite x. The reduction 1 + m = x / 2^e with
// 1 + m in [sqrt(1/2), sqrt(2)) is done in the integers (musl's): adding 1 - sqrt(1/2) in the bit
// pattern carries into the exponent exactly when the mantissa is >= sqrt(2). A float select
// between m and 2m there made GCC evaluate the polynomial for both sides (2x the instructions).
static inline float host_log_positive(float x) {
  const uint32_t shifted = float_as_bits(x) + (0x3F800000u - 0x3F3504F3u);
  const float e = static_cast<float>(static_cast<int32_t>(shifted >> 23) - 0x7F);
  const float m = bits_as_float((shifted & 0x007FFFFFu) + 0x3F3504F3u) - 1.0f;
  return host_log_reduced(m, e);
}

// log for every float: denormals are read as tiny normals (callers never pass them: uniforms
// are >= 2^-24 and log sigma switches to rho before sigma gets that small). NaN, negative values,
// 0 and inf give NaN, NaN, -inf and inf like libm, with selects.
static inline float host_logf(float x) {
  const float r = host_log_positive(x);
  const float special = x == 0.0f ? -__builtin_inff() : (x > 0.0f ? x : __builtin_nanf(""));
  return (x > 0.0f && x <= 3.40282347e+38f) ? r : special;
}

// exp for x <= 88; returns exactly 0 below -87.3 instead of producing denormals; NaN stays NaN.
static inline float host_expf(float x) {
  // Clamped so the float -> int conversion below is always defined (NaN maps to 0 here and is
  // restored at the end).
  const float xc = x >= -87.3f ? (x <= 88.0f ? x : 88.0f) : (x < -87.3f ? -87.3f : 0.0f);
  // floor(xc * log2(e) + 0.5) via truncation of a positive number (vectorises without SSE4.1).
  const int32_t n = static_cast<int32_t>(xc * 1.44269504088896341f + 128.5f) - 128;
  const float fn = static_cast<float>(n);
  const float r = xc - fn * 0.693359375f + fn * 2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const float scaled = y * bits_as_float(static_cast<uint32_t>(n + 127) << 23);
  return x < -87.3f ? 0.0f : (x == x ? scaled : x);
}

// sin(2 pi v) and cos(2 pi v) for v in [0, 1): the reduction to quarter turns is exact in fp32.
static inline void host_sincos_2pi(float v, float* s, float* c) {
  const int32_t q = static_cast<int32_t>(4.0f * v + 0.5f);  // nearest quarter turn, 0..4
  const float x = (4.0f * v - static_cast<float>(q)) * 1.57079632679489662f;  // [-pi/4, pi/4]
  const float z = x * x;
  const float sin_x = x + x * z * ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f);
  const float cos_x = 1.0f - 0.5f * z +
                      z * z * ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f);
  const int32_t quadrant = q & 3;
  const bool swap = (quadrant & 1) != 0;
  const float s0 = swap ? cos_x : sin_x;
  const float c0 = swap ? sin_x : cos_x;
  *s = (quadrant >= 2) ? -s0 : s0;
  *c = (quadrant == 1 || quadrant == 2) ? -c0 : c0;
}
#endif  // !__CUDA_ARCH__

BAYES_HOST_DEVICE float bx_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return host_expf(x);
#endif
}
BAYES_HOST_DEVICE double bx_exp(double x) { return ::exp(x); }

BAYES_HOST_DEVICE float bx_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return host_logf(x);
#endif
}
BAYES_HOST_DEVICE double bx_log(double x) { return ::log(x); }

// log of a positive, normal, finite x (anything else gives an unspecified value on the host):
// the Box-Muller radius's uniform and a sigma known to be in range skip bx_log's special cases.
BAYES_HOST_DEVICE float bx_log_positive(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return host_log_positive(x);
#endif
}
BAYES_HOST_DEVICE double bx_log_positive(double x) { return ::log(x); }

// log(1 + x) for x in [0, 1] only (float: the polynomial above, on the host and the GPU alike).
BAYES_HOST_DEVICE float bx_log1p(float x) { return log1p_unit_interval(x); }
BAYES_HOST_DEVICE double bx_log1p(double x) { return ::log1p(x); }

BAYES_HOST_DEVICE float bx_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return __builtin_sqrtf(x);
#endif
}
BAYES_HOST_DEVICE double bx_sqrt(double x) { return ::sqrt(x); }

BAYES_HOST_DEVICE void bx_sincos_2pi(float v, float* s, float* c) {
#if defined(__CUDA_ARCH__)
  sincospif(2.0f * v, s, c);
#else
  host_sincos_2pi(v, s, c);
#endif
}
BAYES_HOST_DEVICE void bx_sincos_2pi(double v, double* s, double* c) {
#if defined(__CUDA_ARCH__)
  sincospi(2.0 * v, s, c);
#else
  *s = ::sin(6.283185307179586477 * v);
  *c = ::cos(6.283185307179586477 * v);
#endif
}

}  // namespace bayes_ext
