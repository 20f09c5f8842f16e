"""One layer's attention, forward and backward, torch's fused kernel (SDPA) against eager, fp32 and bf16.

Why `models.fast_attention` switches bf16 CPU runs to eager attention (BENCHMARKS.md, "bf16 where the CPU
has it"): MiniLM-L6's shape (12 heads of 32) on an MRPC batch near the median length, mean of 20 calls.

    .venv/bin/python bench/attention_cost.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def per_call_ms(dtype: torch.dtype, mode: str, shape: tuple[int, int, int, int], reps: int) -> float:
    """Forward and backward of one attention call in ``mode`` (sdpa | sdpa-fp32 | eager), milliseconds."""
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.zeros(shape[0], 1, 1, shape[2], dtype=dtype)

    def call() -> None:
        if mode == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif mode == "sdpa-fp32":  # the fused kernel on inputs cast to fp32
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float()).to(dtype)
        else:
            out = ((q @ k.transpose(-1, -2)) / shape[3] ** 0.5 + mask).softmax(-1) @ v
        out.sum().backward()

    for _ in range(3):
        call()
    start = time.perf_counter()
    for _ in range(reps):
        call()
    return 1000 * (time.perf_counter() - start) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="32,12,53,32", help="batch, heads, length, head size")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = tuple(int(n) for n in args.shape.split(","))
    for dtype in (torch.float32, torch.bfloat16):
        for mode in ("sdpa", "sdpa-fp32", "eager"):
            ms = per_call_ms(dtype, mode, shape, args.reps)
            print(f"{str(dtype).removeprefix('torch.'):9} {mode:9} {ms:7.2f} ms")


if __name__ == "__main__":
    main()
