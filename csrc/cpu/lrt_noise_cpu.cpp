// CPU implementation of local reparameterisation's output-noise ops, the batch-sized ends of the
// LRT layers: y = mean + sqrt(max(var, 0)) * eps forward, dL/dvar = g eps / (2 std) backward. The
// normals are drawn a tile at a time and used at once, so neither op writes a noise tensor; each
// replaces four (forward) or eight (backward) eager passes and their temporaries. A seed of N values
// gives N groups of elements their own streams (csrc/ops.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "bayes_ext/op_checks.h"
#include "chunks.h"
#include "kernel_dispatch.h"
#include "range_kernels_api.h"

namespace bayes_ext {
namespace {

using namespace cpu_kernel;

// run(LrtNoiseRange) over every chunk of `std`'s n elements, chunks spread over the threads. With N
// seeds the elements form N equal groups, each its own stream from its own element 0.
template <typename scalar_t, typename Run>
void over_chunks(const at::Tensor& in, at::Tensor& std, at::Tensor& out, const at::Tensor& seed, int64_t offset,
                 Run run) {
  const at::Tensor seeds = seed.reshape({-1}).contiguous();
  const int64_t groups = seeds.numel(), len = std.numel() / groups, per_group = num_chunks(len);
  const int64_t* seed_p = seeds.data_ptr<int64_t>();
  const scalar_t* in_p = in.data_ptr<scalar_t>();
  scalar_t* std_p = std.data_ptr<scalar_t>();
  scalar_t* out_p = out.data_ptr<scalar_t>();
  at::parallel_for(0, groups * per_group, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t g = k / per_group, c = k % per_group, base = g * len;
      run(LrtNoiseRange<scalar_t>{in_p + base, std_p + base, out_p + base, c * kChunk, std::min(len, (c + 1) * kChunk),
                                  static_cast<uint64_t>(seed_p[g]), static_cast<uint64_t>(offset)});
    }
  });
}

at::Tensor lrt_output_cpu(at::Tensor& var, const at::Tensor& mean_in, const at::Tensor& seed, int64_t offset) {
  check_lrt_noise_args(var, "var", mean_in, "mean");
  check_cpu(var, "var");
  TORCH_CHECK_VALUE(var.is_contiguous(), "var must be contiguous (it is overwritten with std)");
  check_seed_groups(seed, var, "var");
  check_offset(offset);
  const at::Tensor mean = mean_in.contiguous();
  at::Tensor y = at::empty(var.sizes(), var.options());
  AT_DISPATCH_FLOATING_TYPES(var.scalar_type(), "lrt_output_cpu", [&] {
    over_chunks<scalar_t>(mean, var, y, seed, offset, [](const LrtNoiseRange<scalar_t>& a) { run_lrt_output(a); });
  });
  return y;
}

at::Tensor lrt_noise_grad_cpu(const at::Tensor& grad_in, const at::Tensor& std_in, const at::Tensor& seed,
                              int64_t offset) {
  check_lrt_noise_args(std_in, "std", grad_in, "grad");
  check_cpu(std_in, "std");
  check_seed_groups(seed, std_in, "std");
  check_offset(offset);
  const at::Tensor grad = grad_in.contiguous();  // dL/dy of a sum is an expanded scalar
  at::Tensor std = std_in.contiguous();  // only read
  at::Tensor half_u = at::empty(std.sizes(), std.options());
  AT_DISPATCH_FLOATING_TYPES(std.scalar_type(), "lrt_noise_grad_cpu", [&] {
    over_chunks<scalar_t>(grad, std, half_u, seed, offset,
                          [](const LrtNoiseRange<scalar_t>& a) { run_lrt_noise_grad(a); });
  });
  return half_u;
}

}  // namespace

TORCH_LIBRARY_IMPL(bayes_ext, CPU, m) {
  m.impl("lrt_output_", &lrt_output_cpu);
  m.impl("lrt_noise_grad", &lrt_noise_grad_cpu);
}

}  // namespace bayes_ext
