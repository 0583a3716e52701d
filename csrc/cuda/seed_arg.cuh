// The seed argument of the CUDA kernels: a seed tensor on the device is read inside the kernel
// (so CUDA graph replays see a freshly drawn seed), a CPU seed is passed by value.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "bayes_ext/op_checks.h"

namespace bayes_ext {

struct SeedArg {
  const int64_t* device_ptr;  // non-null: read on the device
  uint64_t host_value;
};

__device__ __forceinline__ uint64_t load_seed(const SeedArg& s) {
  return s.device_ptr != nullptr ? static_cast<uint64_t>(*s.device_ptr) : s.host_value;
}

inline SeedArg make_seed_arg(const at::Tensor& seed) {
  if (seed.device().is_cuda()) return {seed.data_ptr<int64_t>(), 0};
  return {nullptr, seed_value(seed)};
}

}  // namespace bayes_ext
