"""Distillation losses against hand-computed values; attention scores against transformers' own."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, BertConfig, DistilBertConfig, RobertaConfig

from sparsebert.distill import (
    AttentionScoreRecorder,
    AttentionScores,
    DistillationLoss,
    LossWeights,
    layer_map,
    score_mse,
    soft_cross_entropy,
)
from sparsebert.errors import SparseBertError


def bert(layers=2, hidden=16, heads=2, num_labels=2):
    return BertConfig(
        vocab_size=40,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=32,
        num_labels=num_labels,
    )


def test_soft_cross_entropy_by_hand():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    p_t = [1 / (1 + math.e), math.e / (1 + math.e)]
    log_p_s = [-math.log(1 + math.exp(-1)), -math.log(1 + math.e)]
    expected = -(p_t[0] * log_p_s[0] + p_t[1] * log_p_s[1]) / 2  # averaged over batch x classes
    assert float(soft_cross_entropy(s, t, 1.0)) == pytest.approx(expected)
    # temperature 2 softens both distributions, and T² = 4 keeps the gradients' scale
    p2 = torch.softmax(t / 2, -1)
    expected2 = 4 * float(-(p2 * torch.log_softmax(s / 2, -1)).sum() / 2)
    assert float(soft_cross_entropy(s, t, 2.0)) == pytest.approx(expected2)


def test_hidden_and_attention_terms_sum_mse_over_layers():
    loss = DistillationLoss(bert(), bert(), LossWeights(attention=2.0, hidden=3.0, prediction=0.0))
    sh = tuple(torch.zeros(1, 2, 16) for _ in range(3))
    th = tuple(torch.full((1, 2, 16), float(i + 1)) for i in range(3))  # MSEs 1, 4, 9
    ss = [torch.zeros(1, 2, 2, 2)] * 2
    ts = [torch.ones(1, 2, 2, 2), torch.full((1, 2, 2, 2), 2.0)]  # MSEs 1, 4
    out = loss(torch.zeros(1, 2), torch.zeros(1, 2), sh, th, ss, ts)
    assert float(out.parts["hidden"]) == pytest.approx(14.0)
    assert float(out.parts["attention"]) == pytest.approx(5.0)
    assert float(out.loss) == pytest.approx(2 * 5 + 3 * 14)


def test_regression_prediction_targets():
    s, t, y = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [0.0]]), torch.tensor([3.0, 2.0])
    cfg = bert(num_labels=1)
    only_pred = LossWeights(0, 0, 1)
    assert float(DistillationLoss(cfg, cfg, only_pred, regression_target="teacher")(s, t).loss) == pytest.approx(2.5)
    assert float(
        DistillationLoss(cfg, cfg, only_pred, regression_target="label")(s, t, labels=y).loss
    ) == pytest.approx(2.0)
    assert float(DistillationLoss(cfg, cfg, only_pred, regression_target="both")(s, t, labels=y).loss) == pytest.approx(
        4.5
    )


def test_regression_prediction_is_divided_by_the_label_variance():
    """The regression MSE divided by the scale given (api passes the training labels' variance), so a
    task in other units gives the same loss; 'none' keeps the plain MSE."""
    from types import SimpleNamespace

    from sparsebert.data import Example
    from sparsebert.distill import regression_scale
    from sparsebert.tasks import get_task

    s, t = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [0.0]])
    cfg = bert(num_labels=1)
    scaled = DistillationLoss(cfg, cfg, LossWeights(0, 0, 1), regression_scale=4.0)
    assert float(scaled(s, t).loss) == pytest.approx(2.5 / 4)
    assert float(scaled(10 * s, 10 * t).loss) == pytest.approx(250 / 4)
    with pytest.raises(SparseBertError, match="regression scale"):
        DistillationLoss(cfg, cfg, regression_scale=0.0)

    data = SimpleNamespace(task=get_task("stsb"), train=[Example(("a",), y) for y in (1.0, 3.0, 5.0)])
    assert regression_scale(data, "variance") == pytest.approx(8 / 3)
    assert regression_scale(data, "none") == 1.0
    data.task = get_task("mrpc")
    assert regression_scale(data, "variance") == 1.0  # classification


def test_uniform_layer_map_and_width_projection():
    assert layer_map(4, 12) == [2, 5, 8, 11]
    assert layer_map(6, 6) == list(range(6))
    assert layer_map(5, 12) == [2, 4, 7, 9, 11]  # any depth: uniform, the last layers meet
    with pytest.raises(SparseBertError):
        layer_map(7, 6)
    loss = DistillationLoss(bert(layers=2, hidden=8), bert(layers=4, hidden=16), LossWeights(0, 1, 0))
    assert loss.projection is not None and loss.projection.weight.shape == (16, 8)
    sh = tuple(torch.randn(1, 3, 8) for _ in range(3))
    th = tuple(torch.randn(1, 3, 16) for _ in range(5))
    out = loss(torch.zeros(1, 2), torch.zeros(1, 2), sh, th)
    out.loss.backward()
    assert loss.projection.weight.grad is not None  # the projection is learned
    with pytest.raises(SparseBertError, match="equal head counts"):
        DistillationLoss(bert(heads=2), bert(heads=4), LossWeights(1, 1, 1))


@pytest.mark.parametrize(
    "config",
    [
        bert(),
        RobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32),
        DistilBertConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, hidden_dim=32),
    ],
)
def test_recorded_scores_are_the_pre_softmax_attention(config):
    """softmax(recorded scores + padding mask) must equal the eager implementation's probabilities."""
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    ids = torch.randint(5, 40, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad(), AttentionScoreRecorder(model) as rec:
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        scores = [layer.dense() for layer in rec.scores(mask)]
    assert len(scores) == 2
    for recorded, probs in zip(scores, out.attentions, strict=True):
        masked = recorded.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        rows = mask.bool()  # compare only real query positions
        assert torch.allclose(torch.softmax(masked, -1)[0], probs[0], atol=1e-5)
        assert torch.allclose(torch.softmax(masked, -1)[1][:, rows[1]], probs[1][:, rows[1]], atol=1e-5)
        assert (recorded[1][:, :, 4:] == 0).all() and (recorded[1][:, 4:, :] == 0).all()


@pytest.mark.parametrize("autocast", [False, True])
def test_the_score_mse_from_factors_equals_the_dense_mse_and_its_gradient(autocast):
    """``score_mse`` on (Q, K) factors against ``F.mse_loss`` on the seq x seq scores: value and gradient,
    a narrower student (d_head 4 against 8), padding, and under bf16 autocast (the factors' products must
    stay fp32: the expansion's cancellation would lose the loss in bf16)."""
    gen = torch.Generator().manual_seed(3)
    sq, sk = (torch.randn(2, 3, 11, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    tq, tk = (torch.randn(2, 3, 11, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    sq, sk = sq.float().requires_grad_(), sk.float().requires_grad_()
    sq.data[1, :, 7:], sk.data[1, :, 7:], tq[1, :, 7:], tk[1, :, 7:] = 0, 0, 0, 0  # a padded sequence
    student, teacher = AttentionScores(sq, sk), AttentionScores(tq.float(), tk.float())
    want = F.mse_loss(sq.double() @ sk.double().mT, tq @ tk.mT)
    want.backward()
    grads = sq.grad.clone(), sk.grad.clone()
    sq.grad, sk.grad = None, None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = score_mse(student, teacher)
    got.backward()
    assert got.dtype == torch.float32 and float(got.detach()) == pytest.approx(float(want), rel=1e-5)
    torch.testing.assert_close(sq.grad, grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sk.grad, grads[1], rtol=1e-4, atol=1e-6)
    assert float(score_mse(student, student)) == pytest.approx(0.0, abs=1e-6)
    assert float(score_mse(student, teacher.dense())) == pytest.approx(float(want), rel=1e-5)  # a dense side


def test_loss_weights_parse():
    assert LossWeights.parse("1,0.5,2") == LossWeights(1.0, 0.5, 2.0)
    assert LossWeights.parse({"hidden": 0}) == LossWeights(1.0, 0.0, 1.0)
    with pytest.raises(SparseBertError):
        LossWeights.parse("1,2")


@pytest.mark.parametrize("teacher_layers", range(2, 25))
def test_every_dense_student_depth_has_a_layer_map(teacher_layers):
    """A dense student's depth comes from ``dense_shape``; the distillation must accept every one."""
    from sparsebert.students import dense_shape

    teacher = bert(layers=teacher_layers, hidden=64)
    for sparsity in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97):
        layers, hidden, heads, _ = dense_shape(teacher, sparsity)
        mapping = layer_map(layers, teacher_layers)
        assert len(mapping) == layers and mapping[-1] == teacher_layers - 1
        assert mapping[0] >= 0 and all(a < b for a, b in itertools.pairwise(mapping))
        weights = LossWeights(0 if heads != teacher.num_attention_heads else 1, 1, 1)
        assert DistillationLoss(bert(layers, hidden, heads), teacher, weights).layer_map == mapping
