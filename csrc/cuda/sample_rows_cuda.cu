// CUDA implementation of the row-sampling ops (Bayesian embedding lookups); see
// cpu/sample_rows_cpu.cpp for the semantics. Each thread owns one Philox block (4 stream elements)
// of one looked-up row, so the noise is the whole table's whatever the launch geometry. The
// backward sorts the indices (stable) and sums the gradients of each distinct row in their order
// of appearance inside one thread: deterministic, no atomics.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "bayes_ext/op_checks.h"
#include "bayes_ext/posterior_math.h"
#include "launch.cuh"
#include "seed_arg.cuh"

namespace bayes_ext {
namespace {


// Philox blocks a row of `dim` elements can span: its first block may start mid-block.
__host__ __device__ __forceinline__ int64_t blocks_per_row(int64_t dim) { return (dim + 3) / 4 + 1; }

int64_t grid_for_items(int64_t items) { return capped_grid(items, 65535); }

template <typename T>
__global__ void rows_forward_kernel(const T* __restrict__ mu, const T* __restrict__ rho,
                                    const int64_t* __restrict__ idx, T* __restrict__ w, int64_t n, int64_t num_rows,
                                    int64_t dim, SeedArg seed_arg, uint64_t offset) {
  const uint64_t seed = load_seed(seed_arg);
  const int64_t per_row = blocks_per_row(dim);
  const int64_t items = n * per_row;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < items;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = t / per_row, j = t % per_row;
    const int64_t r = idx[k];
    CUDA_KERNEL_ASSERT(r >= 0 && r < num_rows);
    const int64_t row_start = r * dim;
    const int64_t b = row_start / 4 + j;
    if (4 * b >= row_start + dim) continue;
    T eps[4];
    block_normals<T>(seed, offset, static_cast<uint64_t>(b), eps);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t i = 4 * b + lane - row_start;  // column of stream element 4b + lane
      if (i >= 0 && i < dim) {
        const Softplus<T> sp = softplus_terms(rho[row_start + i]);
        w[k * dim + i] = mu[row_start + i] + sp.sigma * eps[lane];
      }
    }
  }
}

// One item per (distinct row u, Philox block j of that row). Accumulate: add to the gradient
// buffers instead of writing them (one thread per element, so no atomics).
template <typename T, bool Accumulate>
__global__ void rows_backward_kernel(const T* __restrict__ grad_rows, const T* __restrict__ mu,
                                     const T* __restrict__ rho, const int64_t* __restrict__ sorted_idx,
                                     const int64_t* __restrict__ perm, const int64_t* __restrict__ group_start,
                                     const int64_t* __restrict__ group_count, T* __restrict__ grad_mu,
                                     T* __restrict__ grad_rho, int64_t groups, int64_t num_rows, int64_t dim,
                                     SeedArg seed_arg, uint64_t offset) {
  const uint64_t seed = load_seed(seed_arg);
  const int64_t per_row = blocks_per_row(dim);
  const int64_t items = groups * per_row;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < items;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t u = t / per_row, j = t % per_row;
    const int64_t first = group_start[u], count = group_count[u];
    const int64_t r = sorted_idx[first];
    CUDA_KERNEL_ASSERT(r >= 0 && r < num_rows);
    const int64_t row_start = r * dim;
    const int64_t b = row_start / 4 + j;
    if (4 * b >= row_start + dim) continue;
    T eps[4];
    block_normals<T>(seed, offset, static_cast<uint64_t>(b), eps);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t i = 4 * b + lane - row_start;
      if (i >= 0 && i < dim) {
        T g = T(0);
        for (int64_t m = first; m < first + count; ++m) g += grad_rows[perm[m] * dim + i];
        const Softplus<T> sp = softplus_terms(rho[row_start + i]);
        if (Accumulate) {
          grad_mu[row_start + i] += g;
          grad_rho[row_start + i] += g * eps[lane] * sp.sigmoid;
        } else {
          grad_mu[row_start + i] = g;
          grad_rho[row_start + i] = g * eps[lane] * sp.sigmoid;
        }
      }
    }
  }
}

at::Tensor sample_rows_cuda(const at::Tensor& mu_in, const at::Tensor& rho_in, const at::Tensor& indices,
                            const at::Tensor& seed, int64_t offset) {
  check_row_args(mu_in, rho_in, indices, seed, offset);
  check_cuda(mu_in);
  const c10::cuda::CUDAGuard guard(mu_in.device());
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const at::Tensor idx = indices.contiguous();
  const int64_t num_rows = mu.size(0), dim = mu.size(1), n = idx.numel();
  at::Tensor w = at::empty(row_shape(indices, dim), mu.options());
  if (n == 0 || dim == 0) return w;
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "sample_rows_cuda", [&] {
    rows_forward_kernel<scalar_t><<<grid_for_items(n * blocks_per_row(dim)), kThreads, 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
        mu.data_ptr<scalar_t>(), rho.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), w.data_ptr<scalar_t>(), n,
        num_rows, dim, make_seed_arg(seed), static_cast<uint64_t>(offset));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return w;
}

// Writes (accumulate = false: every row not looked up must already be zero) or adds the gradients
// of sample_rows into grad_mu / grad_rho.
void rows_backward(at::Tensor& grad_mu, at::Tensor& grad_rho, const at::Tensor& grad_rows_in, const at::Tensor& mu_in,
                   const at::Tensor& rho_in, const at::Tensor& indices, const at::Tensor& seed, int64_t offset,
                   bool accumulate) {
  const int64_t num_rows = mu_in.size(0), dim = mu_in.size(1);
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const at::Tensor idx = indices.contiguous().reshape({-1});
  const int64_t n = idx.numel();
  if (n == 0 || dim == 0) return;
  const at::Tensor grad_rows = grad_rows_in.contiguous().reshape({n, dim});
  const auto sorted = at::sort(idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_idx = std::get<0>(sorted).contiguous();
  const at::Tensor perm = std::get<1>(sorted).contiguous();
  const auto uniq = at::unique_consecutive(sorted_idx, /*return_inverse=*/false, /*return_counts=*/true);
  const at::Tensor counts = std::get<2>(uniq).contiguous();
  const at::Tensor starts = (at::cumsum(counts, 0) - counts).contiguous();
  const int64_t groups = counts.numel();
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "sample_rows_backward_cuda", [&] {
    auto kernel = accumulate ? rows_backward_kernel<scalar_t, true> : rows_backward_kernel<scalar_t, false>;
    kernel<<<grid_for_items(groups * blocks_per_row(dim)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad_rows.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(), rho.data_ptr<scalar_t>(),
        sorted_idx.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
        counts.data_ptr<int64_t>(), grad_mu.data_ptr<scalar_t>(), grad_rho.data_ptr<scalar_t>(), groups, num_rows,
        dim, make_seed_arg(seed), static_cast<uint64_t>(offset));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> sample_rows_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& mu,
                                                             const at::Tensor& rho, const at::Tensor& indices,
                                                             const at::Tensor& seed, int64_t offset) {
  check_row_args(mu, rho, indices, seed, offset);
  check_cuda(mu);
  check_grad_rows(grad_rows, mu, indices);
  const c10::cuda::CUDAGuard guard(mu.device());
  at::Tensor grad_mu = at::zeros(mu.sizes(), mu.options());
  at::Tensor grad_rho = at::zeros(mu.sizes(), mu.options());
  rows_backward(grad_mu, grad_rho, grad_rows, mu, rho, indices, seed, offset, /*accumulate=*/false);
  return {grad_mu, grad_rho};
}

void sample_rows_backward_add_cuda(at::Tensor& grad_mu, at::Tensor& grad_rho, const at::Tensor& grad_rows,
                                   const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& indices,
                                   const at::Tensor& seed, int64_t offset) {
  check_row_args(mu, rho, indices, seed, offset);
  check_cuda(mu);
  check_grad_rows(grad_rows, mu, indices);
  check_accumulator(grad_mu, mu, "grad_mu");
  check_accumulator(grad_rho, mu, "grad_rho");
  const c10::cuda::CUDAGuard guard(mu.device());
  rows_backward(grad_mu, grad_rho, grad_rows, mu, rho, indices, seed, offset, /*accumulate=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(bayes_ext, CUDA, m) {
  m.impl("sample_rows", &sample_rows_cuda);
  m.impl("sample_rows_backward", &sample_rows_backward_cuda);
  m.impl("sample_rows_backward_add_", &sample_rows_backward_add_cuda);
}

}  // namespace bayes_ext
