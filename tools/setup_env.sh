#!/usr/bin/env bash
# Sets up the development environment in the repository root, idempotently:
#   1. creates .venv (Python 3.11, or python3 if it is 3.9 or newer) if it is missing;
#   2. installs the pinned CPU build of torch and the test tools, only those whose installed
#      version differs from the pin;
#   3. builds bayes_ext's kernels and installs the package editable
#      (pip install --no-build-isolation --no-deps -e .), unless the sources, setup.py and torch
#      are unchanged since the last build.
# Prints what it did. Run from anywhere: bash tools/setup_env.sh
#
# Environment:
#   BAYES_EXT_VENV=path     venv to use (default: <repo>/.venv)
#   BAYES_EXT_REBUILD=1     rebuild bayes_ext even if nothing changed
#   BAYES_EXT_NO_EXTENSION, BAYES_EXT_SANITIZE   passed to setup.py (part of the build stamp)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${BAYES_EXT_VENV:-$ROOT/.venv}"
say() { echo "setup_env: $*"; }

# Pins known to install on this machine's Python 3.11 (torch 2.13.0 is the CPU build on local disk;
# an unpinned torch would pull a multi-GB CUDA build).
PINS=(
  "torch==2.13.0"
  "numpy==2.4.6"
  "pytest==9.2.0"
  "hypothesis==6.170.17"
  "scipy==1.17.1"
  "scikit-learn==1.9.1"
  "ninja==1.13.2"
  "setuptools==84.2.1"
  "wheel==0.48.0"
)

# --- 1. the venv ---------------------------------------------------------------------------------
pick_python() {
  if command -v python3.11 >/dev/null 2>&1; then
    echo python3.11
    return
  fi
  if command -v python3 >/dev/null 2>&1 &&
     python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)'; then
    echo python3
    return
  fi
  echo "setup_env: need python3.11 (or python3 >= 3.9) on PATH" >&2
  exit 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
  PY="$(pick_python)"
  "$PY" -m venv "$VENV"
  say "created $VENV with $("$VENV/bin/python" --version 2>&1)"
else
  say "using $VENV ($("$VENV/bin/python" --version 2>&1))"
fi
PYTHON="$VENV/bin/python"
# setup.py looks for ninja on PATH; the venv's ninja must win.
export PATH="$VENV/bin:$PATH"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# --- 2. pinned packages --------------------------------------------------------------------------
# Prints the pins whose installed version differs (torch must also be a CPU build).
missing_pins() {
  "$PYTHON" - "$@" <<'EOF'
import sys
from importlib import metadata

for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        print(pin)
        continue
    base, _, local = have.partition("+")
    if base != want or (name == "torch" and local not in ("", "cpu")):
        print(pin)
EOF
}

mapfile -t TODO < <(missing_pins "${PINS[@]}")
if ((${#TODO[@]})); then
  say "installing ${TODO[*]}"
  start=$SECONDS
  # One pip call with every pin, so the resolver keeps the ones already right.
  # pip's "Location ... is ignored" notices about this machine's local indexes are noise.
  log="$(mktemp)"
  if ! "$PYTHON" -m pip install -q "${PINS[@]}" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    say "pip install FAILED" >&2
    exit 1
  fi
  grep -v 'is ignored: it is neither a file nor a directory' "$log" || true
  rm -f "$log"
  say "packages installed in $((SECONDS - start))s"
  mapfile -t STILL < <(missing_pins "${PINS[@]}")
  if ((${#STILL[@]})); then
    say "still not at the pinned version after install: ${STILL[*]}" >&2
    exit 1
  fi
else
  say "packages already at their pins (${PINS[*]})"
fi
if [[ -n "$("$PYTHON" -c 'import torch; print(torch.version.cuda or "")')" ]]; then
  say "the torch in $VENV is a CUDA build; this environment expects torch==2.13.0+cpu" >&2
  exit 1
fi

# --- 3. bayes_ext, editable ----------------------------------------------------------------------
# The stamp covers everything the compiled kernels depend on.
build_stamp() {
  {
    echo "torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
    echo "python $("$PYTHON" -c 'import sys; print(sys.version)')"
    echo "env NO_EXTENSION=${BAYES_EXT_NO_EXTENSION:-} SANITIZE=${BAYES_EXT_SANITIZE:-} CUDA=${FORCE_CUDA:-}"
    find setup.py pyproject.toml csrc -type f \( -name '*.py' -o -name '*.toml' -o -name '*.cpp' \
      -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) -not -path 'csrc/tests/*' -print0 |
      sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
}

# The build is usable if the package imports and, when kernels were built, the library loads and
# registers torch.ops.bayes_ext.sample_weight.
build_works() {
  (cd / && "$PYTHON" - "$ROOT" <<'EOF' >/dev/null 2>&1)
import glob, os, sys
import torch
pkg_dir = os.path.join(sys.argv[1], "bayes_ext")
libs = []
if os.environ.get("BAYES_EXT_NO_EXTENSION", "0").lower() not in ("1", "true", "yes", "on"):
    libs = glob.glob(os.path.join(pkg_dir, "_C*.so"))
    if len(libs) != 1:
        sys.exit(1)
    torch.ops.load_library(libs[0])
    torch.ops.bayes_ext.sample_weight
import bayes_ext  # through the editable install (cwd is /)
assert [os.path.realpath(p) for p in bayes_ext.__path__] == [os.path.realpath(pkg_dir)], bayes_ext.__path__
# The package's own loader (bayes_ext/_backend.py) must have loaded the kernels too.
backend = getattr(bayes_ext, "_backend", None)
if libs and backend is not None and hasattr(backend, "extension_available"):
    assert backend.extension_available(), backend.extension_load_error()
EOF
}

STAMP_FILE="$VENV/.bayes_ext_build_stamp"
STAMP="$(build_stamp)"
if [[ "${BAYES_EXT_REBUILD:-0}" != "1" && -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$STAMP" ]] && build_works; then
  say "bayes_ext build up to date (sources and torch unchanged); BAYES_EXT_REBUILD=1 forces a rebuild"
else
  rm -f "$STAMP_FILE"
  say "building bayes_ext (pip install --no-build-isolation --no-deps -e .)"
  start=$SECONDS
  log="$(mktemp)"
  if ! "$PYTHON" -m pip install --no-build-isolation --no-deps -e . -v >"$log" 2>&1; then
    # The compiler's messages are in the middle of pip's verbose log: show the errors and the tail.
    grep -nE 'error|Error|ERROR' "$log" | grep -v 'Werror' | head -40 >&2 || true
    echo "----- last 60 lines of the build log -----" >&2
    tail -n 60 "$log" >&2
    rm -f "$log"
    say "bayes_ext build FAILED" >&2
    exit 1
  fi
  grep -iE '\bwarning\b' "$log" | grep -viE 'setuptools|deprecat|Location .* is ignored|license' | head -20 || true
  rm -f "$log"
  if ! build_works; then
    say "bayes_ext installed, but the package or its kernels do not load:" >&2
    (cd / && "$PYTHON" -c 'import glob, sys, torch; [torch.ops.load_library(p) for p in glob.glob(sys.argv[1] + "/bayes_ext/_C*.so")]; import bayes_ext, bayes_ext._backend as b; print(bayes_ext.__path__, b.extension_load_error())' "$ROOT") >&2 || true
    exit 1
  fi
  echo "$STAMP" >"$STAMP_FILE"
  say "built and installed bayes_ext (editable) in $((SECONDS - start))s"
fi
"$PYTHON" - <<'EOF'
import glob, torch
libs = glob.glob("bayes_ext/_C*.so")
print(f"setup_env: ready: torch {torch.__version__}, kernels: {libs[0] if libs else 'none (pure PyTorch)'}")
EOF
