// Sum of one value per thread over a CUDA block (warp shuffles, then one warp over the warps'
// sums); thread 0 receives the block's total. `shared` holds 32 values. Shared by the
// kernels that reduce log q / log p or the KL into per-block partials.
#pragma once

namespace bayes_ext {

template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : T(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;
}

}  // namespace bayes_ext
