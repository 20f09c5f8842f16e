"""The pruning engine: independent of any training loop (see ``MagnitudePruner``)."""

from sparsebert.pruning.layers import ROLES, PrunableLinear, find_encoder_layers, find_prunable_linears
from sparsebert.pruning.pruner import MagnitudePruner, sparsity_report
from sparsebert.pruning.schedule import CubicSparsitySchedule

__all__ = [
    "ROLES",
    "CubicSparsitySchedule",
    "MagnitudePruner",
    "PrunableLinear",
    "find_encoder_layers",
    "find_prunable_linears",
    "sparsity_report",
]
