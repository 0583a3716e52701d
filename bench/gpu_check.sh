#!/usr/bin/env bash
# The GPU check (issue 8), for the lent H100/H200 machine: build, the CUDA tests with compute-sanitizer
# beside them, GPU benchmark, the transformer step eager and CUDA-graphed (graphed_step.py), Nsight
# Compute on the sampling kernels. With GPU_CHECK_DIAG=1 also: a torch.profiler of the bf16 steps, the
# host time of a layer call piece by piece (overhead.py), what is alive at the peak of the
# 64 x 4096 x 4096 fp32 sample_nbr=3 step (memory_snapshot.py).
# Everything lands in $OUT (at most 8 files come back). On an H200 (2026-11-28 05:56): build 79 s,
# tests 40 s, benchmark 150 s, graphed 25 s, ncu 8 s, memcheck ~110 s (now beside the tests): ~380 s;
# the diagnostics add 70 s (profile 18, host 37, memory snapshot 12). Budget: < 8 minutes.
# GPU_CHECK_CASES=linear,bayes_ext GPU_CHECK_NCU=0 ~310 s.
#
# Prepare here, once (the reference layers travel as wheels; the machine has no network):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl \
#       blitz-bayesian-pytorch==0.2.8 bayesian-torch==0.5.0 torchbnn==1.2
# Then call the device tool from the repo root:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=460)
#
# compute-sanitizer modes: GPU_CHECK_SANITIZER=memcheck (default) | racecheck | none.
# GPU_CHECK_NCU=0 skips Nsight Compute; GPU_CHECK_BENCH_S bounds the benchmark (default 220 s);
# GPU_CHECK_BENCH=0 skips the benchmark, the graphed step and the diagnostics (a short rerun of the tests
# after a fix);
# GPU_CHECK_CASES=linear,bayes_ext benchmarks those cases only (bench_layers.py --cases; a rerun).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/bayes_ext_gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME TIMEOUT_S LOG COMMAND...: runs, records time and status in summary.txt
  local name="$1" limit="$2" log="$3"
  shift 3
  local start=$SECONDS rc=0
  timeout "$limit" "$@" > "$log" 2>&1 || rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$SUMMARY"
  tail -n 5 "$log"
  return "$rc"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -c \
  'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'; } \
  >> "$SUMMARY" 2>&1

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
# torch's CUDA headers include cuBLAS/cuSPARSE headers: take them from torch's nvidia wheels when the
# toolkit lacks them (as on the CPU machine's compile check).
NV_INC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13/include"
if [[ -d "$NV_INC" ]] && ! echo '#include <cublas_v2.h>' | nvcc -x cu -E - -o /dev/null 2>/dev/null; then
  export CPATH="$NV_INC${CPATH:+:$CPATH}"
fi
{ nvcc --version | tail -n 2; "$PY" -c 'import setuptools; print("setuptools", setuptools.__version__)'; } >> "$SUMMARY" 2>&1
# When pip cannot (say, an older setuptools that rejects pyproject's metadata): setup.py alone.
BUILD_INPLACE='tmp=$(mktemp -d); mv pyproject.toml "$tmp/" && "$0" setup.py build_ext --inplace; rc=$?; mv "$tmp/pyproject.toml" .; exit $rc'
if ! step build 240 "$OUT/build.log" "$PY" -m pip install -v --no-build-isolation --no-deps -e .; then
  step build-inplace 240 "$OUT/build2.log" bash -c "$BUILD_INPLACE" "$PY"; rc=$?
  cat "$OUT/build2.log" >> "$OUT/build.log" && rm -f "$OUT/build2.log"  # at most 8 files come back
  ((rc == 0)) || exit 1
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
grep -iE 'warning' "$OUT/build.log" | grep -viE 'setuptools|deprecat' | head -n 20 >> "$SUMMARY"
"$PY" -c 'import bayes_ext, torch; assert bayes_ext.extension_available(), bayes_ext.extension_load_error(); print(torch.ops.bayes_ext.sample_weight.default)' \
  >> "$SUMMARY" 2>&1 || { echo "extension did not load" | tee -a "$SUMMARY"; exit 1; }

# compute-sanitizer runs beside the plain test run (neither is timed; the peak-memory tests read
# their own process's allocator): side by side they take the sanitizer's ~110 s, one after the
# other 150 s (H200, 2026-11-28).
sanitizer() {
  case "${GPU_CHECK_SANITIZER:-memcheck}" in
    none) ;;
    # the compiled kernels only (the fallback runs torch's own kernels), no graph capture (unsupported
    # there), no test that reads kernel names from the profiler (CUPTI refuses a second subscriber:
    # H200, 2026-11-27), no peak-memory test: under memcheck the Python op's step read 3 weight copies above
    # nn.Linear where the plain run reads at most 1.1 (H100, 2026-11-26; cause not established), and
    # the allocator's accounting is not what memcheck checks; no float64 gradgradcheck (its hundreds of
    # forwards ran for minutes under memcheck and did not finish: conv_lrt and the LSTM's per-step
    # native kernels, H200, 2026-11-28; the same kernels run in the other tests)
    *) step "sanitizer-${GPU_CHECK_SANITIZER:-memcheck}" 240 "$OUT/sanitizer.log" compute-sanitizer \
         --tool "${GPU_CHECK_SANITIZER:-memcheck}" --error-exitcode 3 "$PY" -m pytest -q tests/test_cuda.py \
         tests/test_cuda_layers.py -p no:cacheprovider -k "compiled and not graph and not captured and not memory and not launches_one_kernel and not second_derivatives" ;;
  esac
}
sanitizer &
SANITIZER_PID=$!
# no -x: one failure must not hide the others (the GPU time is too short for a second look)
step cuda-tests 150 "$OUT/cuda_tests.log" "$PY" -m pytest -q -rfE tests/test_cuda.py tests/test_cuda_layers.py \
  -p no:cacheprovider
wait "$SANITIZER_PID"
if [[ "${GPU_CHECK_BENCH:-1}" == "1" ]]; then
  step gpu-bench "${GPU_CHECK_BENCH_S:-220}" "$OUT/bench.log" "$PY" bench/bench_layers.py --device cuda --out "$OUT/bench" \
    ${GPU_CHECK_CASES:+--cases "$GPU_CHECK_CASES"}
  # where the bf16 steps spend their time (appended to the summary: at most 8 files come back)
  if [[ "${GPU_CHECK_DIAG:-0}" == "1" ]]; then
    step profile 90 "$OUT/profile.log" "$PY" bench/profile_gpu.py --amp bf16
    cat "$OUT/profile.log" >> "$SUMMARY" && rm -f "$OUT/profile.log"
  fi
  # the GPT-2-small step eager and CUDA-graphed side by side (its own process: a capture that goes
  # wrong cannot take the benchmark's results with it); the table goes to the summary
  step graphed 120 "$OUT/graphed.log" "$PY" bench/graphed_step.py --amp bf16
  cat "$OUT/graphed.log" >> "$SUMMARY" && rm -f "$OUT/graphed.log"
  if [[ "${GPU_CHECK_DIAG:-0}" == "1" ]]; then
    # host time per layer call, piece by piece, and the operators each training step issues (the
    # eager bf16 steps are host-bound); to the summary
    step host 60 "$OUT/host.log" bash -c '"$0" bench/overhead.py --device cuda --amp fp32 --ops && "$0" bench/overhead.py --device cuda --amp bf16 --ops' "$PY"
    cat "$OUT/host.log" >> "$SUMMARY" && rm -f "$OUT/host.log"
    # the blocks alive at the peak of the step that stays over issue 8's memory target (1.06 MiB over
    # on the H200, 2026-11-27 16:39; 4096^3 bf16, the script's default, is under it since); to the summary
    step memory-snapshot 60 "$OUT/memory_snapshot.log" "$PY" bench/memory_snapshot.py --shape 64 4096 4096 --amp fp32
    cat "$OUT/memory_snapshot.log" >> "$SUMMARY" && rm -f "$OUT/memory_snapshot.log"
  fi
fi
# Nsight Compute's speed-of-light of the sampling kernels (second launch of each: after warm-up)
if [[ "${GPU_CHECK_NCU:-1}" == "1" ]]; then
  step ncu 60 "$OUT/ncu.log" ncu --clock-control none --section SpeedOfLight --section Occupancy \
    -k "regex:forward_kernel|backward_kernel" --launch-skip 2 --launch-count 2 "$PY" bench/ncu_sample_op.py
  cat "$OUT/ncu.log" >> "$SUMMARY" && rm -f "$OUT/ncu.log"
fi
cat "$SUMMARY"
