"""Where the sparse engine's time goes: one forward of a random pruned encoder under ``torch.profiler``
(the torch ops: attention GEMMs, softmax, GELU, copies; the compiled kernels, run through ctypes, show as
the Python functions that call them: ``spmm``, ``attention_fm``, ``layer_norm_fm``) and each projection
kind of layer 0 timed alone, GFMA/s on the non-zeros.

    .venv/bin/python bench/engine_profile.py --arch bert-base --sparsity 0.95 --batch-size 32 [--backend bf16]
    PYTHONPATH=/tmp/sb/old/src .venv/bin/python bench/engine_profile.py ...   # another revision's engine
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sparsebert.runtime.bench import random_pruned_model
from sparsebert.runtime.convert import sparsify


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="bert-base")
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="auto", help="the sparse kernels (runtime/ops.py SPARSE_BACKENDS)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = random_pruned_model(args.arch, args.sparsity)
    sparsify(model, mode="encoder", backend=args.backend)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (args.batch_size, args.seq_len), generator=gen)
    with torch.no_grad():
        model(input_ids=ids)
        with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
            start = time.perf_counter()
            model(input_ids=ids)
            print(f"one forward: {1000 * (time.perf_counter() - start):.1f} ms (under the profiler)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        layer, tokens = model.encoder.layers[0], args.batch_size * args.seq_len
        for name, op in (("qkv", layer.qkv), ("attention output", layer.out), ("ffn up", layer.up),
                         ("ffn down", layer.down)):  # fmt: skip
            x = torch.randn(op.shape[1], tokens, generator=gen)
            op(x)
            times = []
            for _ in range(5):
                start = time.perf_counter()
                op(x)
                times.append(time.perf_counter() - start)
            ms = 1000 * statistics.median(times)
            print(f"{name} {op.kind} {op.shape}: {ms:.2f} ms, {op.nnz * tokens / ms / 1e6:.1f} GFMA/s")


if __name__ == "__main__":
    main()
