#!/usr/bin/env bash
# The budget campaign (issue 12) in one command for one lent GPU: better teachers chosen on dev, then
# SparseBERT students at >= 20,000 steps side by side on the one GPU, dev metrics every 1,000 steps.
#
#   here:  .venv/bin/python bench/gpu_pack.py pack gpu_pack          (git-ignored, < 60 MiB)
#   there: bash bench/gpu_campaign.sh       (device tool: carry ["gpu_pack"], timeout_s 600)
#   here, at tiny size on CPU (tests/test_gpu_campaign.py runs this so it cannot rot):
#          PYTHON=.venv/bin/python SCALE=tiny bash bench/gpu_campaign.sh
#
# Phase 1, teachers in parallel, each the final checkpoint of its run, the best on dev kept:
#   MRPC lr {5e-5, 1e-4} x {3, 5} epochs (linear decay); SST-2 (all 67,349 sentences, 1 epoch) and
#   movie-rating (3 epochs) at lr {5e-5, 1e-4}.
# Phase 2, students in parallel (bf16 by --mixed-precision auto on the GPU), 20,000 steps each, cubic
#   pruning over the first 70%, linear LR decay: MRPC 90% and 95% with --augment 20, MRPC 90% without,
#   SST-2 90%, movie-rating 90%.
# Every job is stopped (SIGTERM: a checkpoint at a step boundary) when the time budget runs out.
# Progress every 30 s; $OUT/results.json (curves, teachers, sparsity) is rewritten as it goes, so a
# campaign cut short still reports every evaluation it reached.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PACK=${PACK:-gpu_pack}
OUT=${OUT:-runs/gpu}
RUNS=${RUNS:-/tmp/sparsebert-gpu}
SCALE=${SCALE:-full}
BUDGET=${BUDGET:-540}  # seconds for the whole campaign
START=$SECONDS
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SPARSEBERT_CACHE=$RUNS/cache
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

if [ "$SCALE" = tiny ]; then
  TEACHER=(--max-steps 4 --max-train-examples 64 --max-eval-examples 32 --max-seq-length 32 --batch-size 8)
  STUDENT=(--max-steps 6 --eval-every 3 --max-train-examples 64 --max-eval-examples 32 --max-seq-length 32 --batch-size 8)
  AUGMENT=1
else
  TEACHER=(--eval-every 0 --save-every 100000)
  STUDENT=(--max-steps 20000 --eval-every 1000 --save-every 5000)
  AUGMENT=20
fi
mkdir -p "$RUNS" "$OUT"
echo "campaign: scale $SCALE, budget ${BUDGET}s, runs in $RUNS, results in $OUT/results.json"
"$PY" - <<'EOF'
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.cuda.is_available()}",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
"$PY" bench/gpu_pack.py unpack "$PACK" "$RUNS/minilm-l6" || exit 1
MODEL=$RUNS/minilm-l6
DATA=$PACK/data

run() {  # run NAME sparsebert-arguments...: one job in the background, its output in $RUNS/NAME.out
  # Past the campaign's budget the job gets SIGTERM: it stops at a step boundary with a checkpoint.
  local name=$1 left=$((BUDGET - (SECONDS - START) - 25))
  shift
  timeout -s TERM -k 30 $((left > 1 ? left : 1)) "$PY" -m sparsebert -q "$@" --output-dir "$RUNS/$name" \
    --overwrite >"$RUNS/$name.out" 2>&1 &
  echo "$!" >"$RUNS/$name.pid"
}

progress() {  # rewrite results.json every 30 s until the campaign ends
  local n=0
  while [ ! -e "$RUNS/.done" ]; do
    sleep 1
    if ((++n % 30 == 0)); then
      echo "[$((SECONDS - START)) s]"
      "$PY" bench/gpu_pack.py summarize "$RUNS" "$OUT/results.json" --print
    fi
  done
}

finish_phase() {  # wait for every job; report the ones that failed or ran out of time
  local failed=0 code
  for pidfile in "$RUNS"/*.pid; do
    [ -e "$pidfile" ] || continue
    wait "$(cat "$pidfile")"
    code=$?
    if [ $code -eq 124 ] || [ $code -eq 130 ]; then
      echo "stopped at the time budget: $(basename "$pidfile" .pid)"
    elif [ $code -ne 0 ]; then
      echo "FAILED ($code): $(basename "$pidfile" .pid)"
      tail -n 5 "${pidfile%.pid}.out"
      failed=1
    fi
    rm -f "$pidfile"
  done
  return $failed
}

rm -f "$RUNS/.done"
progress &
PROGRESS=$!
trap 'touch "$RUNS/.done"; wait $PROGRESS' EXIT

echo "phase 1: teachers"
for lr in 5e-5 1e-4; do
  for epochs in 3 5; do
    run "teacher-mrpc-lr$lr-e$epochs" finetune --model "$MODEL" --task mrpc --data-dir "$DATA/MRPC" \
      --lr "$lr" --epochs "$epochs" "${TEACHER[@]}"
  done
  run "teacher-sst2-lr$lr" finetune --model "$MODEL" --task sst2 --data-dir "$DATA/SST-2" \
    --lr "$lr" --epochs 1 --max-seq-length 64 "${TEACHER[@]}"
  run "teacher-rating-lr$lr" finetune --model "$MODEL" --task movie-rating --data-dir "$DATA/movie-rating" \
    --lr "$lr" --epochs 3 --max-seq-length 64 "${TEACHER[@]}"
done
finish_phase
T_MRPC=$("$PY" bench/gpu_pack.py choose-teacher "$RUNS" teacher-mrpc accuracy) || exit 1
T_SST2=$("$PY" bench/gpu_pack.py choose-teacher "$RUNS" teacher-sst2 accuracy) || exit 1
T_RATING=$("$PY" bench/gpu_pack.py choose-teacher "$RUNS" teacher-rating pearson) || exit 1
echo "teachers: $T_MRPC $T_SST2 $T_RATING (after $((SECONDS - START)) s)"

echo "phase 2: students"
COMMON=(prune --student "$MODEL" --lr 1e-4 --lr-schedule linear --warmup-ratio 0.02 --prune-end 0.7 "${STUDENT[@]}")
run student-mrpc-90-aug "${COMMON[@]}" --teacher "$T_MRPC" --task mrpc --data-dir "$DATA/MRPC" --sparsity 0.9 --augment $AUGMENT
run student-mrpc-95-aug "${COMMON[@]}" --teacher "$T_MRPC" --task mrpc --data-dir "$DATA/MRPC" --sparsity 0.95 --augment $AUGMENT
run student-mrpc-90 "${COMMON[@]}" --teacher "$T_MRPC" --task mrpc --data-dir "$DATA/MRPC" --sparsity 0.9
run student-sst2-90 "${COMMON[@]}" --teacher "$T_SST2" --task sst2 --data-dir "$DATA/SST-2" --sparsity 0.9 --max-seq-length 64
run student-rating-90 "${COMMON[@]}" --teacher "$T_RATING" --task movie-rating --data-dir "$DATA/movie-rating" \
  --sparsity 0.9 --max-seq-length 64
finish_phase
STATUS=$?
"$PY" bench/gpu_pack.py summarize "$RUNS" "$OUT/results.json" --print
echo "campaign done in $((SECONDS - START)) s; results in $OUT/results.json"
exit $STATUS
