#!/usr/bin/env bash
# Builds CMakeLists.txt (the kernels as libbayes_ext_ops plus csrc/tests) against the libtorch of
# .venv and runs the C++ tests with ctest. Run tools/setup_env.sh first (run_tests.sh does).
#   bash tools/run_cpp_tests.sh            # build in build/cmake, run every test
#   BAYES_EXT_CMAKE_BUILD=dir              # another build directory
# Extra arguments go to ctest (e.g. -R philox).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${BAYES_EXT_VENV:-$ROOT/.venv}"
PYTHON="$VENV/bin/python"
BUILD="${BAYES_EXT_CMAKE_BUILD:-$ROOT/build/cmake}"
if [[ ! -x "$PYTHON" ]] || ! "$PYTHON" -c 'import torch' 2>/dev/null; then
  echo "run_cpp_tests: $VENV has no torch; run bash tools/setup_env.sh first" >&2
  exit 1
fi
export PATH="$VENV/bin:$PATH"

TORCH_PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
GENERATOR=()
if command -v ninja >/dev/null 2>&1; then
  GENERATOR=(-G Ninja)
  # An existing build tree made with another generator cannot be reconfigured with Ninja.
  if [[ -f "$BUILD/CMakeCache.txt" ]] && ! grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja$' "$BUILD/CMakeCache.txt"; then
    rm -rf "$BUILD"
  fi
fi
echo "run_cpp_tests: configuring $BUILD against $TORCH_PREFIX"
mkdir -p "$BUILD"
cmake -S "$ROOT" -B "$BUILD" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DPython3_EXECUTABLE="$PYTHON" >"$BUILD/configure.log" 2>&1 ||
  { cat "$BUILD/configure.log" >&2; echo "run_cpp_tests: cmake configure FAILED" >&2; exit 1; }
cmake --build "$BUILD" -j "${MAX_JOBS:-$(nproc)}"
ctest --test-dir "$BUILD" --output-on-failure --no-tests=error "$@"
