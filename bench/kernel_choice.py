"""The per-matrix timed kernel choice (``backend="auto"``/``"fastest"``) against fixed kernels and the dense
paths a user would pick instead, side by side in one process.

    .venv/bin/python bench/kernel_choice.py --arch bert-base --sparsities 0.5,0.75,0.9,0.95 --json out.json
    .venv/bin/python bench/kernel_choice.py --arch bert-base --block 4 --backends cpp,int8,fastest

For each sparsity and batch size: the first call of each sparse variant (a timed backend chooses its kernels
there, so it costs more), then the median of interleaved calls for every variant and every dense baseline,
and the kernels the timed backends chose (BENCHMARKS.md, "Runtime", section 9).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from sparsebert.runtime import sparsify
from sparsebert.runtime.baselines import build_baselines, first_output, resolve_baselines
from sparsebert.runtime.bench import machine, median_ms, random_pruned_model


def first_call_ms(fn, ids, mask) -> float:
    start = time.perf_counter()
    fn(ids, mask)
    return 1000 * (time.perf_counter() - start)


def bench_sparsity(args: argparse.Namespace, sparsity: float) -> list[dict]:
    model = random_pruned_model(args.arch, sparsity, block=args.block)
    paths = build_baselines(model, resolve_baselines(args.baselines.split(",")), args.seq_len, args.threads)
    reports = {}
    for backend in args.backends.split(","):
        sparse = copy.deepcopy(model)
        reports[backend] = sparsify(sparse, mode="encoder", backend=backend, max_density=args.max_density)
        paths[f"sparse-{backend}"] = first_output(sparse)
    rows, gen = [], torch.Generator().manual_seed(0)
    for bs in args.batch_sizes:
        ids = torch.randint(0, model.config.vocab_size, (bs, args.seq_len), generator=gen)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            first = {name: first_call_ms(fn, ids, mask) for name, fn in paths.items() if name.startswith("sparse")}
            calls = [lambda fn=fn, i=ids, a=mask: fn(i, a) for fn in paths.values()]
            ms = dict(zip(paths, median_ms(calls, args.warmup, args.reps, args.budget), strict=True))
        tokens = bs * args.seq_len
        kernels = {backend: report.summary(tokens) for backend, report in reports.items()}
        rows.append({"sparsity": sparsity, "batch_size": bs, "ms": ms, "first_call_ms": first, "kernels": kernels})
        print(format_row(rows[-1]), flush=True)
    return rows


def format_row(row: dict) -> str:
    dense = {k: v for k, v in row["ms"].items() if not k.startswith("sparse")}
    best = min(dense, key=dense.__getitem__)
    cells = " ".join(f"{k} {v:.1f}" for k, v in row["ms"].items())
    firsts = " ".join(f"{k} {v:.0f}" for k, v in row["first_call_ms"].items())
    kernels = "; ".join(f"{k}: {v.split('mode, ')[1]}" for k, v in row["kernels"].items())
    return (f"{100 * row['sparsity']:.0f}% b{row['batch_size']}: {cells} ms | best dense {best} | "
            f"first calls {firsts} ms | {kernels}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="bert-base")
    p.add_argument("--sparsities", default="0.5,0.75,0.9,0.95")
    p.add_argument("--block", type=int, default=1, help="prune in 1xN blocks (4 for the int8 kernels)")
    p.add_argument("--backends", default="cpp,auto")
    p.add_argument("--baselines", default="auto", help="dense paths: auto or fp32,bf16,ort-fp32,ort-int8")
    p.add_argument("--max-density", type=float, default=None, help="default: the backend's")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--budget", type=float, default=40.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.set_num_threads(args.threads)
    print(f"{machine()}, {args.threads} threads, torch {torch.__version__}", flush=True)
    rows = [row for s in args.sparsities.split(",") for row in bench_sparsity(args, float(s))]
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "args": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
