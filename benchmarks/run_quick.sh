#!/usr/bin/env bash
# The GPU session behind benchmarks/results/{decode,gate,e2e}-h100.json: correctness of the
# Triton kernels on the GPU, then the key benchmark points, each step capped so the whole
# run fits one 10-minute call of a lent GPU machine. Results land in $OUT (default ./out).
#   bash benchmarks/run_quick.sh            # then: python benchmarks/merge.py ... / plot.py
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH} SEERATTN_BACKEND=${SEERATTN_BACKEND:-triton}
step() {  # step SECONDS LOGNAME command...: run capped, keep the full log, show its tail
  local t=$1 log=$2; shift 2
  echo "=== [$(date +%T)] $*"
  timeout -k 5 "$t" "$@" > "$OUT/$log" 2>&1; local rc=$?
  tail -8 "$OUT/$log"; echo "=== rc=$rc"
}
step 120 decode.log python benchmarks/bench_decode.py --quick --backends triton --peers sdpa --max-seconds 105 --out "$OUT/decode.json"
step 150 e2e.log python benchmarks/bench_e2e.py --context 32k --batch 4 --budgets 4k --methods dense-flashdecode,seerattn --modes graph --max-seconds 140 --out "$OUT/e2e.json"
SEERATTN_HYPOTHESIS=gpu step 120 tests.log python -m pytest -m gpu tests/test_ops.py -k cuda-triton -q -p no:cacheprovider
step 40 gate.log python benchmarks/bench_gate.py --quick --max-seconds 35 --out "$OUT/gate.json"
# Compiled end to end (about 2 minutes per method, most of it compiling): one call each.
[ -n "${COMPILED:-}" ] && for m in seerattn dense-flashdecode; do
  step 300 "e2e-compiled-$m.log" python benchmarks/bench_e2e.py --context 32k --batch 4 --budgets 4k --methods "$m" --modes compiled --max-seconds 290 --out "$OUT/e2e.json"
done
echo "=== [$(date +%T)] done"
