// CPU implementation of the row-sampling ops (Bayesian embedding lookups): rows `indices` of
// w = mu + softplus(rho) * eps, where eps is the noise of the WHOLE (V, D) table (row r draws
// stream elements r*D .. r*D + D - 1), so a lookup equals indexing a whole-table sample while
// costing only the looked-up rows. The backward sums the incoming gradients of repeated indices
// (in their order of appearance: deterministic) and runs one backward range per distinct row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "bayes_ext/op_checks.h"
#include "bayes_ext/posterior_math.h"
#include "kernel_dispatch.h"
#include "range_kernels_api.h"

namespace bayes_ext {
namespace {

using namespace cpu_kernel;

constexpr int64_t kRowChunk = 16384;  // elements per parallel task (rows are grouped up to this)

int64_t rows_grain(int64_t dim) { return std::max<int64_t>(1, kRowChunk / std::max<int64_t>(dim, 1)); }

// indices (contiguous, CPU) must lie in [0, num_rows).
void check_index_range(const at::Tensor& idx, int64_t num_rows) {
  const int64_t* p = idx.data_ptr<int64_t>();
  const int64_t n = idx.numel();
  for (int64_t k = 0; k < n; ++k)
    TORCH_CHECK_VALUE(p[k] >= 0 && p[k] < num_rows, "indices must be in [0, ", num_rows, "), got ", p[k],
                      " at flat position ", k);
}

at::Tensor sample_rows_cpu(const at::Tensor& mu_in, const at::Tensor& rho_in, const at::Tensor& indices,
                           const at::Tensor& seed, int64_t offset) {
  check_row_args(mu_in, rho_in, indices, seed, offset);
  check_cpu(mu_in);
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const at::Tensor idx = indices.contiguous();
  const int64_t num_rows = mu.size(0), dim = mu.size(1), n = idx.numel();
  check_index_range(idx, num_rows);
  at::Tensor w = at::empty(row_shape(indices, dim), mu.options());
  if (n == 0 || dim == 0) return w;
  const uint64_t s = seed_value(seed);
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "sample_rows_cpu", [&] {
    const auto prior = make_prior<scalar_t>(1.0, 1.0, 1.0);  // log p is not used: cheapest mode
    const scalar_t* mu_p = mu.data_ptr<scalar_t>();
    const scalar_t* rho_p = rho.data_ptr<scalar_t>();
    const int64_t* idx_p = idx.data_ptr<int64_t>();
    scalar_t* w_p = w.data_ptr<scalar_t>();
    at::parallel_for(0, n, rows_grain(dim), [&](int64_t begin, int64_t end) {
      double unused_q = 0.0, unused_p = 0.0;
      for (int64_t k = begin; k < end; ++k) {
        const int64_t r = idx_p[k];
        ForwardRange<scalar_t> a{mu_p + r * dim, rho_p + r * dim, w_p + k * dim, 0, dim, r * dim,
                                 s, static_cast<uint64_t>(offset), prior, &unused_q, &unused_p};
        run_forward(a);
      }
    });
  });
  return w;
}

// Adds the gradients of sample_rows into grad_mu / grad_rho (contiguous, mu's shape). Each distinct
// row is one task, so no two tasks touch the same elements.
void rows_backward_add(at::Tensor& grad_mu, at::Tensor& grad_rho, const at::Tensor& grad_rows_in,
                       const at::Tensor& mu_in, const at::Tensor& rho_in, const at::Tensor& indices,
                       const at::Tensor& seed, int64_t offset) {
  const int64_t num_rows = mu_in.size(0), dim = mu_in.size(1);
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor rho = rho_in.contiguous();
  const at::Tensor idx = indices.contiguous().reshape({-1});
  check_index_range(idx, num_rows);
  const int64_t n = idx.numel();
  if (n == 0 || dim == 0) return;
  const at::Tensor grad_rows = grad_rows_in.contiguous().reshape({n, dim});
  // Stable sort: the duplicates of a row are summed in their order in `indices`.
  const auto sorted = at::sort(idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_idx = std::get<0>(sorted).contiguous();
  const at::Tensor perm = std::get<1>(sorted).contiguous();
  const int64_t* sorted_p = sorted_idx.data_ptr<int64_t>();
  const int64_t* perm_p = perm.data_ptr<int64_t>();
  std::vector<int64_t> group_start;
  for (int64_t j = 0; j < n; ++j)
    if (j == 0 || sorted_p[j] != sorted_p[j - 1]) group_start.push_back(j);
  const int64_t groups = static_cast<int64_t>(group_start.size());
  group_start.push_back(n);
  const uint64_t s = seed_value(seed);
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "sample_rows_backward_cpu", [&] {
    const auto prior = make_prior<scalar_t>(1.0, 1.0, 1.0);  // grad_log_p = 0: the prior is not used
    const scalar_t* mu_p = mu.data_ptr<scalar_t>();
    const scalar_t* rho_p = rho.data_ptr<scalar_t>();
    const scalar_t* g_p = grad_rows.data_ptr<scalar_t>();
    scalar_t* gmu_p = grad_mu.data_ptr<scalar_t>();
    scalar_t* grho_p = grad_rho.data_ptr<scalar_t>();
    at::parallel_for(0, groups, rows_grain(dim), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> acc(static_cast<size_t>(dim)), row_mu(acc.size()), row_rho(acc.size());
      for (int64_t gi = begin; gi < end; ++gi) {
        const int64_t r = sorted_p[group_start[gi]];
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        for (int64_t j = group_start[gi]; j < group_start[gi + 1]; ++j) {
          const scalar_t* src = g_p + perm_p[j] * dim;
          for (int64_t i = 0; i < dim; ++i) acc[i] += src[i];
        }
        // the range kernel writes; the row's own gradients are then added to the buffers
        BackwardRange<scalar_t> a{acc.data(), scalar_t(0), scalar_t(0), mu_p + r * dim, rho_p + r * dim,
                                  row_mu.data(), row_rho.data(), nullptr, 0, dim, r * dim,
                                  s, static_cast<uint64_t>(offset), prior};
        run_backward(a);
        scalar_t* out_mu = gmu_p + r * dim;
        scalar_t* out_rho = grho_p + r * dim;
        for (int64_t i = 0; i < dim; ++i) {
          out_mu[i] += row_mu[i];
          out_rho[i] += row_rho[i];
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> sample_rows_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& mu,
                                                            const at::Tensor& rho, const at::Tensor& indices,
                                                            const at::Tensor& seed, int64_t offset) {
  check_row_args(mu, rho, indices, seed, offset);
  check_cpu(mu);
  check_grad_rows(grad_rows, mu, indices);
  at::Tensor grad_mu = at::zeros(mu.sizes(), mu.options());
  at::Tensor grad_rho = at::zeros(mu.sizes(), mu.options());
  rows_backward_add(grad_mu, grad_rho, grad_rows, mu, rho, indices, seed, offset);
  return {grad_mu, grad_rho};
}

void sample_rows_backward_add_cpu(at::Tensor& grad_mu, at::Tensor& grad_rho, const at::Tensor& grad_rows,
                                  const at::Tensor& mu, const at::Tensor& rho, const at::Tensor& indices,
                                  const at::Tensor& seed, int64_t offset) {
  check_row_args(mu, rho, indices, seed, offset);
  check_cpu(mu);
  check_grad_rows(grad_rows, mu, indices);
  check_accumulator(grad_mu, mu, "grad_mu");
  check_accumulator(grad_rho, mu, "grad_rho");
  rows_backward_add(grad_mu, grad_rho, grad_rows, mu, rho, indices, seed, offset);
}

}  // namespace

TORCH_LIBRARY_IMPL(bayes_ext, CPU, m) {
  m.impl("sample_rows", &sample_rows_cpu);
  m.impl("sample_rows_backward", &sample_rows_backward_cpu);
  m.impl("sample_rows_backward_add_", &sample_rows_backward_add_cpu);
}

}  // namespace bayes_ext
