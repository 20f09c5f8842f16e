"""Each GLUE metric against values computed by hand."""

import math

import numpy as np
import pytest

from sparsebert.metrics import compute_metrics, predictions_from_logits
from sparsebert.tasks import get_task


def test_accuracy_and_f1_for_mrpc():
    labels = np.array([1, 1, 1, 0, 0, 0])
    preds = np.array([1, 1, 0, 1, 0, 0])
    # tp=2, fp=1, fn=1 -> precision 2/3, recall 2/3, F1 2/3; accuracy 4/6
    m = compute_metrics(get_task("mrpc"), preds, labels)
    assert m == pytest.approx({"accuracy": 4 / 6, "f1": 2 / 3})


def test_matthews_correlation_for_cola():
    labels = np.array([1, 1, 1, 0, 0, 0])
    preds = np.array([1, 1, 0, 1, 0, 0])
    tp, tn, fp, fn = 2, 2, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert compute_metrics(get_task("cola"), preds, labels)["mcc"] == pytest.approx(mcc)  # = 1/3


def test_pearson_and_spearman_for_stsb():
    labels = np.array([0.0, 1.0, 2.0, 3.0])
    preds = np.array([0.0, 1.0, 4.0, 3.0])
    # Pearson by hand: means 1.5 and 2.0
    dx, dy = labels - 1.5, preds - 2.0
    pearson = (dx * dy).sum() / math.sqrt((dx**2).sum() * (dy**2).sum())
    # ranks of preds: 1,2,4,3 vs 1,2,3,4 -> d^2 = 0+0+1+1 -> 1 - 6*2/(4*15) = 0.8
    m = compute_metrics(get_task("stsb"), preds, labels)
    assert m["pearson"] == pytest.approx(pearson) and m["spearman"] == pytest.approx(0.8)


def test_constant_predictions_give_zero_correlation_not_nan():
    m = compute_metrics(get_task("stsb"), np.ones(4), np.array([0.0, 1.0, 2.0, 3.0]))
    assert m == {"pearson": 0.0, "spearman": 0.0}


def test_predictions_from_logits():
    logits = np.array([[0.1, 0.9], [2.0, -1.0]])
    assert predictions_from_logits(get_task("sst2"), logits).tolist() == [1, 0]
    assert predictions_from_logits(get_task("stsb"), np.array([[3.5], [1.0]])).tolist() == [3.5, 1.0]
