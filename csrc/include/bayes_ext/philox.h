// Philox4x32-10 counter-based generator and the Box-Muller mapping bayes_ext uses, shared by the
// CPU kernels, the CUDA kernels and the C++ tests. The stream layout is specified in
// docs/design.md; bayes_ext/_philox.py is the same stream in torch ops.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BAYES_HOST_DEVICE __host__ __device__ __forceinline__
#else
// static: every translation unit keeps its own copy, so kernels compiled for AVX2 or AVX-512 can
// never lend their instructions to the portable build through a merged inline definition.
#define BAYES_HOST_DEVICE static inline
#endif

namespace bayes_ext {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key increments (golden ratio, sqrt(3) - 1)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct PhiloxOut {
  uint32_t x[4];
};

// One 10-round Philox4x32 block. Written with plain 64-bit products so compilers turn it into
// vpmuludq on x86 and mul.wide / mul.hi on GPUs.
BAYES_HOST_DEVICE PhiloxOut philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                          uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  PhiloxOut out;
  out.x[0] = c0;
  out.x[1] = c1;
  out.x[2] = c2;
  out.x[3] = c3;
  return out;
}

// The four words for counter block `block` (= element index / 4) of stream (seed, offset).
BAYES_HOST_DEVICE PhiloxOut philox_block(uint64_t seed, uint64_t offset, uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                       static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Radius uniform in [2^-24, 1 - 2^-24]: odd multiples of 2^-24, exact in fp32, never 0 (log-safe).
template <typename T>
BAYES_HOST_DEVICE T radius_uniform(uint32_t x) {
  return static_cast<T>(static_cast<int32_t>(((x >> 9) << 1) | 1u)) * static_cast<T>(5.9604644775390625e-08);
}

// Angle fraction in [0, 1): 24-bit multiples of 2^-24, exact in fp32.
template <typename T>
BAYES_HOST_DEVICE T angle_uniform(uint32_t x) {
  return static_cast<T>(static_cast<int32_t>(x >> 8)) * static_cast<T>(5.9604644775390625e-08);
}

}  // namespace bayes_ext
