// Range kernels compiled for AVX2 + FMA; only called when the CPU reports both.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#define BAYES_EXT_ISA_AVAILABLE 1
// GCC does not define __AVX2__ / __AVX512F__ for a target pragma; this tells range_kernels.h.
#define BAYES_EXT_CPU_AVX2 1
#endif
#include "range_kernels.h"

#if defined(BAYES_EXT_ISA_AVAILABLE)
BAYES_EXT_DEFINE_RANGE_KERNELS(avx2, float)
#else
// Not an x86-64 GCC/Clang build: alias the portable kernels so the dispatcher links.
namespace bayes_ext { namespace cpu_kernel {
void lrt_forward_range_avx2(const LrtForwardRange<float>& a) { lrt_forward_range_portable(a); }
void lrt_backward_range_avx2(const LrtBackwardRange<float>& a) { lrt_backward_range_portable(a); }
void kl_forward_range_avx2(const KlRange<float>& a) { kl_forward_range_portable(a); }
void kl_backward_range_avx2(const KlBackwardRange<float>& a) { kl_backward_range_portable(a); }
void forward_range_avx2(const ForwardRange<float>& a) { forward_range_portable(a); }
void backward_range_avx2(const BackwardRange<float>& a) { backward_range_portable(a); }
void softplus_range_avx2(const SoftplusRange<float>& a) { softplus_range_portable(a); }
void lrt_output_range_avx2(const LrtNoiseRange<float>& a) { lrt_output_range_portable(a); }
void lrt_noise_grad_range_avx2(const LrtNoiseRange<float>& a) { lrt_noise_grad_range_portable(a); }
void normals_range_avx2(uint64_t s, uint64_t o, int64_t st, int64_t b, int64_t e, float* out) {
  normals_range_portable(s, o, st, b, e, out);
}
}}
#endif
