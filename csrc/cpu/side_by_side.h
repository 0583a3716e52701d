// Two independent pieces of work (in the LRT op: its mean and variance GEMMs, each with a
// weight-sized operand) run side by side, one per thread, when torch has exactly two threads.
//
// Why: MKL splits a GEMM with a batch of 64 rows across two threads at well below what each thread
// gets from a GEMM of its own. Measured on a 2-core AMD EPYC (MKL 2024.2, torch 2.13;
// bench/results/lrt_side_by_side_gemms_cpu_2c-amd-epyc.md), pairs of 64x1024x1024 GEMMs: the LRT
// forward's two 2.6-2.9 ms one after the other, 1.7-2.1 ms side by side; the two dL/dx GEMMs
// 2.9-3.1 -> 1.9-2.2 ms; the two weight gradients 2.1-2.3 -> 1.8-2.1 ms. In the LRT training step
// (where the weight passes sit between the pairs) that came to 2.97x -> 2.69x nn.Linear's step.
// With more threads each piece would get only one (OpenMP regions do not nest here), so the pieces
// run one after the other as before; with one thread nothing changes.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace bayes_ext {

// Below this many multiply-adds per piece the pieces run one after the other: their GEMMs then
// round exactly as torch's own calls of them (MKL may take another path for a small GEMM inside a
// parallel region: 1 ulp apart at 5x64x48), so a small layer's op gives its Python op's values bit
// for bit. Side by side already paid at 16x64x64 (0.6x the time), so nothing is lost above it.
constexpr int64_t kSideBySideMinMacs = int64_t(1) << 16;

// Runs first() and second(), each about `macs_each` multiply-adds of work; side by side when torch
// has two threads, that work is at least kSideBySideMinMacs and the caller is not already inside a
// parallel region. The caller's thread-local state (grad mode, the dispatch keys it excludes, such
// as a kernel's "below autograd") goes with each piece to the thread that runs it. Exceptions thrown
// by either come back out of this call, as from at::parallel_for.
template <class First, class Second>
void side_by_side(int64_t macs_each, First&& first, Second&& second) {
  if (at::get_num_threads() != 2 || macs_each < kSideBySideMinMacs || at::in_parallel_region()) {
    first();
    second();
    return;
  }
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t piece = begin; piece < end; ++piece) {
      if (piece == 0) {
        first();
      } else {
        second();
      }
    }
  });
}

}  // namespace bayes_ext
