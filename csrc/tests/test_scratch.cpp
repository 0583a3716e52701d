// ScratchLease (csrc/cpu/scratch.h), against libtorch alone:
// - a lease's tensor has the shape and dtype asked for, is contiguous and 64-byte aligned;
// - the next lease on the thread reuses the same memory (that is its point: no fresh allocation);
// - a second lease while one is held, a temporary over kScratchMaxBytes, or a non-CPU `like` gets
//   an ordinary tensor of its own, so two live leases never share memory;
// - another thread gets its own buffer.
#include <ATen/ATen.h>

#include <cstdint>
#include <thread>

#include "check.h"
#include "scratch.h"

namespace {

using bayes_ext::layer_op::kScratchMaxBytes;
using bayes_ext::layer_op::ScratchLease;
using bayes_ext_test::check;

const void* data_of(ScratchLease& lease) { return lease.tensor().data_ptr(); }

void check_shape_and_reuse() {
  const at::Tensor like = at::empty({32, 48}, at::kFloat);
  const void* first = nullptr;
  {
    ScratchLease lease(like);
    check(lease.tensor().sizes() == like.sizes(), "lease has like's shape");
    check(lease.tensor().scalar_type() == at::kFloat, "lease has like's dtype");
    check(lease.tensor().is_contiguous(), "lease is contiguous");
    check(reinterpret_cast<uintptr_t>(data_of(lease)) % 64 == 0, "lease is 64-byte aligned");
    lease.tensor().fill_(3.0);
    check(lease.tensor().sum().item<double>() == 3.0 * 32 * 48, "lease is writable memory");
    first = data_of(lease);
  }
  {
    ScratchLease smaller(at::empty({16, 8}, at::kDouble));
    check(data_of(smaller) == first, "a smaller lease after release reuses the buffer");
    check(smaller.tensor().scalar_type() == at::kDouble, "the smaller lease has its own dtype");
  }
}

void check_no_aliasing() {
  const at::Tensor like = at::empty({64, 64}, at::kFloat);
  ScratchLease outer(like);
  ScratchLease inner(like);
  check(data_of(outer) != data_of(inner), "a second live lease does not share the first's memory");
  outer.tensor().fill_(1.0);
  inner.tensor().fill_(2.0);
  check(outer.tensor().min().item<float>() == 1.0f, "writing the second lease leaves the first alone");
}

void check_oversize() {
  const int64_t elements = static_cast<int64_t>(kScratchMaxBytes / sizeof(float)) + 1;
  const void* scratch = nullptr;
  {
    ScratchLease small(at::empty({8}, at::kFloat));
    scratch = data_of(small);
  }
  ScratchLease big(at::empty({elements}, at::kFloat));
  check(big.tensor().numel() == elements, "an oversize lease has its size");
  check(data_of(big) != scratch, "an oversize lease is an ordinary tensor");
  ScratchLease after(at::empty({8}, at::kFloat));
  check(data_of(after) == scratch, "an oversize lease does not hold the buffer");
}

void check_threads() {
  const at::Tensor like = at::empty({128}, at::kFloat);
  ScratchLease here(like);
  const void* there = nullptr;
  std::thread other([&] {
    ScratchLease lease(like);
    there = data_of(lease);
  });
  other.join();
  check(there != nullptr && there != data_of(here), "another thread has its own buffer");
}

}  // namespace

int main() {
  check_shape_and_reuse();
  check_no_aliasing();
  check_oversize();
  check_threads();
  return bayes_ext_test::finish("test_scratch");
}
