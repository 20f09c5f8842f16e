"""Small dense students: sized to a sparsity's nonzero budget, initialised from the pre-trained weights."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig

from sparsebert.students import (
    dense_shape,
    encoder_linear_weights,
    fit_dense_student,
    linear_weights,
    make_dense_student,
    nonzero_linear_weights,
)


def base():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=48, num_hidden_layers=6, num_attention_heads=6, intermediate_size=96)
    return AutoModelForSequenceClassification.from_config(config)


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.8, 0.9])
def test_dense_student_matches_the_nonzero_budget(sparsity):
    model = base()
    student = make_dense_student(model, sparsity)
    budget = (1 - sparsity) * 6 * linear_weights(model.config)
    layers, hidden, _, ffn = dense_shape(model.config, sparsity)
    assert nonzero_linear_weights(student) == layers * (4 * hidden**2 + 2 * hidden * ffn)  # exactly that shape
    # Heads come in whole units: the width is off by at most half a head of the ideal scale, and the
    # weights grow with the square of the width (plus a rounded FFN unit at most).
    scale = min(1.0, (budget / (layers * linear_weights(model.config))) ** 0.5)
    bound = (1 + 0.5 / (6 * scale)) ** 2 - 1 + 1 / 96
    assert abs(nonzero_linear_weights(student) / budget - 1) <= bound


def test_layers_are_dropped_first_then_width():
    config = base().config
    assert dense_shape(config, 0.5) == (3, 48, 6, 96)  # half the layers, full width
    layers, hidden, heads, ffn = dense_shape(config, 0.9)
    assert layers == 1 and hidden < 48 and hidden == heads * 8 and ffn < 96


def test_dense_student_keeps_uniformly_chosen_pretrained_layers():
    model = base()
    student = make_dense_student(model, 0.5)  # keeps layers 1, 3, 5 (uniform map, the last one kept)
    for i, src in enumerate([1, 3, 5]):
        assert torch.equal(
            student.bert.encoder.layer[i].attention.self.query.weight,
            model.bert.encoder.layer[src].attention.self.query.weight,
        )
    narrow = make_dense_student(model, 0.9)
    w = narrow.bert.encoder.layer[0].intermediate.dense.weight
    assert torch.equal(w, model.bert.encoder.layer[5].intermediate.dense.weight[: w.shape[0], : w.shape[1]])
    assert torch.equal(
        narrow.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight[:, : w.shape[1]]
    )


def test_a_smaller_pretrained_student_is_used_as_is_when_it_fits_the_budget():
    model = base()
    small = make_dense_student(model, 0.5)  # stands in for a 3-layer pre-trained model such as minilm-l3
    assert fit_dense_student(small, model.config, 0.5) is small  # 3 of 6 layers: exactly the 50% budget
    assert fit_dense_student(small, model.config, 0.3) is small  # smaller than the budget: kept, not grown
    cut = fit_dense_student(small, model.config, 0.9)  # 10% of the reference = 20% of the small one
    assert cut.config.num_hidden_layers == 1
    assert nonzero_linear_weights(cut) == pytest.approx(0.1 * encoder_linear_weights(model.config), rel=0.3)
    own = fit_dense_student(model, model.config, 0.5)
    assert own.config.num_hidden_layers == 3  # the model itself is cut down as before


def test_an_mpnet_dense_student_slices_the_relative_bias_and_distils():
    """mpnet-base (BERT-base's shapes) is the 12-layer model the paper's sparse-vs-dense claim is measured on:
    its dense student keeps the first heads of the relative-position table and trains against the teacher."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    from sparsebert.distill import DistillationLoss, LossWeights, attention_comparable, distillation_step

    torch.manual_seed(0)
    config = MPNetConfig(vocab_size=60, hidden_size=48, num_hidden_layers=4, num_attention_heads=6,
                         intermediate_size=96, num_labels=2)  # fmt: skip
    teacher = MPNetForSequenceClassification(config).eval()
    student = make_dense_student(teacher, 0.95)
    layers, hidden, heads, _ = dense_shape(config, 0.95)
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (layers, hidden) and hidden < 48
    table = student.mpnet.encoder.relative_attention_bias.weight
    assert torch.equal(table, teacher.mpnet.encoder.relative_attention_bias.weight[:, :heads])
    assert not attention_comparable(student.config, teacher.config)  # fewer heads: no attention term
    loss_fn = DistillationLoss(student.config, teacher.config, LossWeights(attention=0.0))
    step = distillation_step(teacher, student, loss_fn)
    ids = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(1))
    loss, _ = step(student, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])})
    loss.backward()
    assert torch.isfinite(loss) and student.mpnet.encoder.layer[0].intermediate.dense.weight.grad.abs().sum() > 0
