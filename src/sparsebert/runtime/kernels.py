"""Sparse CPU kernels for feature-major activations: the Python side of ``csrc/sparse_kernels.cpp``.

Why feature-major: with activations laid out as (features x tokens), ``Y = W @ X`` for a CSR ``W`` is, per
output row, a weighted sum of a few contiguous rows of ``X``; the inner loop runs over tokens, which is
contiguous and vectorises (AVX-512/AVX2 through GCC vector extensions). Keeping the whole encoder in this
layout avoids the transposes that otherwise eat most of the gain (BENCHMARKS.md, "Kernel choice"). The
same layout serves attention: one key's scores against 16 queries fill a vector, so the softmax over keys
runs lane by lane, fused between the two products (``attention_fm``).

Why ctypes + g++ rather than a torch C++ extension or numba: the build takes about a second, needs no extra
Python dependency, and linking against OpenMP picks up the ``libgomp`` that torch already loaded (same
soname), so kernels and torch share one thread pool instead of two pools spinning against each other on a
small machine. ``build.py`` compiles and loads the library (and says why a failure is loud); without a
compiler the runtime falls back to torch's MKL CSR (``backend="torch"``).
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

from sparsebert.errors import SparseBertError
from sparsebert.runtime.build import library


def cpp_available() -> bool:
    """Whether the compiled kernels can be used on this machine."""
    return library() is not None


@dataclass
class CSRMatrix:
    """A CSR matrix in the dtypes the kernels take: int32 ``indptr``/``indices``, fp32 ``values``."""

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> CSRMatrix:
        w = weight.detach().to("cpu", torch.float32).contiguous()
        if w.dim() != 2:
            raise SparseBertError(f"CSR needs a 2-D matrix, got shape {tuple(w.shape)}")
        mask = w != 0
        indptr = torch.zeros(w.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(mask.sum(dim=1), dim=0, out=indptr[1:])
        indices = mask.nonzero()[:, 1]  # row-major order, so each row's columns come sorted
        return cls(indptr.to(torch.int32), indices.to(torch.int32).contiguous(), w[mask].contiguous(), tuple(w.shape))

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def to_torch(self) -> torch.Tensor:
        """The same matrix as a torch sparse CSR tensor (for the MKL backend)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            return torch.sparse_csr_tensor(
                self.indptr.to(torch.int64), self.indices.to(torch.int64), self.values, self.shape
            )

    def to_dense(self) -> torch.Tensor:
        return self.to_torch().to_dense()


_thread_buffers = threading.local()  # per thread: the scratch buffers of the products in progress, by name


def thread_buffer(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The first ``numel`` elements of a buffer the calling thread keeps under ``name``, grown as needed and
    never shrunk: a fresh one of a few MB per call (batch 32) costs page faults on the hot path, as the
    engine's fresh activations did (BENCHMARKS.md, "Runtime", section 7)."""
    buffer = getattr(_thread_buffers, name, None)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype)
        setattr(_thread_buffers, name, buffer)
    return buffer[:numel]


def thread_buffer_size(name: str) -> int:
    """How many elements the calling thread's buffer ``name`` holds (0 before its first use)."""
    buffer = getattr(_thread_buffers, name, None)
    return 0 if buffer is None else buffer.numel()


def pointer(t: torch.Tensor | None) -> int | None:
    """A tensor's address for a ctypes call into ``library()`` (None stays a null pointer)."""
    return None if t is None else t.data_ptr()


def _check(x: torch.Tensor, name: str) -> None:
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        raise SparseBertError(f"{name} must be a contiguous fp32 CPU tensor, got {x.dtype} on {x.device}")


def feature_major(fn: str, k: int, x: torch.Tensor) -> torch.Tensor:
    """``x`` as the products take it: contiguous (k, tokens), feature-major."""
    if x.dim() != 2 or x.shape[0] != k:
        raise SparseBertError(f"{fn}: X must have shape ({k}, tokens), got {tuple(x.shape)}")
    return x.contiguous()


def add_bias_residual(y: torch.Tensor, bias, residual, out) -> torch.Tensor:
    """Add what a plain GEMM leaves out of ``W @ X + bias[:, None] (+ residual)``, into ``out`` when given."""
    if out is not None and y.data_ptr() != out.data_ptr():
        y = out.copy_(y)
    if bias is not None:
        y += bias[:, None]
    if residual is not None:
        y += residual
    return y


def check_operands(fn: str, m: int, n: int, x: torch.Tensor, bias, residual, out) -> None:
    """What a compiled product needs of its operands: contiguous fp32 CPU tensors, and (m, n) for the
    residual and the output buffer."""
    for t, name in ((x, "X"), (bias, "bias"), (residual, "residual"), (out, "out")):
        if t is not None:
            _check(t, name)
    for t, name in ((residual, "residual"), (out, "out")):
        if t is not None and t.shape != (m, n):
            raise SparseBertError(f"{fn}: {name} must have shape ({m}, {n}), got {tuple(t.shape)}")


# Tokens per block: as many as keep a thread's packed (K, block) slice of X within ~384 KiB, so that it
# stays in L2 while the thread's rows reuse it, between 64 (4 AVX-512 accumulators per non-zero) and 256
# (16; beyond that the per-non-zero index/value loads no longer matter). Measured on BERT shapes at 4,096
# tokens (BENCHMARKS.md, "Runtime", section 7). The kernel caps it at 128 without AVX-512.
BLOCK_BYTES = 384 * 1024


def token_block(k: int) -> int:
    """Tokens per block for a matrix with ``k`` input features (a multiple of 16)."""
    return max(64, min(256, BLOCK_BYTES // (4 * k) // 16 * 16))


def spmm(
    w: CSRMatrix,
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W @ X + bias[:, None] (+ residual)`` for feature-major ``X`` of shape (in_features, tokens).

    ``out`` (contiguous fp32, (out_features, tokens)) receives the result: an engine that reuses its
    buffers spares the page faults of a fresh allocation, which cost as much as the product at batch 32.
    """
    m, k = w.shape
    x = feature_major("spmm", k, x)
    n = x.shape[1]
    lib = library()
    if lib is None:  # converts at every call: the engine keeps torch's CSR instead (ops._TorchCsr)
        return add_bias_residual(torch.mm(w.to_torch(), x), bias, residual, out)
    check_operands("spmm", m, n, x, bias, residual, out)
    y = torch.empty((m, n), dtype=torch.float32) if out is None else out
    lib.spmm_csr_f32(
        m,
        n,
        k,
        pointer(w.indptr),
        pointer(w.indices),
        pointer(w.values),
        pointer(x),
        pointer(bias),
        pointer(residual),
        pointer(y),
        token_block(k),
        torch.get_num_threads(),
    )
    return y


def layer_norm_fm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out: torch.Tensor | None = None,
    out_bf16: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """LayerNorm over dim 0 of a feature-major (features, tokens) tensor; ``out`` may be ``x`` itself (each
    block of tokens is read whole before it is written). ``out_bf16``: also the result rounded to bf16, as
    the bf16 engine's next product reads it ((features, tokens padded to 32), the padding zeroed)."""
    lib = library()
    if lib is None:
        y = torch.nn.functional.layer_norm(x.t(), (x.shape[0],), weight, bias, eps).t()
        y = y.contiguous() if out is None else out.copy_(y)
        if out_bf16 is not None:
            out_bf16.zero_()[:, : y.shape[1]].copy_(y)
        return y
    x = x.contiguous()
    _check(x, "X")
    w, b = weight.detach().contiguous(), bias.detach().contiguous()
    y = torch.empty_like(x) if out is None else out
    _check(y, "out")
    if y.shape != x.shape:
        raise SparseBertError(f"layer_norm_fm: out must have shape {tuple(x.shape)}, got {tuple(y.shape)}")
    rows, tokens = x.shape
    padded = out_bf16.shape[1] if out_bf16 is not None else tokens
    if out_bf16 is not None and (out_bf16.dtype != torch.bfloat16 or out_bf16.shape[0] != rows or padded < tokens
                                 or not out_bf16.is_contiguous()):  # fmt: skip
        raise SparseBertError(f"layer_norm_fm: out_bf16 must be contiguous bf16 ({rows}, >= {tokens})")
    lib.layer_norm_fm_f32(
        rows, tokens, pointer(x), pointer(w), pointer(b), float(eps), pointer(y), pointer(out_bf16), padded,
        torch.get_num_threads(),
    )  # fmt: skip
    return y


@lru_cache(maxsize=1)
def attention_available() -> bool:
    """Whether the fused attention kernel can run here (compiled, on a CPU with AVX-512); asked once per
    layer and forward, so answered once."""
    lib = library()
    return lib is not None and bool(lib.attention_supported())


def attention_fm(
    qkv: torch.Tensor, batch: int, heads: int, mask: torch.Tensor | None, scale: float, out: torch.Tensor,
    bias_km: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """``softmax(Q^T K * scale + mask + bias) V^T`` per sequence and head, into ``out`` (hidden, tokens).

    ``qkv`` is the fused projection's (3 * hidden, batch * seq) output, feature-major; ``mask`` an additive
    (batch, seq) row over each sequence's keys, or None; ``bias_km`` an additive (heads, keys, queries) table
    shared by every sequence (MPNet's relative positions, key-major as the kernel reads it), or None. One call
    for every head and sequence: no copies into a head-major layout and no scores tensor (BENCHMARKS.md,
    "Runtime", section 11).
    """
    hidden, tokens = out.shape
    _check(qkv, "QKV")
    _check(out, "out")
    if qkv.shape != (3 * hidden, tokens) or tokens % batch or hidden % heads:
        raise SparseBertError(f"attention_fm: QKV {tuple(qkv.shape)} does not fit out {tuple(out.shape)}")
    seq = tokens // batch
    if mask is not None:
        _check(mask, "mask")
        if mask.shape != (batch, seq):
            raise SparseBertError(f"attention_fm: mask must have shape ({batch}, {seq}), got {tuple(mask.shape)}")
    if bias_km is not None:
        _check(bias_km, "bias")
        if bias_km.shape != (heads, seq, seq):
            want = (heads, seq, seq)
            raise SparseBertError(f"attention_fm: bias must have shape {want}, got {tuple(bias_km.shape)}")
    library().attention_fm_f32(
        batch, seq, heads, hidden // heads, pointer(qkv), pointer(mask), pointer(bias_km), float(scale), pointer(out),
        torch.get_num_threads(),
    )  # fmt: skip
    return out
