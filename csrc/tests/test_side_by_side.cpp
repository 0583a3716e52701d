// side_by_side (csrc/cpu/side_by_side.h), against libtorch alone:
// - on two threads the two pieces run on different threads, and their GEMMs give what the same
//   GEMMs give one after the other;
// - each piece sees the caller's grad mode and excluded dispatch keys (the layer ops call it below
//   autograd, where an out= GEMM on a tensor that requires grad must not reach the autograd kernel);
// - an exception thrown by either piece comes out of the call;
// - one thread, more than two threads, pieces smaller than kSideBySideMinMacs, or a call from
//   inside a parallel region: one after the other, on the calling thread, first before second.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "side_by_side.h"

namespace {

using bayes_ext::side_by_side;
using bayes_ext_test::check;

// Work per piece at and just below the threshold for going side by side.
constexpr int64_t kBig = bayes_ext::kSideBySideMinMacs, kSmall = bayes_ext::kSideBySideMinMacs - 1;

// What AutoDispatchBelowADInplaceOrView excludes: the autograd and ADInplaceOrView functionalities.
bool autograd_excluded() {
  const c10::DispatchKeySet excluded = c10::impl::tls_local_dispatch_key_set().excluded_;
  return excluded.has(c10::DispatchKey::AutogradFunctionality) && excluded.has(c10::DispatchKey::ADInplaceOrView);
}

void check_two_threads() {
  at::set_num_threads(2);
  const at::Tensor x = at::randn({64, 96}), a = at::randn({80, 96}), b = at::randn({80, 96});
  at::Tensor first_out, second_out;
  int first_thread = -1, second_thread = -1;
  side_by_side(kBig, [&] { first_out = x.mm(a.t()); first_thread = at::get_thread_num(); },
               [&] { second_out = (x * x).mm(b.t()); second_thread = at::get_thread_num(); });
  check(first_thread != second_thread, "two threads: the pieces ran on threads " + std::to_string(first_thread) +
                                           " and " + std::to_string(second_thread));
  check(at::allclose(first_out, x.mm(a.t())) && at::allclose(second_out, (x * x).mm(b.t())),
        "two threads: the GEMMs side by side match them one after the other");

  // the layer ops' situation: below autograd, no grad, parameters that require grad, out= GEMMs
  const at::Tensor w = at::randn({80, 96}).requires_grad_(true);
  at::Tensor out = at::empty({64, 80});
  bool grad_seen[2] = {true, true}, excluded_seen[2] = {false, false};
  {
    at::NoGradGuard no_grad;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    side_by_side(
        kBig, [&] {
          grad_seen[0] = at::GradMode::is_enabled();
          excluded_seen[0] = autograd_excluded();
          at::mm_out(out, x, w.t());
        },
        [&] {
          grad_seen[1] = at::GradMode::is_enabled();
          excluded_seen[1] = autograd_excluded();
        });
  }
  check(!grad_seen[0] && !grad_seen[1], "two threads: both pieces run with the caller's grad mode (off)");
  check(excluded_seen[0] && excluded_seen[1], "two threads: both pieces run below autograd, as the caller");
  check(at::allclose(out, x.mm(w.detach().t())), "two threads: an out= GEMM on a weight that requires grad");

  for (int throwing = 0; throwing < 2; ++throwing) {
    std::atomic<int> ran{0};
    bool caught = false;
    try {
      side_by_side(
          kBig, [&] {
            ++ran;
            if (throwing == 0) throw std::runtime_error("first piece failed");
          },
          [&] {
            ++ran;
            if (throwing == 1) throw std::runtime_error("second piece failed");
          });
    } catch (const std::exception& e) {
      caught = std::string(e.what()).find(throwing == 0 ? "first piece failed" : "second piece failed") !=
               std::string::npos;
    }
    check(caught, "two threads: an exception of piece " + std::to_string(throwing) + " comes out of the call");
  }
}

// One after the other on the calling thread, first before second.
void check_in_order(const std::string& when, int64_t macs_each = kBig) {
  std::vector<int> order;
  std::vector<int> threads;
  const int caller = at::get_thread_num();
  side_by_side(macs_each, [&] { order.push_back(1); threads.push_back(at::get_thread_num()); },
               [&] { order.push_back(2); threads.push_back(at::get_thread_num()); });
  check(order == std::vector<int>({1, 2}), when + ": first, then second");
  check(threads.size() == 2 && threads[0] == caller && threads[1] == caller, when + ": on the calling thread");
}

void check_one_after_the_other() {
  at::set_num_threads(1);
  check_in_order("one thread");
  at::set_num_threads(4);
  check_in_order("four threads");
  at::set_num_threads(2);
  check_in_order("two threads, less work than kSideBySideMinMacs", kSmall);
  std::atomic<int> nested_ok{0};
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::vector<int> order;
      side_by_side(kBig, [&] { order.push_back(1); }, [&] { order.push_back(2); });
      if (order == std::vector<int>({1, 2})) ++nested_ok;
    }
  });
  check(nested_ok == 2, "inside a parallel region: first, then second, in each task");
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_two_threads();
  check_one_after_the_other();
  return bayes_ext_test::finish("test_side_by_side");
}
