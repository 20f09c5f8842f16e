"""bf16 sparse products for CPUs with AVX512-BF16 (``backend="bf16"``): the engine's lossy fast path.

Why bf16: the fp32 CSR kernel is bound by reading activations, not by arithmetic (each multiply-add of a
non-zero reads 4 bytes of X from L2; BENCHMARKS.md, "Runtime"). In bf16 the same read carries twice the
tokens, and VDPBF16PS multiplies two input features of 16 tokens and adds both into fp32 in one instruction.
A matrix is stored as pair-CSR: each row's non-zeros taken two at a time (an odd count gets a zero
partner), both columns kept and the two bf16 values packed in one int32, which the kernel broadcasts as
the instruction's weight operand. Activations are bf16, feature-major, their tokens padded to a multiple
of 32 (``padded``); products accumulate in fp32 and write fp32 (for residuals and LayerNorm, which stay
fp32) and/or bf16 (for the next product, with GELU fused). Lossy like every bf16 path: weights and
activations keep 8 bits of mantissa.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from sparsebert.errors import SparseBertError
from sparsebert.runtime.build import library
from sparsebert.runtime.kernels import BLOCK_BYTES, CSRMatrix, check_operands, pointer, thread_buffer

TOKEN_ALIGN = 32  # tokens per 64-byte load of bf16 activations


@lru_cache(maxsize=1)
def bf16_available() -> bool:
    """Whether the compiled kernels include the AVX512-BF16 products (built with -march=native)."""
    lib = library()
    return lib is not None and bool(lib.bf16_supported())


def padded(tokens: int) -> int:
    """The token count of a bf16 activation buffer: ``tokens`` rounded up to a multiple of 32."""
    return -(-tokens // TOKEN_ALIGN) * TOKEN_ALIGN


def token_block(k: int) -> int:
    """Tokens per block for ``k`` input features: the packed bf16 (k, block) slice within twice the fp32
    kernel's ``BLOCK_BYTES`` (measured on an AMD EPYC: 128 tokens at k = 3,072 beat 64 by 10%), a multiple
    of 32 between 32 and 256 (8 pairs of accumulators)."""
    return max(TOKEN_ALIGN, min(256, 2 * BLOCK_BYTES // (2 * k) // TOKEN_ALIGN * TOKEN_ALIGN))


@dataclass
class PairCSR:
    """A CSR matrix as the bf16 kernel takes it: ``indptr`` (rows + 1) over pairs of non-zeros, ``cols`` the
    two input columns of each pair, ``values`` the pair's two bf16 weights as one int32."""

    indptr: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def from_csr(cls, csr: CSRMatrix) -> PairCSR:
        indptr = csr.indptr.to(torch.int64)
        counts = indptr.diff()
        kept = counts + counts % 2  # an odd row gets a zero partner: its last column again, weight 0
        new_indptr = torch.zeros_like(indptr)
        torch.cumsum(kept, 0, out=new_indptr[1:])
        rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
        slot = new_indptr[rows] + torch.arange(csr.nnz) - indptr[rows]
        total = int(new_indptr[-1])
        cols = torch.zeros(total, dtype=torch.int32)
        values = torch.zeros(total, dtype=torch.bfloat16)
        odd = (counts % 2).nonzero().squeeze(1)
        cols[new_indptr[odd + 1] - 1] = csr.indices[indptr[odd + 1] - 1]
        cols[slot] = csr.indices
        values[slot] = csr.values.to(torch.bfloat16)
        pairs = (new_indptr // 2).to(torch.int32)
        return cls(pairs, cols, values.view(torch.int16).view(torch.int32), csr.shape)


def scratch(rows: int, tokens: int) -> torch.Tensor:
    """A bf16 (rows, ``padded(tokens)``) buffer kept per thread, for the conversion of a product's fp32 input."""
    return thread_buffer("bf16_input", rows * padded(tokens), torch.bfloat16).view(rows, padded(tokens))


def check_bf16(fn: str, t: torch.Tensor, shape: tuple[int, int], name: str) -> None:
    """A bf16 operand as the kernels take it: contiguous, on the CPU, of ``shape`` (the kernels index it as
    such: a strided or expanded view would be read or written out of place)."""
    if t.dtype != torch.bfloat16 or t.device.type != "cpu" or t.shape != shape or not t.is_contiguous():
        raise SparseBertError(f"{fn}: {name} must be a contiguous bf16 CPU tensor {shape}, got {t.dtype} "
                              f"{tuple(t.shape)}")  # fmt: skip


def to_bf16(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 feature-major (features, tokens) as the bf16 products take it: (features, ``padded(tokens)``),
    rounded to nearest even, the padding zeroed; into ``out`` when given."""
    m, n = x.shape
    y = torch.empty(m, padded(n), dtype=torch.bfloat16) if out is None else out
    check_operands("to_bf16", m, n, x, None, None, None)
    check_bf16("to_bf16", y, (m, padded(n)), "out")
    library().to_bf16_fm(m, n, padded(n), pointer(x), pointer(y), torch.get_num_threads())
    return y


def spmm_bf16(
    w: PairCSR,
    xb: torch.Tensor,
    tokens: int,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_bf16: torch.Tensor | None = None,
    gelu: bool = False,
) -> None:
    """``W @ X + bias[:, None] (+ residual)`` for bf16 ``xb`` (in_features, ``padded(tokens)``) into fp32
    ``out`` (out_features, tokens) and/or bf16 ``out_bf16`` (out_features, padded), the latter through the
    exact GELU first when ``gelu`` (which the fp32 output never gets). At least one output is needed; both are
    written in one pass."""
    m, k = w.shape
    n, npad = tokens, padded(tokens)
    check_bf16("spmm_bf16", xb, (k, npad), "X")
    if out_bf16 is None and (out is None or gelu):
        raise SparseBertError("spmm_bf16: give out, out_bf16 or both (out_bf16 with gelu)")
    check_operands("spmm_bf16", m, n, torch.empty(0), bias, residual, out)
    if bias is not None and bias.shape != (m,):
        raise SparseBertError(f"spmm_bf16: bias must have shape ({m},), got {tuple(bias.shape)}")
    if out_bf16 is not None:
        check_bf16("spmm_bf16", out_bf16, (m, npad), "out_bf16")
    library().spmm_pairs_bf16(
        m, n, npad, k, pointer(w.indptr), pointer(w.cols), pointer(w.values), pointer(xb), pointer(bias),
        pointer(residual), pointer(out), pointer(out_bf16), int(gelu), token_block(k), torch.get_num_threads(),
    )  # fmt: skip


def attention_bf16(
    qkv: torch.Tensor, batch: int, seq: int, heads: int, mask: torch.Tensor | None, scale: float, out: torch.Tensor,
    bias_km: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """``kernels.attention_fm`` on bf16 activations: ``qkv`` (3 * hidden, padded) from the fused projection,
    the context into bf16 ``out`` (hidden, padded) for the next product; both products of attention as pair
    dot products, the softmax in fp32. ``mask``: (batch, seq) additive rows; ``bias_km``: (heads, keys,
    queries), as ``attention_fm`` takes them. The head size must be even (dimension pairs)."""
    hidden, npad = out.shape
    check_bf16("attention_bf16", out, (hidden, npad), "out")
    check_bf16("attention_bf16", qkv, (3 * hidden, npad), "QKV")
    if hidden % heads or (hidden // heads) % 2 or npad != padded(batch * seq):
        raise SparseBertError(f"attention_bf16: {heads} heads of even size, {batch} x {seq} tokens padded to {npad}")
    for t, shape in ((mask, (batch, seq)), (bias_km, (heads, seq, seq))):
        if t is not None and (t.dtype != torch.float32 or t.shape != shape or not t.is_contiguous()):
            raise SparseBertError(f"attention_bf16: mask and bias must be contiguous fp32 {shape}")
    library().attention_fm_bf16(
        batch, seq, heads, hidden // heads, npad, pointer(qkv), pointer(mask), pointer(bias_km), float(scale),
        pointer(out), torch.get_num_threads(),
    )  # fmt: skip
    return out


def torch_attention_bf16(
    qkv: torch.Tensor, batch: int, seq: int, heads: int, mask: torch.Tensor | None, scale: float, out: torch.Tensor,
    bias_km: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """``attention_bf16`` through torch's bf16 batched GEMMs, a head at a time on views of the feature-major
    Q, K, V (no copies): oneDNN runs them on AMX's matrix units where the CPU has them, which can beat the
    pair dot products of the fused kernel; the engine times both (``SparseEncoder``). The GEMM returns the
    scores rounded to bf16 (as in a dense bf16 model; the fused kernel keeps them in fp32); scale, mask and
    softmax then run in fp32."""
    hidden, tokens = out.shape[0], batch * seq
    dim = hidden // heads
    for i in range(heads):
        rows = slice(i * dim, (i + 1) * dim)

        def part(start: int, order: tuple[int, int, int], rows: slice = rows) -> torch.Tensor:
            return qkv[start : start + hidden][rows, :tokens].view(dim, batch, seq).permute(*order)

        scores = torch.bmm(part(0, (1, 2, 0)), part(hidden, (1, 0, 2))).float().mul_(scale)  # (batch, q, k)
        if mask is not None:
            scores += mask[:, None, :]
        if bias_km is not None:
            scores += bias_km[i].t()
        probs = torch.softmax(scores, dim=-1).to(torch.bfloat16)
        context = torch.bmm(part(2 * hidden, (1, 0, 2)), probs.transpose(1, 2))  # (batch, dim, q)
        out[rows, :tokens].view(dim, batch, seq).copy_(context.permute(1, 0, 2))
    return out
