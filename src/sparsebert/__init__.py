"""sparsebert: knowledge-aware sparse pruning of pre-trained BERT-family encoders (SparseBERT).

The pipeline, one module each: data -> models -> pruning -> distill -> train -> api -> report -> cli.
"""

from sparsebert.api import compress, evaluate, finetune, prune
from sparsebert.config import CompressConfig, EvaluateConfig, FinetuneConfig, PruneConfig, build_config
from sparsebert.distill import AttentionScoreRecorder, DistillationLoss, LossWeights
from sparsebert.errors import SparseBertError
from sparsebert.export import export_compressed, load
from sparsebert.pruning import CubicSparsitySchedule, Pruner, find_prunable_linears, sparsity_report

__all__ = [
    "AttentionScoreRecorder",
    "CompressConfig",
    "CubicSparsitySchedule",
    "DistillationLoss",
    "EvaluateConfig",
    "FinetuneConfig",
    "LossWeights",
    "PruneConfig",
    "Pruner",
    "SparseBertError",
    "build_config",
    "compress",
    "evaluate",
    "export_compressed",
    "find_prunable_linears",
    "finetune",
    "load",
    "prune",
    "sparsity_report",
]
__version__ = "0.1.0"
