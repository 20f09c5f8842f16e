"""Sparse CPU runtime: compiled CSR kernels, a feature-major encoder stack, and the benchmark behind
``sparsebert bench``."""

from sparsebert.runtime.convert import SparsifyReport, sparsify
from sparsebert.runtime.engine import SparseEncoder
from sparsebert.runtime.kernels import CSRMatrix, cpp_available, layer_norm_fm, spmm
from sparsebert.runtime.linear import SparseLinear, swap_linears

__all__ = [
    "CSRMatrix",
    "SparseEncoder",
    "SparseLinear",
    "SparsifyReport",
    "cpp_available",
    "layer_norm_fm",
    "sparsify",
    "spmm",
    "swap_linears",
]
