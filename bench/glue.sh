#!/usr/bin/env bash
# Teacher + SparseBERT students on one GLUE task folder, as recorded in BENCHMARKS.md. The students train
# at prune's default schedule (3e-4, linear); BENCHMARKS.md's appendix runs of this script at lr 1e-4
# add `--lr 1e-4 --lr-schedule constant --warmup-ratio 0.1` (CHANGELOG.md: 2026-11-27).
#   bench/glue.sh TASK DATA_DIR OUT_DIR [extra `sparsebert prune` flags]
# Env: TEACHER_EPOCHS (3), STUDENT_EPOCHS (5), SPARSITIES ("0.9 0.95"), MODEL (minilm-l6).
# Finished runs (metrics.json present) are skipped, so the script can be re-run after an interruption.
set -euo pipefail
task=$1 data=$2 out=$3
shift 3
sb=(.venv/bin/sparsebert -q)
model=${MODEL:-minilm-l6}
if [ ! -f "$out/teacher/metrics.json" ]; then
  "${sb[@]}" finetune --model "$model" --task "$task" --data-dir "$data" --output-dir "$out/teacher" \
    --epochs "${TEACHER_EPOCHS:-3}" --lr 1e-4 --overwrite
fi
for s in ${SPARSITIES:-0.9 0.95}; do
  if [ ! -f "$out/sparse$s/metrics.json" ]; then
    "${sb[@]}" prune --teacher "$out/teacher" --student "$model" --task "$task" --data-dir "$data" \
      --output-dir "$out/sparse$s" --sparsity "$s" --epochs "${STUDENT_EPOCHS:-5}" --overwrite "$@"
  fi
done
.venv/bin/python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for run in sorted(p for p in out.iterdir() if (p / "metrics.json").exists()):
    m = json.loads((run / "metrics.json").read_text())["metrics"]
    sp = json.loads((run / "sparsity.json").read_text())["overall"] if (run / "sparsity.json").exists() else 0.0
    wall = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if '"saved"' in l][-1]["wall_seconds"]
    print(f"{run.name:14s} sparsity {100 * sp:5.1f}%  " + "  ".join(f"{k} {100 * v:.2f}" for k, v in m.items())
          + f"  wall {wall / 60:.1f} min")
PY
