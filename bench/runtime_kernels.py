"""Per-projection kernel comparison behind the runtime's choices (BENCHMARKS.md, "Kernel choice").

For BERT-base and MiniLM projection shapes, times one projection with: dense ``F.linear`` on token-major
activations (what PyTorch runs), torch's MKL CSR as ``torch.mm(W_csr, X_t)`` on feature-major activations,
and the package's compiled CSR kernel on feature-major activations. All in one process, interleaved, medians.

    .venv/bin/python bench/runtime_kernels.py --threads 2 --tokens 128,4096 --densities 0.05,0.1,0.2,0.3,0.4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparsebert.runtime.kernels import CSRMatrix, spmm

SHAPES = {"768x768": (768, 768), "3072x768": (3072, 768), "768x3072": (768, 3072), "384x1536": (384, 1536)}


def median_ms(fns, reps: int) -> list[float]:
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, bucket in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            bucket.append(1000 * (time.perf_counter() - t0))
    return [statistics.median(t) for t in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", default="128,4096")
    p.add_argument("--densities", default="0.05,0.1,0.2,0.3,0.4")
    p.add_argument("--shapes", default="768x768,3072x768,768x3072")
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"{'shape (out x in)':<16} {'tokens':>6} {'density':>7} {'dense ms':>9} {'mkl csr ms':>10} "
        f"{'cpp csr ms':>10} {'mkl x':>6} {'cpp x':>6}"
    )
    for shape_name in args.shapes.split(","):
        m, k = SHAPES[shape_name]
        for n in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(n, k)
            xt = x.t().contiguous()
            for density in (float(d) for d in args.densities.split(",")):
                w = torch.randn(m, k)
                w[torch.rand(m, k) >= density] = 0
                b = torch.randn(m)
                csr = CSRMatrix.from_dense(w)
                mkl = csr.to_torch()
                dense_ms, mkl_ms, cpp_ms = median_ms(
                    [
                        lambda x=x, w=w, b=b: F.linear(x, w, b),
                        lambda mkl=mkl, xt=xt: torch.mm(mkl, xt),
                        lambda csr=csr, xt=xt, b=b: spmm(csr, xt, b),
                    ],
                    args.reps,
                )
                print(
                    f"{shape_name:<16} {n:>6} {density:>7.2f} {dense_ms:>9.3f} {mkl_ms:>10.3f} {cpp_ms:>10.3f} "
                    f"{dense_ms / mkl_ms:>5.1f}x {dense_ms / cpp_ms:>5.1f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
