"""Per-projection swap: replace each prunable ``nn.Linear`` by a sparse one, for any architecture.

This is the general fallback when the encoder is not BERT-style (e.g. DistilBERT): it works everywhere but
pays a transpose of the activations into and out of every projection, which is why the feature-major
``SparseEncoder`` is preferred where it applies.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsebert.layers import find_prunable_linears
from sparsebert.runtime.ops import ProjectionOp, make_projection


class SparseLinear(nn.Module):
    """Inference-only stand-in for an ``nn.Linear`` whose weight is mostly zeros."""

    def __init__(self, linear: nn.Linear, max_density: float | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.op: ProjectionOp = make_projection(linear.weight, linear.bias, max_density, backend)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xt = x.detach().float().reshape(-1, self.in_features).t().contiguous()
        return self.op(xt).t().reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.op.kind}"


def swap_linears(model: nn.Module, max_density: float | None = None, backend: str = "auto") -> list[ProjectionOp]:
    """Replace every prunable projection in place; returns their projections."""
    ops = []
    for target in find_prunable_linears(model):
        parent_name, _, child = target.name.rpartition(".")
        sparse = SparseLinear(target.module, max_density, backend)
        setattr(model.get_submodule(parent_name), child, sparse)
        ops.append(sparse.op)
    return ops
