"""``sparsify(model)``: turn a pruned HF model into a fast sparse CPU model, in place.

``mode="encoder"`` swaps the whole encoder stack for the feature-major ``SparseEncoder`` (fastest, BERT-style
blocks only); ``mode="linear"`` swaps each prunable projection (any architecture); ``mode="auto"`` picks the
encoder when it applies. Each projection's kernel comes from ``backend`` (``runtime/ops.py``): by default
the faster of CSR and a dense GEMM for that matrix, timed at the first call at each input size.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from sparsebert.errors import SparseBertError
from sparsebert.layers import find_encoder_layers
from sparsebert.runtime.engine import RelativeBias, SparseEncoder, block_parts
from sparsebert.runtime.linear import swap_linears
from sparsebert.runtime.ops import ProjectionOp, resolve_backend

log = logging.getLogger(__name__)
MODES = ("auto", "encoder", "linear")


@dataclass
class SparsifyReport:
    """What ``sparsify`` did: the mode, the backend and each projection (whose kernel a timed backend
    chooses at the first call for each input size)."""

    mode: str
    backend: str
    ops: list[ProjectionOp] = field(default_factory=list, repr=False)

    @property
    def kernels(self) -> list[str]:
        """Each projection's kernel at its last call (``a|b`` for candidates not timed yet)."""
        return [op.kind for op in self.ops]

    def summary(self, tokens: int | None = None) -> str:
        """Kernel counts, e.g. ``encoder mode, 44 cpp-csr, 4 dense``; for inputs of ``tokens`` tokens if given."""
        kinds = [(tokens and op.kind_for(tokens)) or op.kind for op in self.ops]
        return f"{self.mode} mode, " + ", ".join(f"{n} {kind}" for kind, n in sorted(Counter(kinds).items()))


def sparsify(
    model: nn.Module, mode: str = "auto", max_density: float | None = None, backend: str = "auto"
) -> SparsifyReport:
    """Replace the pruned projections of ``model`` (put in eval mode) by sparse CPU kernels.

    ``max_density``: the densest matrix still given a sparse kernel (default: the backend's, see
    ``runtime/ops.py``); ``backend``: one of ``ops.SPARSE_BACKENDS``."""
    if mode not in MODES:
        raise SparseBertError(f"unknown sparsify mode {mode!r}; choose one of {', '.join(MODES)}")
    backend = resolve_backend(backend)
    model.eval()
    stack_name, stack = find_encoder_layers(model)
    encoder_name = stack_name.rpartition(".")[0]
    original = model.get_submodule(encoder_name) if stack_name.endswith(".layer") else None
    encoder_ok = original is not None and all(block_parts(b) for b in stack)
    if mode == "encoder" and not encoder_ok:
        raise SparseBertError(f"{type(model).__name__} does not have BERT- or MPNet-style blocks; use mode='linear'")
    if mode == "linear" or not encoder_ok:
        return SparsifyReport("linear", backend, swap_linears(model, max_density, backend))
    bias = RelativeBias(original) if hasattr(original, "relative_attention_bias") else None
    encoder = SparseEncoder(stack, model.config, max_density, backend, relative_bias=bias)
    parent_name, _, child = encoder_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, encoder)
    report = SparsifyReport("encoder", backend, encoder.ops())
    log.info("sparsified %s: %s", type(model).__name__, report.summary())
    return report
