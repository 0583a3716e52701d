#!/usr/bin/env bash
# Sets up a fresh machine and runs the layer benchmark: bash bench/run.sh [--quick|--full] [--device cuda]
#   1. tools/setup_env.sh: .venv with the pinned CPU torch, bayes_ext built editable;
#   2. the reference layers and the report tools, at the versions the benchmark was checked with
#      (--no-deps for the references: BLiTZ declares torchvision, which it only needs for examples,
#      and an unpinned torch dependency would pull a multi-GB CUDA build);
#   3. python bench/bench_layers.py "$@"  (results in bench/results/).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup_env.sh
VENV="${BAYES_EXT_VENV:-$ROOT/.venv}"
PYTHON="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

REFS=(blitz-bayesian-pytorch==0.2.8 bayesian-torch==0.5.0 torchbnn==1.2)
EXTRAS=(matplotlib==3.11.2 tqdm==4.70.1)
have_all() {
  "$PYTHON" - "$@" <<'PY'
import sys
from importlib import metadata
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        if metadata.version(name) != want:
            sys.exit(1)
    except metadata.PackageNotFoundError:
        sys.exit(1)
PY
}
if ! have_all "${REFS[@]}" "${EXTRAS[@]}"; then
  echo "bench/run.sh: installing ${REFS[*]} ${EXTRAS[*]}"
  "$PYTHON" -m pip install -q --no-deps "${REFS[@]}"
  "$PYTHON" -m pip install -q "${EXTRAS[@]}"
fi

exec "$PYTHON" bench/bench_layers.py "$@"
