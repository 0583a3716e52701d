// Run-time choice of the CPU range kernels (portable / AVX2 / AVX-512) from the CPU's features,
// shared by the ops' CPU implementations (sample_weight_cpu.cpp, sample_rows_cpu.cpp).
// BAYES_EXT_CPU_ISA=portable|avx2|avx512 caps the choice (for tests and benchmarks).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "range_kernels_api.h"

namespace bayes_ext {
namespace cpu_kernel {

struct FloatKernels {
  void (*lrt_forward)(const LrtForwardRange<float>&);
  void (*lrt_backward)(const LrtBackwardRange<float>&);
  void (*kl_forward)(const KlRange<float>&);
  void (*kl_backward)(const KlBackwardRange<float>&);
  void (*forward)(const ForwardRange<float>&);
  void (*backward)(const BackwardRange<float>&);
  void (*softplus)(const SoftplusRange<float>&);
  void (*lrt_output)(const LrtNoiseRange<float>&);
  void (*lrt_noise_grad)(const LrtNoiseRange<float>&);
  void (*normals)(uint64_t, uint64_t, int64_t, int64_t, int64_t, float*);
  const char* name;
};

inline bool cpu_has(const char* feature) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (std::strcmp(feature, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::strcmp(feature, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
#else
  (void)feature;
#endif
  return false;
}

inline FloatKernels choose_float_kernels() {
  const FloatKernels portable{lrt_forward_range_portable, lrt_backward_range_portable, kl_forward_range_portable,
                              kl_backward_range_portable, forward_range_portable, backward_range_portable,
                              softplus_range_portable, lrt_output_range_portable, lrt_noise_grad_range_portable,
                              normals_range_portable, "portable"};
  const FloatKernels avx2{lrt_forward_range_avx2, lrt_backward_range_avx2, kl_forward_range_avx2,
                          kl_backward_range_avx2, forward_range_avx2, backward_range_avx2, softplus_range_avx2,
                          lrt_output_range_avx2, lrt_noise_grad_range_avx2, normals_range_avx2, "avx2"};
  const FloatKernels avx512{lrt_forward_range_avx512, lrt_backward_range_avx512, kl_forward_range_avx512,
                            kl_backward_range_avx512, forward_range_avx512, backward_range_avx512,
                            softplus_range_avx512, lrt_output_range_avx512, lrt_noise_grad_range_avx512,
                            normals_range_avx512, "avx512"};
  const char* env = std::getenv("BAYES_EXT_CPU_ISA");
  const std::string cap = env == nullptr ? "avx512" : env;
  TORCH_CHECK_VALUE(cap == "portable" || cap == "avx2" || cap == "avx512",
                    "BAYES_EXT_CPU_ISA must be portable, avx2 or avx512, got ", cap);
  if (cap == "avx512" && cpu_has("avx512")) return avx512;
  if ((cap == "avx512" || cap == "avx2") && cpu_has("avx2")) return avx2;
  return portable;
}

// Chosen once per process (an inline function's static is shared by every translation unit).
inline const FloatKernels& float_kernels() {
  static const FloatKernels kernels = choose_float_kernels();
  return kernels;
}

inline void run_lrt_forward(const LrtForwardRange<float>& a) { float_kernels().lrt_forward(a); }
inline void run_lrt_forward(const LrtForwardRange<double>& a) { lrt_forward_range_portable(a); }
inline void run_lrt_backward(const LrtBackwardRange<float>& a) { float_kernels().lrt_backward(a); }
inline void run_lrt_backward(const LrtBackwardRange<double>& a) { lrt_backward_range_portable(a); }
inline void run_kl_forward(const KlRange<float>& a) { float_kernels().kl_forward(a); }
inline void run_kl_forward(const KlRange<double>& a) { kl_forward_range_portable(a); }
inline void run_kl_backward(const KlBackwardRange<float>& a) { float_kernels().kl_backward(a); }
inline void run_kl_backward(const KlBackwardRange<double>& a) { kl_backward_range_portable(a); }
inline void run_forward(const ForwardRange<float>& a) { float_kernels().forward(a); }
inline void run_forward(const ForwardRange<double>& a) { forward_range_portable(a); }
inline void run_backward(const BackwardRange<float>& a) { float_kernels().backward(a); }
inline void run_backward(const BackwardRange<double>& a) { backward_range_portable(a); }
inline void run_softplus(const SoftplusRange<float>& a) { float_kernels().softplus(a); }
inline void run_softplus(const SoftplusRange<double>& a) { softplus_range_portable(a); }
inline void run_lrt_output(const LrtNoiseRange<float>& a) { float_kernels().lrt_output(a); }
inline void run_lrt_output(const LrtNoiseRange<double>& a) { lrt_output_range_portable(a); }
inline void run_lrt_noise_grad(const LrtNoiseRange<float>& a) { float_kernels().lrt_noise_grad(a); }
inline void run_lrt_noise_grad(const LrtNoiseRange<double>& a) { lrt_noise_grad_range_portable(a); }
inline void run_normals(uint64_t s, uint64_t o, int64_t st, int64_t b, int64_t e, float* out) {
  float_kernels().normals(s, o, st, b, e, out);
}
inline void run_normals(uint64_t s, uint64_t o, int64_t st, int64_t b, int64_t e, double* out) {
  normals_range_portable(s, o, st, b, e, out);
}

}  // namespace cpu_kernel
}  // namespace bayes_ext
