// What the CUDA op files share: the block size and a capped grid for grid-stride loops.
#pragma once

#include <cstdint>

namespace bayes_ext {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `items` work items, at most max_blocks (each thread then
// loops): a fixed grid for a given size, so per-block partial sums are deterministic.
inline int64_t capped_grid(int64_t items, int64_t max_blocks = 4096) {
  const int64_t g = (items + kThreads - 1) / kThreads;
  return g < 1 ? 1 : (g > max_blocks ? max_blocks : g);
}

}  // namespace bayes_ext
