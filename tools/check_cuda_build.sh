#!/usr/bin/env bash
# CUDA compile check (no GPU needed): builds bayes_ext._C with the CUDA kernels against a CUDA
# build of torch and checks that the library loads and registers CUDA kernels.
#   1. .venv-cuda (reused if present): torch==2.14.1, the CUDA 13.0 build (from local disk, ~5.5 GB);
#   2. CUDA_HOME = the toolkit of the nvcc on PATH, CPATH = the venv's nvidia/cu13/include (cuBLAS,
#      cuSPARSE... headers that torch's CUDA headers include and the toolkit here lacks),
#      TORCH_CUDA_ARCH_LIST=9.0 (override with the variable), FORCE_CUDA=1, MAX_JOBS=2;
#   3. python setup.py build_ext on a copy of the sources in a temporary directory (so the working
#      tree's bayes_ext/_build_info.py and in-place _C stay those of the CPU .venv);
#   4. loads the built library under that torch (torch.ops.load_library and `import bayes_ext._C`)
#      and checks that every bayes_ext op has a CUDA kernel.
#   5. builds CMakeLists.txt with BAYES_EXT_WITH_CUDA=ON against the same torch and runs its ctest
#      (the C++ tests use the CPU kernels; the point is that the CMake CUDA build links and loads).
# Environment: BAYES_EXT_CUDA_VENV (default <repo>/.venv-cuda), BAYES_EXT_CUDA_BUILD (a directory
# to keep the build in; default a temporary one, removed afterwards), BAYES_EXT_CUDA_CMAKE=0 skips 5.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${BAYES_EXT_CUDA_VENV:-$ROOT/.venv-cuda}"
say() { echo "check_cuda_build: $*"; }
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

shopt -s nullglob
CU_SOURCES=(csrc/cuda/*.cu)
shopt -u nullglob
if ((${#CU_SOURCES[@]} == 0)); then
  say "no csrc/cuda/*.cu: nothing to check" >&2
  exit 1
fi

# --- 1. the CUDA torch venv ----------------------------------------------------------------------
CUDA_PINS=("torch==2.14.1" "numpy==2.4.6" "ninja==1.13.2" "setuptools==84.2.1" "wheel==0.48.0")
if [[ ! -x "$VENV/bin/python" ]]; then
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
  say "created $VENV"
fi
PYTHON="$VENV/bin/python"
have_pins() {
  "$PYTHON" - "$@" <<'EOF'
import sys
from importlib import metadata
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if have.split("+")[0] != want:
        sys.exit(1)
EOF
}
if have_pins "${CUDA_PINS[@]}" && "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
  say "reusing $VENV"
else
  say "installing ${CUDA_PINS[*]} into $VENV (the CUDA build of torch, ~5.5 GB; a few minutes)"
  start=$SECONDS
  "$PYTHON" -m pip install -q "${CUDA_PINS[@]}" 2>&1 | grep -v 'is ignored: it is neither a file nor a directory' || true
  have_pins "${CUDA_PINS[@]}" || { say "pip did not install ${CUDA_PINS[*]}" >&2; exit 1; }
  say "installed in $((SECONDS - start))s"
fi
read -r TORCH_VERSION TORCH_CUDA SITE <<<"$("$PYTHON" -c 'import sysconfig, torch; print(torch.__version__, torch.version.cuda, sysconfig.get_paths()["purelib"])')"
if [[ "$TORCH_CUDA" == "None" ]]; then
  say "$VENV has a CPU build of torch ($TORCH_VERSION)" >&2
  exit 1
fi

# --- 2. the toolchain ----------------------------------------------------------------------------
NVCC="$(command -v nvcc || true)"
if [[ -z "$NVCC" ]]; then
  say "nvcc is not on PATH" >&2
  exit 1
fi
# Two levels above nvcc, unless that nvcc is a wrapper (here /usr/local/bin/nvcc execs
# /usr/local/cuda-13.0/bin/nvcc): then the toolkit nvcc itself reports (its TOP), which is where
# include/cuda_runtime.h and lib64/libcudart.so are.
CUDA_HOME="$(cd "$(dirname "$NVCC")/.." && pwd)"
if [[ ! -f "$CUDA_HOME/include/cuda_runtime.h" || ! -e "$CUDA_HOME/lib64/libcudart.so" ]]; then
  TOP="$(nvcc -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)"
  if [[ -n "$TOP" && -f "$TOP/include/cuda_runtime.h" ]]; then
    CUDA_HOME="$(cd "$TOP" && pwd)"
  fi
fi
export CUDA_HOME
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}"
export PATH="$VENV/bin:$PATH"
unset BAYES_EXT_NO_EXTENSION BAYES_EXT_SANITIZE
say "torch $TORCH_VERSION (CUDA $TORCH_CUDA), $(nvcc --version | tail -n1), CUDA_HOME=$CUDA_HOME"
say "CPATH=$CPATH TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"

# --- 3. build on a copy of the sources -----------------------------------------------------------
if [[ -n "${BAYES_EXT_CUDA_BUILD:-}" ]]; then
  WORK="$BAYES_EXT_CUDA_BUILD"
  rm -rf "$WORK/src"
  mkdir -p "$WORK"
else
  WORK="$(mktemp -d /tmp/bayes_ext_cuda.XXXXXX)"
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK/src"
COPY=(setup.py pyproject.toml csrc bayes_ext)
[[ -f README.md ]] && COPY+=(README.md)
tar -cf - --exclude='*.so' --exclude='__pycache__' --exclude='_build_info.py' "${COPY[@]}" | tar -C "$WORK/src" -xf -
say "building ${CU_SOURCES[*]} with the CPU sources (python setup.py build_ext) in $WORK"
start=$SECONDS
log="$WORK/build.log"
if ! (cd "$WORK/src" && "$PYTHON" setup.py build_ext --build-temp "$WORK/temp" --build-lib "$WORK/lib") >"$log" 2>&1; then
  grep -nE 'error|Error' "$log" | head -60 >&2 || true
  echo "----- last 60 lines of the build log -----" >&2
  tail -n 60 "$log" >&2
  say "CUDA build FAILED" >&2
  exit 1
fi
say "built in $((SECONDS - start))s"
# Compiler warnings (nvcc's and g++'s), not setuptools' notices.
if grep -E 'warning( #[0-9A-Z-]+)?:|\(warning\)' "$log" | grep -viE 'setuptools|deprecat' >"$WORK/warnings.txt"; then
  say "compiler warnings:"
  cat "$WORK/warnings.txt"
fi
if ! grep -q 'WITH_CUDA = True' "$WORK/src/bayes_ext/_build_info.py"; then
  say "setup.py did not build the CUDA extension (bayes_ext/_build_info.py: $(tr '\n' ' ' <"$WORK/src/bayes_ext/_build_info.py"))" >&2
  exit 1
fi

# --- 4. load it under the CUDA torch (no GPU here: loading and registration only) ----------------
SO=("$WORK"/lib/bayes_ext/_C*.so)
[[ -f "${SO[0]}" ]] || { say "no _C*.so in $WORK/lib/bayes_ext" >&2; exit 1; }
say "$(du -h "${SO[0]}" | cut -f1) ${SO[0]}"
(cd "$WORK" && "$PYTHON" - "${SO[0]}" "$WORK/lib" <<'EOF')
import importlib.util, re, sys
import torch

so, lib_dir = sys.argv[1], sys.argv[2]
torch.ops.load_library(so)
ops = ["sample_weight", "sample_weight_backward", "sample_weight_as", "philox_normal", "lrt_output_", "lrt_noise_grad"]
missing = []
for name in ops:
    getattr(torch.ops.bayes_ext, name)  # raises if the op is not registered
    table = torch._C._dispatch_dump(f"bayes_ext::{name}")
    if not re.search(r"^CUDA: registered", table, re.M):
        missing.append(name)
    keys = [k for k in re.findall(r"^(\w+): registered", table, re.M) if k != "debug"]
    print(f"check_cuda_build: bayes_ext::{name}: kernels for {', '.join(keys)}")
if missing:
    sys.exit(f"check_cuda_build: no CUDA kernel registered for {missing}")
# The same file as a Python module (how bayes_ext/_backend.py loads it): needs PyInit__C exported.
sys.path.insert(0, lib_dir)
spec = importlib.util.spec_from_file_location("bayes_ext._C", so)
module = importlib.util.module_from_spec(spec)
print(f"check_cuda_build: loaded under torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"cuda available here: {torch.cuda.is_available()}")
EOF

# --- 5. CMakeLists.txt with BAYES_EXT_WITH_CUDA=ON against the same torch, and its C++ tests -----
if [[ "${BAYES_EXT_CUDA_CMAKE:-1}" == "1" ]]; then
  # torch's CMake config wants nvrtc, which this toolkit lacks: the venv's nvidia/cu13 has it.
  NVRTC=("$SITE"/nvidia/cu13/lib/libnvrtc.so*)
  CMAKE_ARGS=(-DBAYES_EXT_WITH_CUDA=ON -DCMAKE_BUILD_TYPE=Release
              -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DCUDAToolkit_ROOT="$CUDA_HOME"
              -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME"
              -DCMAKE_PREFIX_PATH="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
              -DPython3_EXECUTABLE="$PYTHON")
  if [[ ! -e "$CUDA_HOME/lib64/libnvrtc.so" && -e "${NVRTC[0]}" ]]; then
    CMAKE_ARGS+=(-DCUDA_nvrtc_LIBRARY="${NVRTC[0]}")
  fi
  say "CMakeLists.txt with BAYES_EXT_WITH_CUDA=ON in $WORK/cmake"
  start=$SECONDS
  if ! cmake -S "$ROOT" -B "$WORK/cmake" -G Ninja "${CMAKE_ARGS[@]}" >"$WORK/cmake-configure.log" 2>&1; then
    cat "$WORK/cmake-configure.log" >&2
    say "cmake configure (CUDA) FAILED" >&2
    exit 1
  fi
  if ! cmake --build "$WORK/cmake" -j "$MAX_JOBS" >"$WORK/cmake-build.log" 2>&1; then
    grep -nE 'error|Error' "$WORK/cmake-build.log" | head -60 >&2 || true
    tail -n 40 "$WORK/cmake-build.log" >&2
    say "cmake build (CUDA) FAILED" >&2
    exit 1
  fi
  if grep -E 'warning( #[0-9A-Z-]+)?:' "$WORK/cmake-build.log" >"$WORK/cmake-warnings.txt"; then
    say "compiler warnings (CMake build):"
    cat "$WORK/cmake-warnings.txt"
  fi
  ctest --test-dir "$WORK/cmake" --output-on-failure --no-tests=error
  say "CMake CUDA build and its C++ tests (CPU kernels, CUDA torch) passed in $((SECONDS - start))s"
fi
say "OK"
