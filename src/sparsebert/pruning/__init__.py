"""The pruning engine: independent of any training loop (see ``Pruner``).

The layer map it prunes (``find_prunable_linears`` and the rest) lives in ``sparsebert.layers``, shared with
the runtime and the export; it is re-exported here for the callers that think of it as pruning's.
"""

from sparsebert.layers import ROLES, PrunableLinear, find_encoder_layers, find_prunable_linears
from sparsebert.pruning.criteria import CRITERIA, PRUNE_CRITERIA
from sparsebert.pruning.pruner import MAX_SPARSITY, PRUNE_BLOCKS, Pruner, sparsity_report
from sparsebert.pruning.schedule import CubicSparsitySchedule, resolve_step

__all__ = [
    "CRITERIA",
    "MAX_SPARSITY",
    "PRUNE_BLOCKS",
    "PRUNE_CRITERIA",
    "ROLES",
    "CubicSparsitySchedule",
    "PrunableLinear",
    "Pruner",
    "find_encoder_layers",
    "find_prunable_linears",
    "resolve_step",
    "sparsity_report",
]
