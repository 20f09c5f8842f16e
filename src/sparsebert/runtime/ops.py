"""One projection ``W @ X + b`` on feature-major activations, with the kernel chosen per matrix.

Each matrix has a few candidate kernels: the sparse one (CSR fp32, exact) when its density is at most
``max_density``, and a dense GEMM. Which wins depends on the matrix, the number of tokens and the
processor (a dense bf16 GEMM on AMX beats fp32 CSR at batch 32; BENCHMARKS.md, "Runtime"), so the
backends ``auto`` (exact kernels), ``fastest`` (also the lossy ones: dense bf16 where the CPU runs
bf16 natively, int8 on 1x4-block matrices) and ``bf16`` (bf16 CSR against dense bf16) time the candidates
on the first call at each size of input (rounded to a power of two) and keep the fastest for that size.
The others fix one kernel, by density.

A compressed model should stay compressed in memory: a sparse matrix keeps its CSR form as the master
copy, and a candidate that lost at every size seen so far is dropped (rebuilt from the master when a new
size is timed).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sparsebert.errors import SparseBertError
from sparsebert.hardware import native_bf16
from sparsebert.runtime.bf16 import PairCSR, bf16_available, padded, scratch, spmm_bf16, to_bf16
from sparsebert.runtime.int8 import BlockInt8Matrix, int8_available, spmm_int8, suits_int8
from sparsebert.runtime.kernels import CSRMatrix, add_bias_residual, cpp_available, spmm

# The sparse runtime's kernels (runtime/ops.py). auto: per matrix, the faster of the exact kernels (fp32 CSR,
# dense fp32), timed on the first call at each input size; fastest: the same among the lossy ones too
# (dense bf16 where the CPU has it natively, bf16 CSR and int8 on 1x4 blocks where it has the instructions).
# Fixed, by density: cpp (compiled CSR), torch (MKL CSR), int8 (the VNNI kernel where 1x4 blocks are sparse
# enough, models pruned with --prune-block 4; the rest as cpp). bf16 (AVX512-BF16): per matrix, the faster of
# bf16 CSR and dense bf16 (on AMX's matrix units the dense GEMM wins at 90% and batch 32), timed like auto's;
# the encoder keeps its activations in bf16 between products (runtime/bf16.py).
SPARSE_BACKENDS = ("auto", "fastest", "cpp", "torch", "int8", "bf16")
# The densest matrix a backend runs sparse. Fixed kernels: at density 0.3 CSR still won on every shape we
# measured, at 0.5 not on all (BENCHMARKS.md, "Kernel choice"). Timed ones try CSR up to 0.5 and keep it
# only where it wins (section 9).
DEFAULT_MAX_DENSITY = 0.3
TIMED_MAX_DENSITY = 0.5
TIMED_BACKENDS = ("auto", "fastest", "bf16")
TIMING_ROUNDS = 2  # timed calls of each close candidate, after an untimed warm-up; the minimum counts
# ...or more, until the first of them has run MIN_TIMING_S: at batch 1 a product takes 0.1-0.7 ms, and two
# calls did not separate int8 from CSR reliably on a noisy machine (BENCHMARKS.md, "Runtime", section 9).
MIN_TIMING_S, MAX_ROUNDS = 0.005, 10
CLEAR_LOSS = 2.0  # a candidate this much slower than the best at its first timed call is out at once
# Beyond this many tokens the kernels' cost per token hardly changes (they work in blocks of 64-256), so
# the timing looks at this many and the first call at batch 32 costs ~2 forwards, not ~5.
TIMING_TOKENS = 1024

Kernel = Callable[..., torch.Tensor]  # (x, bias, residual, out) -> W @ x + bias (+ residual)


@dataclass
class _Csr:
    csr: CSRMatrix

    def __call__(self, x, bias, residual, out):
        return spmm(self.csr, x, bias, residual, out=out)


@dataclass
class _TorchCsr:  # torch's MKL CSR: the path when the compiled kernels cannot be built
    matrix: torch.Tensor

    def __call__(self, x, bias, residual, out):
        return add_bias_residual(torch.mm(self.matrix, x), bias, residual, out)


@dataclass
class _Dense:
    weight: torch.Tensor

    def __call__(self, x, bias, residual, out):
        if bias is None:
            return add_bias_residual(torch.mm(self.weight, x, out=out), None, residual, None)
        return add_bias_residual(torch.addmm(bias[:, None], self.weight, x, out=out), None, residual, None)


@dataclass
class _DenseBf16:  # bf16 operands, the GEMM's result rounded to bf16 (as torch returns it), then fp32: what AMX runs
    weight: torch.Tensor

    def __call__(self, x, bias, residual, out):
        return add_bias_residual(torch.mm(self.weight, x.to(torch.bfloat16)).float(), bias, residual, out)

    def bf16(self, xb, tokens, bias, residual, out, out_bf16, gelu):
        """The bf16 engine's call (see ``ProjectionOp.bf16``)."""
        y = add_bias_residual(torch.mm(self.weight, xb[:, :tokens]).float(), bias, residual, out)
        if out_bf16 is not None:
            to_bf16(torch.nn.functional.gelu(y) if gelu else y, out=out_bf16)


@dataclass
class _PairBf16:  # bf16 CSR (AVX512-BF16); from fp32 X here, bf16 X in the engine's bf16 path
    matrix: PairCSR

    def __call__(self, x, bias, residual, out):
        y = torch.empty(self.matrix.shape[0], x.shape[1]) if out is None else out
        spmm_bf16(self.matrix, to_bf16(x, scratch(*x.shape)), x.shape[1], bias, residual, out=y)
        return y

    def bf16(self, xb, tokens, bias, residual, out, out_bf16, gelu):
        """The bf16 engine's call (see ``ProjectionOp.bf16``)."""
        spmm_bf16(self.matrix, xb, tokens, bias, residual, out=out, out_bf16=out_bf16, gelu=gelu)


@dataclass
class _Int8:
    matrix: BlockInt8Matrix

    def __call__(self, x, bias, residual, out):
        return spmm_int8(self.matrix, x, bias, residual, out=out)


def _bucket(tokens: int) -> int:
    return max(1, tokens).bit_length()  # one timing per power of two of tokens


@dataclass
class ProjectionOp:
    """``W @ X + bias (+ residual)`` for X of shape (in_features, tokens).

    ``master`` is the exact weight (CSR when sparse enough, else dense); ``candidates`` the kernel kinds
    allowed for this matrix; ``plan`` the kind chosen for each size of input timed so far.
    """

    shape: tuple[int, int]
    bias: torch.Tensor | None
    master: CSRMatrix | torch.Tensor
    candidates: tuple[str, ...]
    plan: dict[int, str] = field(default_factory=dict)
    _kernels: dict[str, Kernel] = field(default_factory=dict, repr=False)
    _last: str | None = field(default=None, repr=False)

    @property
    def nnz(self) -> int:
        """Stored weights of the exact master copy."""
        return self.master.nnz if isinstance(self.master, CSRMatrix) else self.master.numel()

    @property
    def kind(self) -> str:
        """The kernel of the last call; before any call, the candidates (``a|b`` when still to be timed)."""
        if len(self.candidates) == 1:
            return self.candidates[0]
        return self._last or "|".join(self.candidates)

    @property
    def held_kinds(self) -> set[str]:
        """The kernels built and kept in memory now: once a size is timed, only the kinds chosen for some
        size stay (a compressed model stays compressed); the others are rebuilt from ``master`` if needed."""
        return set(self._kernels)

    def kind_for(self, tokens: int) -> str | None:
        """The kernel chosen for inputs of ``tokens`` tokens, None if that size was not timed yet."""
        return self.candidates[0] if len(self.candidates) == 1 else self.plan.get(_bucket(tokens))

    def _kernel(self, kind: str, dense: Callable[[], torch.Tensor] | None = None) -> Kernel:
        """The kernel of ``kind``, built from the master copy if it is not held (``dense``: the master as
        a dense fp32 matrix, shared when several kernels are built at once)."""
        if kind not in self._kernels:
            self._kernels[kind] = build_kernel(kind, self.master, dense or functools.cache(self._dense))
        return self._kernels[kind]

    def bf16(
        self, xb: torch.Tensor, tokens: int, residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
        out_bf16: torch.Tensor | None = None, gelu: bool = False,
    ) -> None:  # fmt: skip
        """The projection of bf16 activations (``bf16.padded(tokens)`` columns, ``tokens`` real) into fp32
        ``out`` and/or bf16 ``out_bf16`` (through the exact GELU first when ``gelu``): the bf16 engine's
        path, for the ``bf16`` backend's kernels only (timed like ``__call__``'s on the first call at a size)."""
        if not set(self.candidates) <= {"cpp-bf16", "dense-bf16"}:
            raise SparseBertError(f"bf16 activations need the bf16 backend's kernels, not {'|'.join(self.candidates)}")
        kind = self.kind_for(tokens) or self._choose(
            tokens, *_bf16_probe(self, xb, tokens, residual, out, out_bf16, gelu)
        )
        self._last = kind
        self._kernel(kind).bf16(xb, tokens, self.bias, residual, out, out_bf16, gelu)

    def _dense(self) -> torch.Tensor:
        return self.master.to_dense() if isinstance(self.master, CSRMatrix) else self.master

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The projection, into ``out`` when given (an (out_features, tokens) buffer the caller reuses)."""
        kind = self.kind_for(x.shape[1]) or self._choose(x.shape[1], *_fp32_probe(self, x, residual))
        self._last = kind
        return self._kernel(kind)(x, self.bias, residual, out)

    def _choose(self, tokens: int, call: Callable[[Kernel], Callable], args: tuple) -> str:
        """Time the candidates on a probe of this input (``args``: its first ``TIMING_TOKENS`` tokens into
        scratch outputs; ``call`` picks the kernel's entry point), interleaved, and keep the fastest for
        inputs of ``tokens`` tokens.

        An untimed warm-up call each first: one-off costs land there (oneDNN builds its bf16 kernel at the
        first call, 10-20 ms here), and counting them once let a slow start knock the fastest kernel out.
        Then a timed call each; a candidate ``CLEAR_LOSS`` times slower than the best is out at once, so a
        clear choice (CSR against dense at 90% sparsity) costs two calls of each; the rest get more (see
        ``TIMING_ROUNDS``), and the minimum counts.
        """
        dense = functools.cache(self._dense)  # built once for all the candidates that need it
        kernels = {kind: call(self._kernel(kind, dense)) for kind in self.candidates}
        for kernel in kernels.values():
            kernel(*args)
        best = {kind: time_kernel(kernel, *args) for kind, kernel in kernels.items()}
        fastest = min(best.values())
        close = [kind for kind in kernels if best[kind] <= CLEAR_LOSS * fastest]
        spent, rounds = best[close[0]], 1
        while len(close) > 1 and rounds < MAX_ROUNDS and (rounds < TIMING_ROUNDS or spent < MIN_TIMING_S):
            for kind in close:
                seconds = time_kernel(kernels[kind], *args)
                best[kind] = min(best[kind], seconds)
                spent += seconds if kind == close[0] else 0.0
            rounds += 1
        chosen = min(close, key=best.__getitem__)
        self.plan[_bucket(tokens)] = chosen
        for kind in set(self._kernels) - set(self.plan.values()):
            self._kernels.pop(kind, None)  # another thread may be choosing for another size right now
        return chosen


def _fp32_probe(op: ProjectionOp, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[Callable, tuple]:
    """The timing probe of an fp32 call: its first ``TIMING_TOKENS`` tokens into a scratch output."""
    n = min(x.shape[1], TIMING_TOKENS)
    sink = torch.zeros(op.shape[0], n)  # its pages touched once
    return lambda kernel: kernel, (x[:, :n].contiguous(), op.bias, _head(residual, n), sink)


def _bf16_probe(
    op: ProjectionOp, xb: torch.Tensor, tokens: int, residual: torch.Tensor | None, out: torch.Tensor | None,
    out_bf16: torch.Tensor | None, gelu: bool,
) -> tuple[Callable, tuple]:  # fmt: skip
    """The timing probe of a bf16 call (``ProjectionOp.bf16``): the same outputs and GELU, on the first
    ``TIMING_TOKENS`` tokens, into scratch buffers."""
    n = min(tokens, TIMING_TOKENS)
    rows = op.shape[0]
    sink = None if out is None else torch.zeros(rows, n)
    sink_bf16 = None if out_bf16 is None else torch.zeros(rows, padded(n), dtype=torch.bfloat16)
    args = (xb[:, : padded(n)].contiguous(), n, op.bias, _head(residual, n), sink, sink_bf16, gelu)
    return lambda kernel: kernel.bf16, args


def _head(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if t is None else t[:, :n].contiguous()


def time_kernel(kernel: Kernel, *args) -> float:
    """Seconds one call ``kernel(*args)`` takes: the kernel choice's only clock. A module-level function so
    that a test can put a scripted clock in its place and check the choice without depending on the
    machine's speed or load."""
    start = time.perf_counter()
    kernel(*args)
    return time.perf_counter() - start


def build_kernel(kind: str, master: CSRMatrix | torch.Tensor, dense: Callable[[], torch.Tensor]) -> Kernel:
    """The kernel of ``kind`` for one matrix, from its exact ``master`` copy (``dense``: the master as a dense
    fp32 matrix, made on demand). Every kernel a ``ProjectionOp`` runs comes from here, so a test can wrap
    it to see each kernel call."""
    if kind == "cpp-csr":
        return _Csr(master)
    if kind == "torch-csr":
        return _TorchCsr(master.to_torch())
    if kind == "dense":
        return _Dense(dense())
    if kind == "dense-bf16":
        return _DenseBf16(dense().to(torch.bfloat16))
    if kind == "cpp-bf16":
        return _PairBf16(PairCSR.from_csr(master))
    if kind == "cpp-int8":
        return _Int8(BlockInt8Matrix.from_dense(dense()))
    raise SparseBertError(f"unknown kernel kind {kind!r}")


def resolve_backend(backend: str) -> str:
    """Check that ``backend`` can run here (``auto`` and ``fastest`` always can)."""
    if backend not in SPARSE_BACKENDS:
        raise SparseBertError(f"unknown sparse backend {backend!r}; choose one of {', '.join(SPARSE_BACKENDS)}")
    if backend == "cpp" and not cpp_available():
        raise SparseBertError("the C++ sparse kernels could not be built (is g++ installed?); use backend='torch'")
    if backend == "int8" and not int8_available():
        raise SparseBertError("backend 'int8' needs the compiled kernels on a CPU with AVX512-VNNI")
    if backend == "bf16" and not bf16_available():
        raise SparseBertError("backend 'bf16' needs the compiled kernels on a CPU with AVX512-BF16")
    return backend


def _candidates(weight: torch.Tensor, sparse: bool, backend: str, max_density: float) -> tuple[str, ...]:
    """The kernels a matrix may run; one kind for the fixed backends. Dense bf16 only where the CPU runs
    it natively: emulated, it is slower than fp32 and would only waste the timing."""
    csr = "cpp-csr" if cpp_available() else "torch-csr"
    int8 = backend in ("int8", "fastest") and int8_available() and suits_int8(weight, max_density)
    if backend == "bf16":
        return ("cpp-bf16", "dense-bf16") if sparse else ("dense-bf16",)
    if backend not in TIMED_BACKENDS:
        fixed = "cpp-int8" if int8 else ("torch-csr" if backend == "torch" else "cpp-csr") if sparse else "dense"
        return (fixed,)
    kinds = (["cpp-int8"] if int8 else []) + ([csr] if sparse else []) + ["dense"]
    if backend == "fastest" and sparse and bf16_available():
        kinds.append("cpp-bf16")
    if backend == "fastest" and native_bf16("cpu"):
        kinds.append("dense-bf16")
    return tuple(kinds)


def make_projection(
    weight: torch.Tensor, bias: torch.Tensor | None, max_density: float | None = None, backend: str = "auto"
) -> ProjectionOp:
    """Convert one weight matrix: CSR as its master copy when sparse enough (``max_density``, default
    the backend's), dense otherwise."""
    w = weight.detach().to("cpu", torch.float32).contiguous()
    b = None if bias is None else bias.detach().to("cpu", torch.float32).contiguous()
    backend = resolve_backend(backend)
    if max_density is None:
        max_density = TIMED_MAX_DENSITY if backend in TIMED_BACKENDS else DEFAULT_MAX_DENSITY
    sparse = float((w != 0).sum()) <= max_density * max(1, w.numel())
    master = CSRMatrix.from_dense(w) if sparse else w
    return ProjectionOp((w.shape[0], w.shape[1]), b, master, _candidates(w, sparse, backend, max_density))
