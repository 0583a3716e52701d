// Entry points of the CPU range kernels, one set per instruction-set variant. The variants are
// separate translation units (range_kernels_*.cpp) compiled for their ISA; sample_weight_cpu.cpp
// picks one at run time from the CPU's features.
#pragma once

#include <cstdint>

#include "bayes_ext/posterior_math.h"

namespace bayes_ext {
namespace cpu_kernel {

// Array element i (pointer index) draws stream element stream_start + i, so a slice of a larger
// tensor (a block of rows, looked-up embedding rows) gets the noise it has in the whole tensor.

// Sample w for elements [begin, end) and write the partial sums of the log q and log p terms
// (without log q's constant -n log sqrt(2 pi), which the caller adds once). w may be null: the
// sums only.
template <typename T>
struct ForwardRange {
  const T* mu;
  const T* rho;
  T* w;
  int64_t begin, end, stream_start;
  uint64_t seed, offset;
  ScaleMixturePrior<T> prior;
  double* log_q_partial;
  double* log_p_partial;
  // Optional softplus_range results for the same array elements (the multi-sample ops draw N
  // samples of one rho: its sigma and log sigma are computed once, not N times).
  const T* sigma = nullptr;
  const T* log_sigma = nullptr;
  // w receives the noise w - mu (Flipout's dW), rounded as that subtraction; log q / log p stay w's.
  bool noise_only = false;
};

// Gradients for elements [begin, end); grad_w may be null (treated as zero); w, if not null,
// receives the regenerated sample.
template <typename T>
struct BackwardRange {
  const T* grad_w;
  T grad_log_q, grad_log_p;
  const T* mu;
  const T* rho;
  T* grad_mu;
  T* grad_rho;
  T* w;
  int64_t begin, end, stream_start;
  uint64_t seed, offset;
  ScaleMixturePrior<T> prior;
  // Optional softplus_range results for the same array elements, as in ForwardRange.
  const T* sigma = nullptr;
  const T* sigmoid = nullptr;
  const T* dlog_sigma = nullptr;
  // grad_w is the gradient of the noise w - mu: it reaches grad_rho but not grad_mu, and w receives
  // w - mu (ForwardRange::noise_only). grad_mu must not share memory with grad_w.
  bool noise_only = false;
};

// softplus_terms of rho over [begin, end), written to the arrays that are not null.
template <typename T>
struct SoftplusRange {
  const T* rho;
  T* sigma;
  T* log_sigma;
  T* sigmoid;
  T* dlog_sigma;
  int64_t begin, end;
};

// Closed-form Gaussian KL over elements [begin, end): *partial = sum of gaussian_kl_term.
template <typename T>
struct KlRange {
  const T* mu;
  const T* rho;
  int64_t begin, end;
  T inv_two_var;
  double* partial;
};

// Its gradients times g for elements [begin, end), written to grad_mu / grad_rho.
template <typename T>
struct KlBackwardRange {
  const T* mu;
  const T* rho;
  T* grad_mu;
  T* grad_rho;
  int64_t begin, end;
  T g, inv_var;
};

// Local reparameterisation's weight pass over [begin, end): sigma2 = softplus(rho)^2 and, when
// kl_partial is not null, *kl_partial = sum of gaussian_kl_term (the closed-form KL, no constant).
template <typename T>
struct LrtForwardRange {
  const T* mu;
  const T* rho;
  T* sigma2;
  int64_t begin, end;
  T inv_two_var;
  double* kl_partial;
};

// Its backward, in place: on entry grad_mu = dL/dmu and grad_rho = dL/dsigma2 from the data; on
// exit both hold the full gradients, g_kl times the KL's included. sigma2 is written again (the
// input gradient needs it; recomputing it here is free, saving it would cost a weight's memory).
template <typename T>
struct LrtBackwardRange {
  const T* mu;
  const T* rho;
  T* grad_mu;
  T* grad_rho;
  T* sigma2;
  int64_t begin, end;
  T g_kl, inv_var;
};

// Local reparameterisation's output noise over array elements [begin, end), element i drawing
// stream element i of (seed, offset) (philox_normal's eps of the whole tensor). Forward
// (lrt_output): std[i] = sqrt(max(std[i], 0)) in place (var in, std out) and out[i] = in[i] +
// std[i] * eps_i (in = the mean). Backward (lrt_noise_grad, std only read): out[i] = in[i] * eps_i /
// std[i] / 2 (in = dL/dy), 0 where std[i] is not > 0.
template <typename T>
struct LrtNoiseRange {
  const T* in;
  T* std;
  T* out;
  int64_t begin, end;
  uint64_t seed, offset;
};

#define BAYES_EXT_DECLARE_RANGE_KERNELS(ISA, T)                                                \
  void lrt_forward_range_##ISA(const LrtForwardRange<T>& a);                                   \
  void lrt_backward_range_##ISA(const LrtBackwardRange<T>& a);                                 \
  void kl_forward_range_##ISA(const KlRange<T>& a);                                            \
  void kl_backward_range_##ISA(const KlBackwardRange<T>& a);                                   \
  void forward_range_##ISA(const ForwardRange<T>& a);                                          \
  void backward_range_##ISA(const BackwardRange<T>& a);                                        \
  void softplus_range_##ISA(const SoftplusRange<T>& a);                                        \
  void lrt_output_range_##ISA(const LrtNoiseRange<T>& a);                                      \
  void lrt_noise_grad_range_##ISA(const LrtNoiseRange<T>& a);                                  \
  void normals_range_##ISA(uint64_t seed, uint64_t offset, int64_t stream_start, int64_t begin, int64_t end,  \
                           T* out);

// Portable builds exist for float and double (overloaded); AVX2 / AVX-512 builds for float only.
BAYES_EXT_DECLARE_RANGE_KERNELS(portable, float)
BAYES_EXT_DECLARE_RANGE_KERNELS(portable, double)
BAYES_EXT_DECLARE_RANGE_KERNELS(avx2, float)
BAYES_EXT_DECLARE_RANGE_KERNELS(avx512, float)

}  // namespace cpu_kernel
}  // namespace bayes_ext
