"""GLUE metrics under the names used everywhere in sparsebert: accuracy, f1, mcc, pearson, spearman.

scikit-learn and scipy do the arithmetic; this module only picks, per task, what GLUE reports.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from sparsebert.tasks import TaskSpec


def _f1(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> float:
    # GLUE's F1 (MRPC, QQP) is binary F1 of the positive class; for more classes we use macro F1.
    return float(f1_score(labels, preds, average="binary" if num_labels == 2 else "macro", zero_division=0))


METRIC_FUNCS = {
    "accuracy": lambda y, p, n: float(accuracy_score(y, p)),
    "f1": _f1,
    "mcc": lambda y, p, n: float(matthews_corrcoef(y, p)),
    "pearson": lambda y, p, n: float(pearsonr(p, y)[0]) if np.std(p) > 0 and np.std(y) > 0 else 0.0,
    "spearman": lambda y, p, n: float(spearmanr(p, y)[0]) if np.std(p) > 0 and np.std(y) > 0 else 0.0,
}


def predictions_from_logits(task: TaskSpec, logits: np.ndarray) -> np.ndarray:
    """Class ids (argmax) for classification, the scalar output for regression."""
    return logits.squeeze(-1) if task.is_regression else logits.argmax(-1)


def compute_metrics(task: TaskSpec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's GLUE metrics for (already argmax-ed or scalar) predictions."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return {name: METRIC_FUNCS[name](labels, predictions, task.num_labels) for name in task.metrics}
