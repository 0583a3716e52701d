#!/usr/bin/env bash
# Builds bayes_ext's C++ kernels with AddressSanitizer + UndefinedBehaviorSanitizer
# (BAYES_EXT_SANITIZE=1, flags in setup.py) and runs the op tests under them. Fails on any report.
#
# The sanitized build never touches the main build: the working tree (tracked and untracked,
# not ignored files) is copied to build/sanitize/src and built there in place
# (python setup.py build_ext --inplace) with the venv's python; the tests then run from that copy,
# so `import bayes_ext` picks up the sanitized bayes_ext/_C*.so (checked before the tests run).
# The copy's build is reused while csrc/, setup.py and torch are unchanged (build stamp).
#
# Usage: bash tools/sanitize.sh [pytest args]   (default: the op tests listed below)
# Environment:
#   BAYES_EXT_VENV=path          venv to use (default: <repo>/.venv; set up by tools/setup_env.sh)
#   BAYES_EXT_SANITIZE_DIR=path  where the copy and its build live (default: <repo>/build/sanitize)
#   HYPOTHESIS_PROFILE           default "sanitize" (a small profile, tests/hypothesis_profiles.py)
#   SANITIZE_REBUILD=1           rebuild even if the stamp matches
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${BAYES_EXT_VENV:-$ROOT/.venv}"
WORK="${BAYES_EXT_SANITIZE_DIR:-$ROOT/build/sanitize}"
SRC="$WORK/src"
say() { echo "sanitize: $*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
  bash tools/setup_env.sh
fi
PYTHON="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"  # the venv's ninja

LIBASAN="$(gcc -print-file-name=libasan.so)"
LIBUBSAN="$(gcc -print-file-name=libubsan.so)"
# libstdc++ must be loaded when ASan initialises: python does not link it, and ASan's __cxa_throw
# interceptor otherwise finds no real __cxa_throw and aborts ("CHECK failed ... real___cxa_throw")
# on the first C++ exception (every argument check of the kernels throws one).
LIBSTDCXX="$(readlink -f "$(gcc -print-file-name=libstdc++.so.6)")"
for lib in "$LIBASAN" "$LIBUBSAN" "$LIBSTDCXX"; do
  if [[ ! -f "$lib" ]]; then
    say "sanitizer runtime not found ($lib): install gcc's libasan / libubsan" >&2
    exit 1
  fi
done

# --- 1. a copy of the working tree ---------------------------------------------------------------
mkdir -p "$SRC"
mapfile -d '' FILES < <(git ls-files -z --cached --others --exclude-standard -- setup.py pyproject.toml \
  bayes_ext csrc tests)
# Mirror exactly: files deleted from the tree disappear from the copy too (the build outputs,
# ignored by git, are kept).
find "$SRC" -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.toml' \) \
  -not -name '_build_info.py' -not -path '*/build/*' -delete
for f in "${FILES[@]}"; do
  [[ -f "$f" ]] || continue  # deleted but still in the index
  mkdir -p "$SRC/$(dirname "$f")"
  cp -p "$f" "$SRC/$f"
done

# --- 2. the sanitized build (cached by a stamp) --------------------------------------------------
stamp() {
  {
    echo "torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
    echo "gcc $(gcc -dumpfullversion)"
    (cd "$SRC" && find setup.py csrc -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' \) \
      -not -path 'csrc/tests/*' -print0 | sort -z | xargs -0 sha256sum)
  } | sha256sum | cut -d' ' -f1
}
STAMP_FILE="$WORK/.stamp"
STAMP="$(stamp)"
if [[ "${SANITIZE_REBUILD:-0}" != "1" && -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$STAMP" ]] &&
   compgen -G "$SRC/bayes_ext/_C*.so" >/dev/null; then
  say "sanitized build up to date ($SRC)"
else
  rm -f "$STAMP_FILE" "$SRC"/bayes_ext/_C*.so
  say "building the kernels with BAYES_EXT_SANITIZE=1 in $SRC"
  start=$SECONDS
  log="$WORK/build.log"
  # CPU kernels only: the CUDA kernels have their own check (compute-sanitizer, on GPU machines).
  if ! (cd "$SRC" && BAYES_EXT_SANITIZE=1 FORCE_CUDA=0 CUDA_VISIBLE_DEVICES="" \
        "$PYTHON" setup.py -q build_ext --inplace >"$log" 2>&1); then
    grep -nE 'error|Error' "$log" | head -40 >&2 || true
    echo "----- last 40 lines of $log -----" >&2
    tail -n 40 "$log" >&2
    say "sanitized build FAILED" >&2
    exit 1
  fi
  echo "$STAMP" >"$STAMP_FILE"
  say "built in $((SECONDS - start))s"
fi

# --- 3. the op tests under ASan + UBSan ----------------------------------------------------------
export LD_PRELOAD="$LIBASAN:$LIBSTDCXX${LD_PRELOAD:+:$LD_PRELOAD}"
# Python and torch keep allocations until exit by design: leak reports would be noise.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:${UBSAN_OPTIONS:-}"
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-sanitize}"
export BAYES_EXT_FORCE_PYTHON=0
export PYTHONDONTWRITEBYTECODE=1
unset BAYES_EXT_CPU_ISA

cd "$SRC"
# The copy's package (not the editable install of the main tree) must be the one imported, with
# the sanitized kernels loaded.
"$PYTHON" - "$SRC" <<'EOF'
import os, sys
import bayes_ext
want = os.path.realpath(os.path.join(sys.argv[1], "bayes_ext"))
got = [os.path.realpath(p) for p in bayes_ext.__path__]
assert got == [want], f"imported bayes_ext from {got}, expected {want}"
assert bayes_ext.extension_available(), bayes_ext.extension_load_error()
import torch
print(f"sanitize: kernels loaded from {want} (cpu isa {torch.ops.bayes_ext.cpu_kernel_isa()})")
EOF

if (($# == 0)); then
  # (+ the conv layer op: its views of the 4-D weights as 2-D and the in-place weight gradient)
  set -- tests/test_sample_op.py tests/test_philox.py tests/test_properties.py tests/test_limits.py \
    tests/test_conv_layer_op.py
fi
say "running pytest $* under ASan/UBSan"
start=$SECONDS
set +e
"$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" "$@" 2>&1 | tee "$WORK/pytest.log"
rc=${PIPESTATUS[0]}
set -e
say "tests took $((SECONDS - start))s (exit $rc)"
# A report from a subprocess (or one that did not fail its test) must fail the stage too.
REPORT='AddressSanitizer|runtime error:|LeakSanitizer|UndefinedBehaviorSanitizer'
if grep -qE "$REPORT" "$WORK/pytest.log"; then
  say "sanitizer report(s) found:" >&2
  grep -nE -A8 "$REPORT" "$WORK/pytest.log" | head -60 >&2
  exit 1
fi
if ((rc == 5)); then
  say "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
