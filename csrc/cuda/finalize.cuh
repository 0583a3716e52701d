// The last step of the reducing ops: sum the per-CUDA-block partials (rows of `width` doubles) in a
// fixed order, add a constant, cast, and write 0-dim results. One launch and no memset (every block
// of the main kernel writes its row), where ATen's zeros + sum + add + casts took five: launches,
// not bytes, are what these small steps cost in a model with dozens of layers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include "block_sum.cuh"
#include "launch.cuh"

namespace bayes_ext {

// Column c of partials rows [row0, row0 + rows) summed in a fixed order; thread 0 receives it.
__device__ __forceinline__ double sum_partials_column(const double* __restrict__ partials, int64_t row0, int64_t rows,
                                                     int width, int c, double* shared) {
  double v = 0.0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) v += partials[(row0 + r) * width + c];
  return block_sum(v, shared);
}

template <typename T>
__global__ void finalize_partials_kernel(const double* __restrict__ partials, int64_t rows, int width, double add0,
                                         double add1, T* __restrict__ out0, T* __restrict__ out1) {
  __shared__ double shared[32];
  for (int c = 0; c < width; ++c) {
    const double v = sum_partials_column(partials, 0, rows, width, c, shared);
    if (threadIdx.x == 0) *(c == 0 ? out0 : out1) = static_cast<T>(v + (c == 0 ? add0 : add1));
  }
}

// Empty partials for `grid` blocks; pass rows = 0 to finalize_partials when the main kernel did not run.
inline at::Tensor partials_for(int64_t grid, int width, const at::Tensor& like) {
  return at::empty({grid, width}, like.options().dtype(at::kDouble));
}

// sums[c] + add[c] in like's dtype, as 0-dim tensors (width 1: only the first).
inline std::pair<at::Tensor, at::Tensor> finalize_partials(const at::Tensor& partials, int64_t rows, double add0,
                                                           double add1, const at::Tensor& like) {
  const int width = static_cast<int>(partials.size(1));
  at::Tensor out0 = at::empty({}, like.options());
  at::Tensor out1 = width > 1 ? at::empty({}, like.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "finalize_partials", [&] {
    finalize_partials_kernel<scalar_t><<<1, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        partials.data_ptr<double>(), rows, width, add0, add1, out0.data_ptr<scalar_t>(),
        width > 1 ? out1.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out0, out1};
}

// Two tensors' sums from one launch (the first rows0 rows of partials are the first tensor's blocks,
// the next rows1 the second's): each finalised as finalize_partials would (its own fixed-order sum
// plus its own constant, cast to T), then added in T, so the result is bit for bit the two
// finalize_partials results added by torch.
template <typename T>
__global__ void finalize_pair_partials_kernel(const double* __restrict__ partials, int64_t rows0, int64_t rows1,
                                              double add0_first, double add0_second, T* __restrict__ out0,
                                              T* __restrict__ out1) {
  __shared__ double shared[32];
  for (int c = 0; c < 2; ++c) {
    const double first = sum_partials_column(partials, 0, rows0, 2, c, shared);
    const double second = sum_partials_column(partials, rows0, rows1, 2, c, shared);
    if (threadIdx.x == 0) {
      *(c == 0 ? out0 : out1) = static_cast<T>(first + (c == 0 ? add0_first : 0.0)) +
                                static_cast<T>(second + (c == 0 ? add0_second : 0.0));
    }
  }
}

// (column 0, column 1) of width-2 partials as two tensors' sums added (see the kernel); column 0
// gets add0_first / add0_second, column 1 nothing.
inline std::pair<at::Tensor, at::Tensor> finalize_pair_partials(const at::Tensor& partials, int64_t rows0,
                                                                int64_t rows1, double add0_first, double add0_second,
                                                                const at::Tensor& like) {
  at::Tensor out0 = at::empty({}, like.options()), out1 = at::empty({}, like.options());
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "finalize_pair_partials", [&] {
    finalize_pair_partials_kernel<scalar_t><<<1, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        partials.data_ptr<double>(), rows0, rows1, add0_first, add0_second, out0.data_ptr<scalar_t>(),
        out1.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out0, out1};
}

}  // namespace bayes_ext
