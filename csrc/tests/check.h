// The libtorch-free C++ tests' check: counts checks, prints each failed one, and finish() turns
// the count into the exit status.
#pragma once

#include <cstdio>
#include <string>

namespace bayes_ext_test {

inline int g_failures = 0;
inline int g_checks = 0;

inline void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// main's return value: 0 when every check passed.
inline int finish(const char* test_name) {
  if (g_failures != 0) {
    std::printf("%s: %d of %d checks failed\n", test_name, g_failures, g_checks);
    return 1;
  }
  std::printf("%s: all %d checks passed\n", test_name, g_checks);
  return 0;
}

}  // namespace bayes_ext_test
