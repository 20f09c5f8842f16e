"""int8 sparse products on 1x4 blocks, for CPUs with AVX512-VNNI (``backend="int8"``).

One VNNI instruction multiplies 4 consecutive input features of 16 tokens by 4 int8 weights and adds
them up, so a kernel that skips work needs the kept weights in groups of 4 along the input dimension:
the pattern ``--prune-block 4`` trains. A matrix is stored as block-CSR (per row: the index of each
kept block and its 4 weights as one int32) with a scale per row; activations are quantized per token
once per projection (one vectorised pass shared by the threads). Each non-zero block costs one byte of
activation per multiply-add where the fp32 CSR kernel reads four (BENCHMARKS.md, "Runtime", sections 7-8).
Lossy: about 1% of the output range, like any int8 path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsebert.errors import SparseBertError
from sparsebert.runtime.build import library
from sparsebert.runtime.kernels import check_operands, feature_major, pointer, thread_buffer, thread_buffer_size

TOKEN_BLOCK = 128  # tokens per block of 8 accumulators
QUANTIZED = "int8_activations"  # the calling thread's buffer of quantized activations (kernels.thread_buffer)


def _activation_buffers(k: int, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token scales and quantized activations for one product, in buffers kept per thread."""
    return thread_buffer("int8_scales", padded, torch.float32), thread_buffer(QUANTIZED, k * padded, torch.uint8)


def scratch_size() -> int:
    """How many quantized activations the calling thread's buffer holds (0 before its first int8
    product): the memory the hot path keeps, per thread, grown to the largest product so far and never
    shrunk."""
    return thread_buffer_size(QUANTIZED)


def int8_available() -> bool:
    """Whether the compiled kernels include the VNNI int8 path (built with -march=native)."""
    lib = library()
    return lib is not None and bool(lib.int8_supported())


@dataclass
class BlockInt8Matrix:
    """A matrix of 1x4 blocks along the input dimension, int8 with one scale per output row."""

    indptr: torch.Tensor  # (rows + 1,) int32: kept blocks per row
    blocks: torch.Tensor  # (kept,) int32: block index g (input features 4g..4g+3)
    weights: torch.Tensor  # (kept,) int32: the 4 int8 weights of each block
    compensation: torch.Tensor  # (rows,) int32: 128 * the row's int8 weight sum (unsigned activations)
    scale: torch.Tensor  # (rows,) fp32
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> BlockInt8Matrix:
        w = weight.detach().to("cpu", torch.float32).contiguous()
        m, k = w.shape
        if k % 4:
            raise SparseBertError(f"int8 blocks need input features divisible by 4, got {k}")
        scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(w / scale[:, None]).to(torch.int8).view(m, k // 4, 4)
        kept = w.view(m, k // 4, 4).ne(0).any(dim=-1)
        indptr = torch.zeros(m + 1, dtype=torch.int32)
        indptr[1:] = kept.sum(dim=1).cumsum(0)
        rows, blocks = kept.nonzero(as_tuple=True)
        weights = q[rows, blocks].contiguous().view(torch.int32).view(-1)
        compensation = 128 * q.to(torch.int32).sum(dim=(1, 2))
        return cls(indptr, blocks.to(torch.int32).contiguous(), weights.contiguous(),
                   compensation.to(torch.int32).contiguous(), scale.contiguous(), (m, k))  # fmt: skip


def suits_int8(weight: torch.Tensor, max_density: float) -> bool:
    """Whether a matrix was pruned in 1x4 blocks (its kept blocks at least half full) and its blocks are
    sparse enough. An unstructured matrix fails: at 95% about one block in five holds a single non-zero,
    and the int8 kernel would do four times the work for nothing but the rounding error."""
    m, k = weight.shape
    if k % 4:
        return False
    nonzero = weight.detach().reshape(m, k // 4, 4).ne(0)
    kept = int(nonzero.any(dim=-1).sum())
    return 4 * kept <= max_density * m * k and int(nonzero.sum()) >= 2 * kept


def spmm_int8(
    w: BlockInt8Matrix,
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W @ X + bias[:, None] (+ residual)`` for feature-major fp32 ``X`` (in_features, tokens), in int8."""
    if not int8_available():
        raise SparseBertError("the int8 kernels need a CPU with AVX512-VNNI and the compiled kernels")
    m, k = w.shape
    x = feature_major("spmm_int8", k, x)
    n = x.shape[1]
    padded = (n + 15) // 16 * 16
    check_operands("spmm_int8", m, n, x, bias, residual, out)
    lib, threads = library(), torch.get_num_threads()
    scales, quantized = _activation_buffers(k, padded)
    lib.quantize_b4(k, n, padded, pointer(x), pointer(scales), pointer(quantized), threads)
    y = torch.empty((m, n), dtype=torch.float32) if out is None else out
    lib.spmm_b4_i8(m, n, padded, pointer(w.indptr), pointer(w.blocks), pointer(w.weights), pointer(w.compensation),
                   pointer(w.scale), pointer(quantized), pointer(scales), pointer(bias), pointer(residual), pointer(y),
                   TOKEN_BLOCK, threads)  # fmt: skip
    return y
