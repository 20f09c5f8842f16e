"""One projection ``W @ X + b`` on feature-major activations, sparse or dense, chosen per matrix.

A CSR kernel only pays off below some density; above it a dense GEMM (MKL) is faster, so each matrix is
converted only when its measured density is at most ``max_density`` (the default comes from the per-layer
measurements in BENCHMARKS.md, "Kernel choice").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsebert.config import SPARSE_BACKENDS
from sparsebert.errors import SparseBertError
from sparsebert.runtime.int8 import BlockInt8Matrix, int8_available, spmm_int8, suits_int8
from sparsebert.runtime.kernels import CSRMatrix, cpp_available, spmm

# Above this density the dense GEMM wins on the shapes we measured (BENCHMARKS.md, "Kernel choice").
DEFAULT_MAX_DENSITY = 0.3


@dataclass
class ProjectionOp:
    """``W @ X + bias (+ residual)`` for X of shape (in_features, tokens); holds one of CSR or dense W."""

    shape: tuple[int, int]
    bias: torch.Tensor | None
    csr: CSRMatrix | None = None
    dense: torch.Tensor | None = None
    torch_csr: torch.Tensor | None = None  # the MKL path when the C++ kernels are unavailable
    int8: BlockInt8Matrix | None = None  # the VNNI path (backend "int8")

    @property
    def kind(self) -> str:
        if self.int8 is not None:
            return "cpp-int8"
        if self.csr is None:
            return "dense"
        return "torch-csr" if self.torch_csr is not None else "cpp-csr"

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The projection, into ``out`` when given (an (out_features, tokens) buffer the caller reuses)."""
        if self.int8 is not None:
            return spmm_int8(self.int8, x, self.bias, residual, out=out)
        if self.csr is not None and self.torch_csr is None:
            return spmm(self.csr, x, self.bias, residual, out=out)
        if self.torch_csr is not None:
            y = torch.mm(self.torch_csr, x)
            if self.bias is not None:
                y += self.bias[:, None]
            y = y if out is None else out.copy_(y)
        elif self.bias is not None:
            y = torch.addmm(self.bias[:, None], self.dense, x, out=out)
        else:
            y = torch.mm(self.dense, x, out=out)
        if residual is not None:
            y += residual
        return y


def resolve_backend(backend: str) -> str:
    """``auto`` means the compiled kernels when they build, else torch's MKL CSR."""
    if backend not in SPARSE_BACKENDS:
        raise SparseBertError(f"unknown sparse backend {backend!r}; choose one of {', '.join(SPARSE_BACKENDS)}")
    if backend == "auto":
        return "cpp" if cpp_available() else "torch"
    if backend == "cpp" and not cpp_available():
        raise SparseBertError("the C++ sparse kernels could not be built (is g++ installed?); use backend='torch'")
    if backend == "int8" and not int8_available():
        raise SparseBertError("backend 'int8' needs the compiled kernels on a CPU with AVX512-VNNI")
    return backend


def make_projection(
    weight: torch.Tensor, bias: torch.Tensor | None, max_density: float = DEFAULT_MAX_DENSITY, backend: str = "auto"
) -> ProjectionOp:
    """Convert one weight matrix, falling back to dense when it is not sparse enough to win."""
    w = weight.detach().to("cpu", torch.float32).contiguous()
    b = None if bias is None else bias.detach().to("cpu", torch.float32).contiguous()
    shape = (w.shape[0], w.shape[1])
    backend = resolve_backend(backend)
    if backend == "int8" and suits_int8(w, max_density):
        return ProjectionOp(shape, b, int8=BlockInt8Matrix.from_dense(w))
    density = float((w != 0).sum()) / max(1, w.numel())
    if density > max_density:
        return ProjectionOp(shape, b, dense=w)
    csr = CSRMatrix.from_dense(w)
    if backend == "torch":
        return ProjectionOp(shape, b, csr=csr, torch_csr=csr.to_torch())
    return ProjectionOp(shape, b, csr=csr)
