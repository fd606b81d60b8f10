#!/usr/bin/env bash
# The core's GPU checks in one call (sized for ~8 minutes on one H200/H100):
#
#   bash benchmarks/gpu_checks.sh OUT
#
#   1. pytest -m gpu: the CUDA test matrix (tests/test_gpu_*.py, the fp8 kernel tests)
#   2. routing_overhead.py: host cost per call, pinned kernels and decode steps included
#   3. compile_shapes.py: compiled Flux/Wan across resolutions, stock vs patched (graphs, recompiles, time)
#   4. generate_timing.py: generate through attnpatch vs stock (Qwen2.5-0.5B, Llama-8B configs)
#   5. usability_gpu_check.py: the names table, CLI commands and report on the GPU
#
# Each step has its own time limit (STEP_TIMEOUT_* override) and its failure does not stop the others.
# With BUILD_KERNELS_DIR=DIR (holding the source tarballs), benchmarks/build_kernels.sh starts in the
# background (setsid) once the timing-sensitive steps are done.
# Needs diffusers importable (carry the wheels: ../shared/gpu/wheels.sh).
set -u
cd "$(dirname "$0")/.."
OUT="${1:?usage: gpu_checks.sh OUT}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
STATUS="$OUT/status.txt"
: > "$STATUS"
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c "import torch, attnpatch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); [print(' ', b.name, b.version, 'available' if b.available else 'unavailable: ' + b.why_not) for b in attnpatch.backends()]" 2>&1
} > "$OUT/environment.txt"

step() {
  local name="$1" limit="$2"; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local msg="ok"
  [ $rc -eq 124 ] && msg="TIMED OUT after ${limit}s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && msg="FAILED rc=$rc"
  echo "$name: $msg [$((SECONDS - t0))s]" | tee -a "$STATUS"
  tail -n 4 "$OUT/$name.log"
}

step gpu_tests "${STEP_TIMEOUT_TESTS:-160}" "$PY" -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_gpu_core.py tests/test_gpu_backends.py tests/test_fp8_kernel.py --maxfail=20 -o addopts=""
step routing_overhead "${STEP_TIMEOUT_ROUTING:-60}" "$PY" benchmarks/routing_overhead.py --out "$OUT" --repeats 31
step generate_timing "${STEP_TIMEOUT_GENERATE:-110}" "$PY" benchmarks/generate_timing.py --out "$OUT" --new-tokens 96
if [ -n "${BUILD_KERNELS_DIR:-}" ]; then  # the timing-sensitive steps are done: build kernels meanwhile
  echo "== starting build_kernels.sh $BUILD_KERNELS_DIR in the background"
  MAX_JOBS="${BUILD_JOBS:-12}" setsid nohup bash benchmarks/build_kernels.sh "$BUILD_KERNELS_DIR" sage2 fa3 \
    > "$BUILD_KERNELS_DIR/build_all.log" 2>&1 < /dev/null &
fi
step compile_shapes "${STEP_TIMEOUT_COMPILE:-160}" "$PY" benchmarks/compile_shapes.py --out "$OUT" --layers 2
step usability "${STEP_TIMEOUT_USABILITY:-40}" "$PY" benchmarks/usability_gpu_check.py --out "$OUT"
cat "$STATUS"
