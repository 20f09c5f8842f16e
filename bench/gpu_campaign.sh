#!/usr/bin/env bash
# The budget campaign (issue 12) in one command for one lent GPU: better teachers chosen on dev, then
# SparseBERT students sized to the time left, side by side on the one GPU, dev metrics as they go.
#
#   here:  .venv/bin/python bench/gpu_pack.py pack gpu_pack          (git-ignored, < 60 MiB)
#   there: bash bench/gpu_campaign.sh       (device tool: carry ["gpu_pack"], timeout_s 600)
#   a long run (BENCHMARKS.md "On a GPU"): SST-2 at 90% for 8,000 steps, three students alone
#          TASKS=sst2 STEPS=8000 BUDGET=530 VARIANTS="s90:--sparsity 0.9" bash bench/gpu_campaign.sh
#          (a variant's options come last: "long:--max-steps 8000" gives one variant its own length), then
#          a second call on the warm machine continues each unfinished student from its checkpoint
#          (`prune --output-dir D --resume`; BENCHMARKS.md "On a GPU")
#   question answering (SQuAD v1.1 by article: 8,123 training questions, 1,204 dev; 384-token windows), 95% and
#          97% with the second-order criterion beside taylor, three seeds:
#          TASKS=squad VARIANTS="s95:--sparsity 0.95;s95-obs:--sparsity 0.95 --prune-criterion obs;s97-obs:--sparsity 0.97 --prune-criterion obs" bash bench/gpu_campaign.sh
#   (after the students: the int8 sparse engine's dev metrics on any 1x4 students, if this CPU has VNNI)
#   here, at tiny size on CPU (tests/test_gpu_campaign.py runs this so it cannot rot):
#          PYTHON=.venv/bin/python SCALE=tiny bash bench/gpu_campaign.sh
#
# One chain per task, the three side by side, so MRPC's students start while SST-2's teacher trains:
#   teachers (the final checkpoint of each run, the best on dev kept): MRPC lr {5e-5, 1e-4} x {3, 5}
#   epochs; SST-2 (all 67,349 sentences, 1 epoch) and movie-rating (3 epochs) at lr {5e-5, 1e-4}; squad (2
#   epochs) at lr {5e-5, 1e-4}, chosen on dev F1;
#   then students (bf16 by --mixed-precision auto on the GPU) with prune's defaults (taylor ranking, lr 3e-4
#   decayed linearly, cubic pruning over the first 90% of the steps), the weights' mean over the last 10%
#   saved beside the dev metrics of the last ones (--average-weights), MRPC with --augment 20, at 90% and
#   80% by default (a variant's options come last and win), seeds 42, 43, 44, once per recipe variant in
#   $VARIANTS ("name:options;name:options") on each task, so that variants compare seed for seed.
#   $TASKS picks the chains (default: all three). Each student's step count is $STEPS when set, else
#   planned from its teacher's measured speed, the number of students sharing the device and the time
#   left (at most 20,000), so that it reaches its target sparsity and its LR decays in time.
# Every job is stopped (SIGTERM: a checkpoint at a step boundary) when the time budget runs out.
# Progress every 30 s; $OUT/results.json (curves, teachers, sparsity) is rewritten as it goes, so a
# campaign cut short still reports every evaluation it reached.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PACK=${PACK:-gpu_pack}
OUT=$(realpath -m "${OUT:-runs/gpu}")
RUNS=${RUNS:-/tmp/sparsebert-gpu}
SCALE=${SCALE:-full}
BUDGET=${BUDGET:-540}  # seconds for the whole campaign
SEEDS=(42 43 44)
TASKS=${TASKS:-mrpc sst2 rating}
STEPS=${STEPS:-}
VARIANTS=${VARIANTS:-s90:--sparsity 0.9;s80:--sparsity 0.8}  # the defaults at two sparsities (none named: prune's 90%)
START=$SECONDS
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SPARSEBERT_CACHE=$RUNS/cache
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "$SCALE" = tiny ]; then
  TEACHER=(--max-steps 4 --max-train-examples 64 --max-eval-examples 32 --max-seq-length 32 --batch-size 8)
  STUDENT=(--max-train-examples 64 --max-eval-examples 32 --max-seq-length 32 --batch-size 8)
  AUGMENT=1
  SEEDS=(42)
else
  TEACHER=(--eval-every 0 --save-every 100000)
  STUDENT=(--save-every 2000)
  AUGMENT=20
fi
IFS=';' read -r -a VARIANT_LIST <<<"$VARIANTS"
read -r -a TASK_LIST <<<"$TASKS"
STUDENT_JOBS=$((${#TASK_LIST[@]} * ${#SEEDS[@]} * ${#VARIANT_LIST[@]}))
mkdir -p "$RUNS" "$OUT"
echo "campaign: scale $SCALE, budget ${BUDGET}s, runs in $RUNS, results in $OUT/results.json"
"$PY" - <<'PYEOF'
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.cuda.is_available()}",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PYEOF
"$PY" bench/gpu_pack.py unpack "$PACK" "$RUNS/minilm-l6" || exit 1
MODEL=$RUNS/minilm-l6
DATA=$PACK/data

run() {  # run NAME sparsebert-arguments...: one job in the background, its output in $RUNS/NAME.out
  # Past the campaign's budget the job gets SIGTERM: it stops at a step boundary with a checkpoint.
  local name=$1 left=$((BUDGET - (SECONDS - START) - 25))
  shift
  timeout -s TERM -k 30 $((left > 1 ? left : 1)) "$PY" -m sparsebert -q "$@" --output-dir "$RUNS/$name" \
    --overwrite >"$RUNS/$name.out" 2>&1 &
  PIDS+=("$!:$name")
}

wait_all() {  # wait for this chain's jobs; report the ones that failed or ran out of time
  local failed=0 code entry
  for entry in "${PIDS[@]}"; do
    wait "${entry%%:*}"
    code=$?
    if [ $code -eq 124 ] || [ $code -eq 130 ]; then
      echo "stopped at the time budget: ${entry#*:}"
    elif [ $code -ne 0 ]; then
      echo "FAILED ($code): ${entry#*:}"
      tail -n 5 "$RUNS/${entry#*:}.out"
      failed=1
    fi
  done
  PIDS=()
  return $failed
}

student_steps() {  # student_steps TEACHER: "--max-steps N --eval-every E", planned from the time left
  if [ "$SCALE" = tiny ]; then
    echo "--max-steps 6 --eval-every 3"
  elif [ -n "$STEPS" ]; then  # fixed; warn when the planner thinks it will not fit (a run cut before its
    # prune-end never reaches the target). The planner is cautious: on the H100 it gave 12 jobs 1,500 MRPC
    # steps and they finished 140 s early (bench/results/budget-gpu-h100-2).
    local planned
    read -r planned _ <<<"$("$PY" bench/gpu_pack.py plan-steps "$1" $((BUDGET - (SECONDS - START) - 60)) \
      --jobs $STUDENT_JOBS | sed 's/--max-steps //')"
    [ "${planned:-0}" -lt "$STEPS" ] && echo "warning: STEPS=$STEPS, but the planner fits only $planned" >&2
    echo "--max-steps $STEPS --eval-every $((STEPS >= 10 ? STEPS / 10 : 1))"
  else
    "$PY" bench/gpu_pack.py plan-steps "$1" $((BUDGET - (SECONDS - START) - 60)) --jobs $STUDENT_JOBS
  fi
}

chain() {  # chain TASK METRIC PREFIX: its teachers, the best one, then its students
  local task=$1 metric=$2 prefix=$3 teacher plan
  shift 3
  wait_all || return 1
  teacher=$("$PY" bench/gpu_pack.py choose-teacher "$RUNS" "$prefix" "$metric") || return 1
  read -r -a plan <<<"$(student_steps "$teacher")"
  [ ${#plan[@]} -eq 4 ] || return 1
  echo "$task: teacher $(basename "$teacher"), students ${plan[*]} (after $((SECONDS - START)) s)"
  local common=(prune --student "$MODEL" --teacher "$teacher" --task "$task" --average-weights "${plan[@]}"
    "${STUDENT[@]}")  # prune's own defaults, not restated here (their one declaration: config.py)
  "$@"
  wait_all
}

mrpc() {
  PIDS=()
  for lr in 5e-5 1e-4; do
    for epochs in 3 5; do
      run "teacher-mrpc-lr$lr-e$epochs" finetune --model "$MODEL" --task mrpc --data-dir "$DATA/MRPC" \
        --lr "$lr" --epochs "$epochs" "${TEACHER[@]}"
    done
  done
  chain mrpc accuracy teacher-mrpc mrpc_students
}
students() {  # students NAME DATA sparsebert-options...: one student per recipe variant and seed
  local name=$1 data=() seed variant options
  [ "$2" = - ] || data=(--data-dir "$DATA/$2")  # -: the data come as files in the options
  shift 2
  for variant in "${VARIANT_LIST[@]}"; do
    read -r -a options <<<"${variant#*:}"
    for seed in "${SEEDS[@]}"; do
      run "student-$name-${variant%%:*}-s$seed" "${common[@]}" "${data[@]}" --seed $seed "$@" "${options[@]}"
    done
  done
}
mrpc_students() { students mrpc-aug MRPC --augment $AUGMENT; }

sst2() {
  PIDS=()
  for lr in 5e-5 1e-4; do
    run "teacher-sst2-lr$lr" finetune --model "$MODEL" --task sst2 --data-dir "$DATA/SST-2" \
      --lr "$lr" --epochs 1 --max-seq-length 64 "${TEACHER[@]}"
  done
  chain sst2 accuracy teacher-sst2 sst2_students
}
sst2_students() { students sst2 SST-2 --max-seq-length 64; }

rating() {
  PIDS=()
  for lr in 5e-5 1e-4; do
    run "teacher-rating-lr$lr" finetune --model "$MODEL" --task movie-rating --data-dir "$DATA/movie-rating" \
      --lr "$lr" --epochs 3 --max-seq-length 64 "${TEACHER[@]}"
  done
  chain movie-rating pearson teacher-rating rating_students
}
rating_students() { students rating movie-rating --max-seq-length 64; }

squad() {  # extractive QA: files, not a GLUE folder; tiny windows at tiny scale
  PIDS=()
  local lr
  SQUAD_FILES=(--train-file "$DATA/squad/train-articles-00-35.json" --dev-file "$DATA/squad/dev-articles-36-41.json")
  [ "$SCALE" = tiny ] && SQUAD_FILES+=(--doc-stride 8)  # windows of the tiny 32 tokens
  for lr in 5e-5 1e-4; do
    run "teacher-squad-lr$lr" finetune --model "$MODEL" --task squad "${SQUAD_FILES[@]}" --lr "$lr" --epochs 2 \
      "${TEACHER[@]}"
  done
  chain squad f1 teacher-squad squad_students
}
squad_students() { students squad - "${SQUAD_FILES[@]}"; }

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

int8_accuracy() {  # the int8 sparse engine's dev metrics on the 1x4 students, where this CPU runs it
  "$PY" -c "from sparsebert.runtime.int8 import int8_available as ok; raise SystemExit(not ok())" 2>/dev/null ||
    { echo "int8 accuracy: skipped (no AVX512-VNNI or no C++ compiler here)"; return 0; }
  local model
  for model in "$RUNS"/student-mrpc-aug-*-s*/; do
    [ -f "$model/metrics.json" ] && grep -q '^prune_block: 4' "$model/config.yaml" || continue
    "$PY" bench/engine_accuracy.py --model "$model" --task mrpc --data-dir "$DATA/MRPC" --max-seq-length 128 \
      --backends auto,int8 --paths fp32 --threads 4 --json "$OUT/accuracy-$(basename "$model").json" \
      >"$RUNS/accuracy-$(basename "$model").out" 2>&1 || echo "int8 accuracy failed: $(basename "$model")"
  done
}

rm -f "$RUNS/.done"
progress &
PROGRESS=$!
save_logs() {  # every run's logs beside results.json, for the record in BENCHMARKS.md
  (cd "$RUNS" && tar czf "$OUT/logs.tgz" --ignore-failed-read ./*.out ./*.json ./*/log.jsonl ./*/metrics.json \
    ./*/sparsity.json ./*/config.yaml 2>/dev/null)
}
trap 'touch "$RUNS/.done"; wait $PROGRESS; save_logs' EXIT

CHAINS=()
for task in $TASKS; do
  $task &
  CHAINS+=($!)
done
STATUS=0
for pid in "${CHAINS[@]}"; do
  wait "$pid" || STATUS=1
done
"$PY" bench/gpu_pack.py summarize "$RUNS" "$OUT/results.json" --print
int8_accuracy
echo "campaign done in $((SECONDS - START)) s; results in $OUT/results.json"
exit $STATUS
