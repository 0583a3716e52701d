// The fixed work split of the CPU ops: tensors are processed in chunks of kChunk elements, each
// chunk's partial sums kept apart and added in chunk order, so reductions (log q, log p, the KL)
// do not depend on the number of threads.
#pragma once

#include <cstdint>

namespace bayes_ext {
namespace cpu_kernel {

constexpr int64_t kChunk = 16384;

inline int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

}  // namespace cpu_kernel
}  // namespace bayes_ext
