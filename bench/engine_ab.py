"""The sparse engine at two revisions, side by side in one process: is a runtime change faster, and exact?

Loads ``sparsebert`` twice — from this checkout and from another source tree (e.g. a ``git worktree`` of
the previous commit) — sparsifies the same random pruned encoder with each, and times them interleaved
on the same inputs (medians), with the largest difference between their outputs. ``--kernels`` times the
CSR kernel alone instead, on BERT-base and MiniLM projection shapes at 95%: old, new, and new writing into
a reused output buffer (GFMA/s counted on the non-zeros).

    git worktree add /tmp/sb-old HEAD~1
    .venv/bin/python bench/engine_ab.py --old-src /tmp/sb-old/src --threads 2
    .venv/bin/python bench/engine_ab.py --old-src /tmp/sb-old/src --baseline ort-int8   # both against ORT int8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from types import ModuleType

import torch

NEW_SRC = Path(__file__).resolve().parents[1] / "src"


def load_runtime(src: Path) -> tuple[ModuleType, ModuleType]:
    """``sparsebert.runtime`` and ``sparsebert.runtime.bench`` imported afresh from ``src``."""
    for name in [m for m in sys.modules if m == "sparsebert" or m.startswith("sparsebert.")]:
        del sys.modules[name]
    sys.path.insert(0, str(src))
    try:
        import sparsebert.runtime as runtime
        import sparsebert.runtime.bench as bench
    finally:
        sys.path.remove(str(src))
    return runtime, bench


def median_s(fns: list, reps: int) -> list[float]:
    """Median seconds of each function, called in turn ``reps`` times after one warm-up call each."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(reps):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def kernels(old_src: Path) -> None:
    load_runtime(NEW_SRC)
    new = sys.modules["sparsebert.runtime.kernels"]
    load_runtime(old_src)
    old = sys.modules["sparsebert.runtime.kernels"]
    gen = torch.Generator().manual_seed(0)
    print("shape (out x in): GFMA/s old / new / new with out= at 128 and 4,096 tokens")
    for m, k in ((2304, 768), (768, 768), (3072, 768), (768, 3072), (1152, 384), (384, 1536)):
        w = torch.randn(m, k, generator=gen)
        w[torch.rand(m, k, generator=gen) > 0.05] = 0
        csr_new, csr_old = new.CSRMatrix.from_dense(w), old.CSRMatrix.from_dense(w)
        row = []
        for n in (128, 4096):
            x, out = torch.randn(k, n, generator=gen), torch.empty(m, n)
            fns = [partial(old.spmm, csr_old, x), partial(new.spmm, csr_new, x), partial(new.spmm, csr_new, x, out=out)]
            row.append(f"{n}: " + " / ".join(f"{csr_new.nnz * n / s / 1e9:.1f}" for s in median_s(fns, 11)))
        print(f"{m}x{k}", *row, sep=" | ")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-src", type=Path, required=True, help="the other revision's src/ folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", default="bert-base:0.95,bert-base:0.9,minilm-l6:0.9", help="arch:sparsity,...")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--kernels", action="store_true", help="time the CSR kernel alone (see above)")
    p.add_argument("--baseline", help="a dense path timed beside both engines (e.g. ort-int8), speedups against it")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.kernels:
        kernels(args.old_src)
        return
    new, bench = load_runtime(NEW_SRC)
    baselines = sys.modules["sparsebert.runtime.baselines"]
    old, _ = load_runtime(args.old_src)
    print(f"{bench.machine()}, {args.threads} threads; old = {args.old_src}")
    for case in args.cases.split(","):
        arch, sparsity = case.split(":")
        base = bench.random_pruned_model(arch, float(sparsity))
        models = [copy.deepcopy(base), copy.deepcopy(base)]
        old.sparsify(models[0], mode="encoder")
        new.sparsify(models[1], mode="encoder")
        names = [args.baseline] if args.baseline else []
        dense = baselines.build_baselines(base, names, args.seq_len, args.threads)
        for batch in map(int, args.batch_sizes.split(",")):
            ids = torch.randint(0, 1000, (batch, args.seq_len), generator=torch.Generator().manual_seed(batch))
            fns = [partial(m, input_ids=ids) for m in models]
            fns += [partial(dense[args.baseline], ids, torch.ones_like(ids))] if args.baseline else []
            with torch.no_grad():
                outputs = [fn().last_hidden_state for fn in fns[:2]]
                before, after, *ref = (1000 * s for s in median_s(fns, 15 if batch == 1 else 3))
            diff = float((outputs[0] - outputs[1]).abs().max())
            against = "".join(f"; {args.baseline} {r:.1f} ms: old {r / before:.2f}x, new {r / after:.2f}x" for r in ref)
            print(f"{arch} {sparsity} batch {batch}: old {before:.1f} ms, new {after:.1f} ms "
                  f"({before / after:.2f}x), max |diff| {diff:.1e}{against}")  # fmt: skip


if __name__ == "__main__":
    main()
