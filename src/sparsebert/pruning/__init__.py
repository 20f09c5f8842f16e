"""The pruning engine: independent of any training loop (see ``Pruner``)."""

from sparsebert.pruning.layers import ROLES, PrunableLinear, find_encoder_layers, find_prunable_linears
from sparsebert.pruning.pruner import Pruner, sparsity_report
from sparsebert.pruning.schedule import CubicSparsitySchedule, resolve_step

__all__ = [
    "ROLES",
    "CubicSparsitySchedule",
    "PrunableLinear",
    "Pruner",
    "find_encoder_layers",
    "find_prunable_linears",
    "resolve_step",
    "sparsity_report",
]
