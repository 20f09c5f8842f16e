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

import threading
from dataclasses import dataclass
from functools import lru_cache

import torch

from sparsebert.errors import SparseBertError
from sparsebert.runtime.build import library
from sparsebert.runtime.kernels import BLOCK_BYTES, CSRMatrix, check_operands, pointer

TOKEN_ALIGN = 32  # tokens per 64-byte load of bf16 activations
_scratch = threading.local()  # per thread: the bf16 copy of an fp32 input (``scratch``)


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

    @property
    def pairs(self) -> int:
        return int(self.values.numel())


def scratch(rows: int, tokens: int) -> torch.Tensor:
    """A bf16 (rows, ``padded(tokens)``) buffer kept per thread and grown as needed, for the conversion
    of a product's fp32 input (a fresh one per call costs page faults on the hot path)."""
    size = rows * padded(tokens)
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < size:
        buffer = _scratch.buffer = torch.empty(size, dtype=torch.bfloat16)
    return buffer[:size].view(rows, padded(tokens))


def to_bf16(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 feature-major (features, tokens) as the bf16 products take it: (features, ``padded(tokens)``),
    rounded to nearest even, the padding zeroed; into ``out`` when given."""
    m, n = x.shape
    y = torch.empty(m, padded(n), dtype=torch.bfloat16) if out is None else out
    if x.dtype != torch.float32 or not x.is_contiguous() or y.shape != (m, padded(n)) or y.dtype != torch.bfloat16:
        raise SparseBertError(f"to_bf16: fp32 ({m}, {n}) into bf16 ({m}, {padded(n)}), got {y.dtype} {tuple(y.shape)}")
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
    exact GELU first when ``gelu``. At least one output is needed; both are written in one pass."""
    m, k = w.shape
    n, npad = tokens, padded(tokens)
    if xb.dtype != torch.bfloat16 or xb.shape != (k, npad) or not xb.is_contiguous():
        raise SparseBertError(f"spmm_bf16: X must be contiguous bf16 ({k}, {npad}), got {xb.dtype} {tuple(xb.shape)}")
    if out is None and out_bf16 is None:
        raise SparseBertError("spmm_bf16: give out, out_bf16 or both")
    check_operands("spmm_bf16", m, n, torch.empty(0), bias, residual, out)
    if out_bf16 is not None and (out_bf16.dtype != torch.bfloat16 or out_bf16.shape != (m, npad)):
        raise SparseBertError(f"spmm_bf16: out_bf16 must be bf16 ({m}, {npad}), got {tuple(out_bf16.shape)}")
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
    if qkv.dtype != torch.bfloat16 or out.dtype != torch.bfloat16 or qkv.shape != (3 * hidden, npad):
        raise SparseBertError(f"attention_bf16: bf16 QKV (3 * {hidden}, {npad}), got {qkv.dtype} {tuple(qkv.shape)}")
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
    pair dot products of the fused kernel; the engine times both (``SparseEncoder``). Softmax in fp32."""
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
