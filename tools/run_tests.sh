#!/usr/bin/env bash
# The project's test command: sets up .venv (tools/setup_env.sh: pinned CPU torch, test tools,
# bayes_ext built and installed editable), then runs the Python tests with the venv's python.
# Without arguments it runs every test not marked slow (what CI and the README run); arguments go
# to pytest instead, e.g.
#   bash tools/run_tests.sh -m ""                # everything, slow tests included
#   bash tools/run_tests.sh tests/test_x.py -k y
# The tests cover both backends (compiled kernels and pure PyTorch) themselves.
# "No tests collected" (pytest exit code 5) is a failure.
# The C++ tests are tools/run_cpp_tests.sh; .ci/run runs both.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup_env.sh
PYTHON="${BAYES_EXT_VENV:-$ROOT/.venv}/bin/python"

if (($# == 0)); then
  set -- -m "not slow" --durations=15
fi
set +e
"$PYTHON" -m pytest -q tests "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "run_tests: pytest collected no tests (exit code 5): treating that as a failure" >&2
  exit 1
fi
exit $rc
