"""The pruner composed with someone else's loop: an HF Trainer and a plain PyTorch loop."""

from __future__ import annotations

import pytest
import torch
from conftest import sentiment_rows
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from sparsebert.distill import AttentionScoreRecorder, DistillationLoss
from sparsebert.integrations import PrunerCallback
from sparsebert.pruning import CubicSparsitySchedule, Pruner


def _dataset(model_dir) -> list[dict]:
    """64 tokenised sentiment sentences, as an HF Trainer takes them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = sentiment_rows(64, 3)
    enc = tok([r[0] for r in rows], padding=True)
    return [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": rows[i][1]}
        for i in range(len(rows))
    ]


def test_hf_trainer_with_pruner_callback(tiny_model_dir, tmp_path):
    data = _dataset(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    pruner = Pruner(model, CubicSparsitySchedule(0.8, start_step=0, end_step=8, num_updates=4))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        learning_rate=1e-3,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[PrunerCallback(pruner)]).train()
    assert pruner.last_step == 12
    assert pruner.sparsity_report()["overall"] == pytest.approx(0.8, abs=1e-3)


def test_pruner_state_travels_with_the_trainers_checkpoints(tiny_model_dir, tmp_path):
    """Stopped after checkpoint-4 and resumed from it, the run ends with the uninterrupted run's masks."""
    data = _dataset(tiny_model_dir)

    def run(out, max_steps, resume=None):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
        pruner = Pruner(model, CubicSparsitySchedule(0.8, start_step=0, end_step=8, num_updates=8))
        args = TrainingArguments(
            output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8, report_to=[],
            save_strategy="steps", save_steps=4, use_cpu=True, learning_rate=1e-3, seed=0,
            lr_scheduler_type="constant",  # the same LR at steps 1-4 whatever max_steps says
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=data, callbacks=[PrunerCallback(pruner)]).train(
            resume_from_checkpoint=resume
        )
        return pruner

    straight = run(tmp_path / "a", 8)
    run(tmp_path / "b", 4)  # "stopped" after its checkpoint at step 4
    resumed = run(tmp_path / "b", 8, resume=True)
    assert resumed.last_step == straight.last_step == 8
    for name, mask in straight.masks.items():
        assert torch.equal(resumed.masks[name], mask), name


def test_own_loop_with_distillation_loss_alone(tiny_model_dir):
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).eval()
    student = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    student.load_state_dict(teacher.state_dict())  # identical start: attention and hidden terms are 0
    loss_fn = DistillationLoss(student.config, teacher.config)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    pruner = Pruner(student, CubicSparsitySchedule(0.5, 0, 5, num_updates=5))
    ids = torch.randint(5, 20, (4, 9))
    mask = torch.ones_like(ids)
    s_rec, t_rec = AttentionScoreRecorder(student), AttentionScoreRecorder(teacher)
    losses = []
    for _ in range(5):
        with torch.no_grad(), t_rec:
            t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        with s_rec:
            s = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        out = loss_fn(s.logits, t.logits, s.hidden_states, t.hidden_states, s_rec.scores(mask), t_rec.scores(mask))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
        losses.append({k: float(v) for k, v in out.parts.items()})
    assert losses[0]["attention"] < 1e-9 and losses[0]["hidden"] < 1e-9
    assert losses[-1]["hidden"] > 0 and pruner.sparsity_report()["overall"] == pytest.approx(0.5, abs=1e-3)
