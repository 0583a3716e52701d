// A per-thread buffer for a weight-sized temporary that lives only inside one CPU op call (the
// LRT op's sigma^2). A fresh 4 MB temporary every call made glibc's heap top grow and shrink: the
// temporaries and the weight-gradient pair, all free at zero_grad, went over glibc's trim threshold
// in some steps, and the next step page-faulted the 16 MB back in (64x1024x1024 LRT step: 0-1557
// faults a step, 7.6 ms without them, up to 11.9 ms with: bench/results/lrt_scratch_cpu_2c-amd-epyc.md).
// The buffer keeps its largest size (at most kScratchMaxBytes) until the thread exits.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <memory>

namespace bayes_ext {
namespace layer_op {

// Larger temporaries are allocated as usual (a blocked LRT weight's block is at most 1 << 20
// elements; an unblocked weight at most 2 << 20: 8 MB in fp32).
constexpr size_t kScratchMaxBytes = size_t(16) << 20;

namespace detail {
struct ScratchBuffer {
  std::unique_ptr<void, decltype(&std::free)> data{nullptr, &std::free};
  size_t bytes = 0;
  bool leased = false;
};
inline ScratchBuffer& thread_scratch() {
  thread_local ScratchBuffer buffer;
  return buffer;
}
}  // namespace detail

// An uninitialised contiguous CPU tensor of `like`'s shape and dtype, in this thread's buffer while
// the lease lives. The tensor does not own that memory: it must not outlive the lease (nothing may
// keep it: no output, no saved tensor). A second lease on the same thread while one is held, or a
// temporary over kScratchMaxBytes, gets an ordinary fresh tensor, so two leases never alias.
class ScratchLease {
 public:
  explicit ScratchLease(const at::Tensor& like) {
    detail::ScratchBuffer& buffer = detail::thread_scratch();
    const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
    if (buffer.leased || bytes > kScratchMaxBytes || !like.device().is_cpu()) {
      tensor_ = at::empty(like.sizes(), like.options());
      return;
    }
    if (bytes > buffer.bytes) {
      void* p = nullptr;
      TORCH_CHECK(posix_memalign(&p, 64, bytes) == 0, "scratch buffer: could not allocate ", bytes, " bytes");
      buffer.data.reset(p);
      buffer.bytes = bytes;
    }
    buffer.leased = true;
    owns_lease_ = true;
    tensor_ = at::from_blob(buffer.data.get(), like.sizes(), like.options());
  }
  ~ScratchLease() {
    if (owns_lease_) detail::thread_scratch().leased = false;
  }
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;

  at::Tensor& tensor() { return tensor_; }

 private:
  at::Tensor tensor_;
  bool owns_lease_ = false;
};

}  // namespace layer_op
}  // namespace bayes_ext
