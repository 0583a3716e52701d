#!/usr/bin/env bash
# Builds a bayes_ext wheel against .venv's torch (pip wheel --no-build-isolation), installs it into
# a fresh virtualenv that has only the same pinned CPU torch, and checks there that the compiled
# kernels load, that the wheel records the torch it was built for, and that a layer trains a step.
# Run from anywhere: bash tools/check_wheel.sh (after tools/setup_env.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${BAYES_EXT_VENV:-$ROOT/.venv}/bin/python"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# Build from a copy so the editable install's in-place _C and _build_info stay untouched.
mkdir -p "$WORK/src"
tar --exclude='./.venv*' --exclude='./build' --exclude='./.git' --exclude='*.so' \
  --exclude='./bayes_ext/_build_info.py' -cf - . | tar -xf - -C "$WORK/src"
start=$SECONDS
(cd "$WORK/src" && "$PYTHON" -m pip wheel -q --no-build-isolation --no-deps . -w "$WORK/dist")
wheel="$(ls "$WORK"/dist/bayes_ext-*.whl)"
echo "check_wheel: built $(basename "$wheel") in $((SECONDS - start))s"

torch_version="$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "torch==$torch_version" numpy
"$WORK/venv/bin/python" -m pip install -q --no-deps "$wheel"
(cd "$WORK" && "$WORK/venv/bin/python" - "$torch_version" <<'PY')
import sys
import torch
import bayes_ext
from bayes_ext import _build_info
from bayes_ext.modules import BayesianLinear

assert bayes_ext.__file__.startswith(sys.prefix), bayes_ext.__file__  # the installed wheel, not the tree
assert bayes_ext.extension_available(), bayes_ext.extension_load_error()
assert _build_info.TORCH_VERSION.split("+")[0] == sys.argv[1], _build_info.TORCH_VERSION
layer = BayesianLinear(8, 4)
(layer(torch.randn(3, 8)).sum() + layer.log_variational_posterior - layer.log_prior).backward()
assert layer.weight_rho.grad is not None
print(f"check_wheel: wheel installs in a fresh venv, kernels load ({torch.ops.bayes_ext.cpu_kernel_isa()}), "
      f"built for torch {_build_info.TORCH_VERSION}")
PY
