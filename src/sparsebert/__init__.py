"""sparsebert: knowledge-aware sparse pruning of pre-trained BERT-family encoders (SparseBERT).

The pipeline, one module each: data -> models -> pruning -> distill -> train -> api -> report -> cli; the
sparse CPU runtime (``sparsebert.runtime``) serves what it produces without importing training.

The public API below is imported on first access (a module ``__getattr__``, PEP 562), not here: importing
any submodule runs this file first, and ``sparsebert.api`` pulls in the training loop and accelerate, which
``import sparsebert.errors`` or the runtime must not pay for. ``from sparsebert import prune`` works as ever.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and editors see; at run time, __getattr__ below
    from sparsebert.api import compress, evaluate, finetune, prune
    from sparsebert.config import CompressConfig, EvaluateConfig, FinetuneConfig, PruneConfig
    from sparsebert.distill import AttentionScoreRecorder, DistillationLoss, LossWeights
    from sparsebert.errors import SparseBertError
    from sparsebert.export import export_compressed, load
    from sparsebert.layers import find_prunable_linears
    from sparsebert.options import build_config
    from sparsebert.pruning import CubicSparsitySchedule, Pruner, sparsity_report

# Each public name -> the module that defines it.
_EXPORTS = {
    **dict.fromkeys(("compress", "evaluate", "finetune", "prune"), "sparsebert.api"),
    **dict.fromkeys(("CompressConfig", "EvaluateConfig", "FinetuneConfig", "PruneConfig"), "sparsebert.config"),
    "build_config": "sparsebert.options",
    **dict.fromkeys(("AttentionScoreRecorder", "DistillationLoss", "LossWeights"), "sparsebert.distill"),
    "SparseBertError": "sparsebert.errors",
    **dict.fromkeys(("export_compressed", "load"), "sparsebert.export"),
    "find_prunable_linears": "sparsebert.layers",
    **dict.fromkeys(("CubicSparsitySchedule", "Pruner", "sparsity_report"), "sparsebert.pruning"),
}

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


def __getattr__(name: str):
    """Import a public name's module on first access, and keep the name here for the next one."""
    module = _EXPORTS.get(name)
    if module is None:  # also how ``from sparsebert import config`` falls through to the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
