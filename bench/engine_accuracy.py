"""Dev metrics of a saved classifier on every fast path: dense fp32 (the reference), the sparse engine,
dense bf16, ONNX Runtime fp32 and int8 — the accuracy side of ``sparsebert bench``'s baselines.

    .venv/bin/python bench/engine_accuracy.py --model runs/demo/student --task movie-sentiment
    .venv/bin/python bench/engine_accuracy.py --model O --task mrpc --data-dir ../shared/data/glue/MRPC \\
        --max-seq-length 128 --json out.json

Sentence pairs work too (token_type_ids reach every path). ``--backends auto,int8`` adds the int8 sparse
engine (for models pruned with ``--prune-block 4``), ``fastest`` the timed choice among the lossy kernels
too. Also reported: how often each path picks the
same class as dense fp32, and its largest logit difference.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from sparsebert.data import DataSource, encode, load_task_data, make_loader
from sparsebert.export import load
from sparsebert.metrics import compute_metrics
from sparsebert.models import load_tokenizer
from sparsebert.runtime import sparsify
from sparsebert.runtime.baselines import BASELINES, build_baselines, first_output
from sparsebert.runtime.bench import machine
from sparsebert.tasks import get_task


def logits_of(forward, batches: list[dict]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([forward(b["input_ids"], b["attention_mask"], b.get("token_type_ids")) for b in batches])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--paths", default=",".join(BASELINES), help="dense paths besides the sparse engine")
    p.add_argument("--backends", default="auto", help="sparse engine backends, e.g. auto,int8,fastest")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    task = get_task(args.task)
    data = load_task_data(task, DataSource(data_dir=args.data_dir), need_train=False)
    tokenizer = load_tokenizer(args.model)
    features = encode(data.dev["dev"], tokenizer, args.max_seq_length)
    batches = list(make_loader(features, tokenizer, args.batch_size, shuffle=False))
    labels = torch.cat([b["labels"] for b in batches])

    model = load(args.model).eval()
    forwards = build_baselines(model, ["fp32", *args.paths.split(",")], args.max_seq_length, args.threads)
    reports = {}
    for backend in args.backends.split(","):
        sparse = copy.deepcopy(model)
        reports[backend] = sparsify(sparse, backend=backend)
        forwards["sparse" if backend == "auto" else f"sparse-{backend}"] = first_output(sparse)
    logits = {name: logits_of(fn, batches) for name, fn in forwards.items()}
    tokens = args.batch_size * args.max_seq_length  # the kernels a timed backend chose for a full batch
    kernels = {backend: report.summary(tokens) for backend, report in reports.items()}
    reference = logits["fp32"]
    result = {"machine": machine(), "model": args.model, "task": task.name, "sparse_kernels": kernels, "paths": {}}
    for name, lg in logits.items():
        predictions = lg.squeeze(-1) if task.is_regression else lg.argmax(-1)
        result["paths"][name] = {
            "metrics": compute_metrics(task, predictions.numpy(), labels.numpy()),
            "same_prediction_as_fp32": float((lg.argmax(-1) == reference.argmax(-1)).float().mean()),
            "max_abs_logit_diff": float((lg - reference).abs().max()),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
