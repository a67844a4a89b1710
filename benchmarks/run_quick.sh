#!/usr/bin/env bash
# The GPU session behind benchmarks/results/{decode,gate,e2e}-<gpu>.json, in two parts that
# each fit one 10-minute call of a lent GPU machine (every step is capped). Results land in
# $OUT (default ./out); merge and plot them with benchmarks/merge.py and plot.py.
#   bash benchmarks/run_quick.sh kernels   # GPU tests, gate cost, kernel grid (quick subset)
#   bash benchmarks/run_quick.sh e2e       # end to end: CUDA graphs, then torch.compile
#   bash benchmarks/run_quick.sh grid      # the full kernel grid, resumable (GRID_SECONDS each call)
#   bash benchmarks/run_quick.sh profile   # sparse_decode's kernels: torch profiler, then ncu
# PEERS (default "sdpa,flex"; "sdpa" for grid) picks the dense/sparse peers of the kernel grid;
# BACKENDS (default auto) the seerattn backends of grid and profile.
set -u
cd "$(dirname "$0")/.."
part=${1:-kernels}
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH} SEERATTN_BACKEND=${SEERATTN_BACKEND:-triton}
step() {  # step SECONDS LOGNAME command...: run capped, keep the full log, show its tail
  local t=$1 log=$2; shift 2
  echo "=== [$(date +%T)] $*"
  timeout -k 5 "$t" "$@" > "$OUT/$log" 2>&1; local rc=$?
  tail -8 "$OUT/$log"; echo "=== rc=$rc"
}
# A command, not a shell function: `timeout` can only run the former.
pytest_gpu=(python -m pytest -m gpu -q -p no:cacheprovider --durations=5)
case $part in
kernels)
  # Every Triton kernel against its reference on the GPU (200 examples per op for the
  # attention and gate kernels, the default profile for the rest).
  SEERATTN_HYPOTHESIS=gpu step 150 tests.log "${pytest_gpu[@]}" tests/test_ops.py tests/test_gate_kernels.py
  step 110 tests-more.log "${pytest_gpu[@]}" tests/test_gate_fused.py tests/test_gate_select_op.py tests/test_attn_block_max.py \
    tests/test_integration.py tests/test_compile_model.py
  step 45 gate.log python benchmarks/bench_gate.py --quick --max-seconds 40 --out "$OUT/gate.json"
  step 170 decode.log python benchmarks/bench_decode.py --quick --backends triton --peers "${PEERS:-sdpa,flex}" \
    --max-seconds 160 --out "$OUT/decode.json"
  ;;
e2e)
  step 100 e2e.log python benchmarks/bench_e2e.py --context 32k --batch 4 --budgets 4k \
    --methods dense-flashdecode,seerattn --modes graph --max-seconds 90 --out "$OUT/e2e.json"
  # Compiled (most of it compiling): one process per method so each gets its own cap.
  for m in seerattn dense-flashdecode; do
    step 210 "e2e-compiled-$m.log" python benchmarks/bench_e2e.py --context 32k --batch 4 --budgets 4k \
      --methods "$m" --modes compiled --max-seconds 200 --out "$OUT/e2e.json"
  done
  ;;
grid)
  # Points already in $OUT/decode-grid.json are skipped: the same command resumes.
  secs=${GRID_SECONDS:-400}
  step $((secs + 40)) decode-grid.log python benchmarks/bench_decode.py --backends "${BACKENDS:-auto}" \
    --peers "${PEERS:-sdpa}" --max-seconds "$secs" --out "$OUT/decode-grid.json" ${GRID_ARGS:-}
  ;;
profile)
  for point in "1 32k" "16 32k"; do
    set -- $point
    step 75 "profile-b$1.log" python benchmarks/profile_sparse_decode.py --batch "$1" --tokens "$2" \
      --backends "${BACKENDS:-triton,tilelang}" --torch-profiler
    step 100 "ncu-b$1.log" ncu --clock-control none -k regex:"sparse_decode|combine" --launch-count 16 \
      --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy \
      --section MemoryWorkloadAnalysis python benchmarks/profile_sparse_decode.py --batch "$1" --tokens "$2" \
      --backends "${BACKENDS:-triton,tilelang}" --calls 2
  done
  ;;
*) echo "usage: $0 kernels|e2e|grid|profile" >&2; exit 2 ;;
esac
echo "=== [$(date +%T)] done"
