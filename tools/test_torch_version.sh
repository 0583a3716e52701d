#!/usr/bin/env bash
# Runs the test suite against another torch than CI's 2.13, e.g. the oldest supported one:
#   bash tools/test_torch_version.sh 2.4.1 [pytest args...]
#   PYTHON=/path/to/python3.9 bash tools/test_torch_version.sh 2.4.1   (default: python3.11)
# Not part of CI: PyPI's torch wheels before 2.13's local CPU build are CUDA builds (~3 GB with their
# nvidia-* dependencies; they run on the CPU without a GPU). It makes a venv in /tmp/bayes_ext_torch-X
# (-pyY.Z with another Python than 3.11), a clean copy of the committed tree (git worktree) beside
# it, builds the kernels there in place and runs `pytest tests -m "not slow"` (or pytest with the
# given args). Tests that an old torch cannot pass for a reason of its own skip there with that
# reason (tests/helpers.py: needs_torch); README "Torch versions".
set -euo pipefail

VERSION="${1:?usage: tools/test_torch_version.sh TORCH_VERSION [pytest args...]}"
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
DIR="/tmp/bayes_ext_torch-$VERSION"
[[ "$PY_VERSION" == "3.11" ]] || DIR="$DIR-py$PY_VERSION"
VENV="$DIR/venv"
TREE="$DIR/tree"
say() { echo "test_torch_version: $*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
  say "installing torch==$VERSION and the test tools into $VENV"
  "$VENV/bin/pip" install -q "torch==$VERSION" numpy pytest hypothesis scipy scikit-learn ninja \
    "setuptools>=77" wheel
fi
rm -rf "$TREE"
git -C "$ROOT" worktree prune
git -C "$ROOT" worktree add -q --detach "$TREE" HEAD
say "building bayes_ext in $TREE against torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
(cd "$TREE" && PATH="$VENV/bin:$PATH" MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" setup.py build_ext --inplace \
  >"$TREE/build.log" 2>&1) || { tail -30 "$TREE/build.log"; exit 1; }
(($# == 0)) && set -- tests -m "not slow"
cd "$TREE"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"  # (pyproject's testpaths: tests/ without a path)
