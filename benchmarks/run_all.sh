#!/usr/bin/env bash
# The benchmark suite of issue 6 in one command, results in one folder:
#
#   bash benchmarks/run_all.sh [OUT]          # default OUT: bench_out/<UTC date-time>
#   QUICK=1 bash benchmarks/run_all.sh /tmp/b # smoke run (CPU is fine)
#
# Steps (each one's failure or timeout does not stop the others; the kernel step writes its JSON after
# every shape, so a timeout keeps what was measured):
#   1. kernels.py          every backend, auto and the seed's router on the shape suite   (~3.5 min)
#   2. routing_overhead.py host cost per call: attnpatch vs the kernel vs diffusers        (~1 min)
#   3. patch_overhead.py   Flux-dev / Wan2.1 end to end: stock vs attnpatch vs diffusers   (~4 min)
# Sized to finish within ~9 minutes on one H100; STEP_TIMEOUT_* override the limits (seconds).
set -u
cd "$(dirname "$0")/.."
OUT="${1:-bench_out/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
QUICK_ARG=""
[ "${QUICK:-0}" = "1" ] && QUICK_ARG="--quick"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STATUS="$OUT/run_all.status"
: > "$STATUS"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "nvidia-smi: not available"
  "$PY" -c "import torch, attnpatch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version() if torch.cuda.is_available() else None); [print(' ', b.name, b.version, 'available' if b.available else 'unavailable: ' + b.why_not) for b in attnpatch.backends()]"
} > "$OUT/environment.txt" 2>&1

# run NAME TIMEOUT SCRIPT ARGS...: --out "$OUT" is passed when the script accepts it.
run() {
  local name="$1" limit="$2" script="$3"; shift 3
  if [ ! -f "$script" ]; then
    echo "$name: skipped ($script not found)" | tee -a "$STATUS"; return
  fi
  local out_arg=()
  if "$PY" "$script" --help 2>/dev/null | grep -q -- "--out"; then out_arg=(--out "$OUT"); fi
  local quick=()
  if [ -n "$QUICK_ARG" ] && "$PY" "$script" --help 2>/dev/null | grep -q -- "--quick"; then quick=(--quick); fi
  echo "== $name (limit ${limit}s): $script ${out_arg[*]} ${quick[*]} $*"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=20 "$limit" "$PY" "$script" "${out_arg[@]}" "${quick[@]}" "$@" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  local msg="ok"
  [ $rc -eq 124 ] && msg="TIMED OUT after ${limit}s (partial results kept)"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && msg="FAILED rc=$rc (see $name.log)"
  echo "$name: $msg [$((SECONDS - t0))s]" | tee -a "$STATUS"
  tail -n 3 "$OUT/$name.log"
}

run kernels "${STEP_TIMEOUT_KERNELS:-240}" benchmarks/kernels.py --budget-s "${KERNELS_BUDGET_S:-200}"
run routing_overhead "${STEP_TIMEOUT_ROUTING:-70}" benchmarks/routing_overhead.py
run patch_overhead "${STEP_TIMEOUT_PATCH:-230}" benchmarks/patch_overhead.py

echo "results in $OUT:"; ls "$OUT"; cat "$STATUS"
