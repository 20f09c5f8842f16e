"""SQuAD through the jobs: finetune -> prune (SparseBERT) -> evaluate on a tiny random BERT, with windows that
overflow (``--max-seq-length 32 --doc-stride 8``), and the QA parts of options, heads and distillation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QA_FAST as FAST
from conftest import QA_WINDOWS as WINDOWS
from conftest import cli, squad_articles
from transformers import AutoConfig, BertConfig, BertForSequenceClassification

from sparsebert.config import EvaluateConfig, FinetuneConfig, PruneConfig
from sparsebert.distill import (
    DistillationLoss,
    LossWeights,
    label_cross_entropy,
    soft_cross_entropy,
    span_soft_cross_entropy,
)
from sparsebert.qa import read_squad, squad_metrics

ROOT = Path(__file__).resolve().parents[1]


def dev_ids(squad_dir: Path) -> set[str]:
    return {e.id for e in read_squad(squad_dir / "dev-v1.1.json", require_answers=True)}


def test_finetune_squad_writes_em_f1_and_an_answer_for_every_question(qa_teacher, squad_dir):
    record = json.loads((qa_teacher / "metrics.json").read_text())
    assert record["task"] == "squad" and record["num_examples"] == 24
    assert set(record["metrics"]) == {"exact_match", "f1"}
    assert 0 <= record["metrics"]["exact_match"] <= record["metrics"]["f1"] <= 1
    predictions = json.loads((qa_teacher / "predictions.json").read_text())
    assert set(predictions) == dev_ids(squad_dir) and all(isinstance(t, str) for t in predictions.values())
    assert AutoConfig.from_pretrained(qa_teacher).architectures == ["BertForQuestionAnswering"]
    saved = (qa_teacher / "config.yaml").read_text()
    assert "max_seq_length: 32" in saved and "doc_stride: 8" in saved


def test_prune_squad_while_distilling_reaches_the_sparsity(qa_teacher, tiny_model_dir, squad_dir, tmp_path):
    out = tmp_path / "sparse"
    args = ["--teacher", qa_teacher, "--student", tiny_model_dir, "--task", "squad", "--data-dir", squad_dir]
    args += ["--output-dir", out, "--sparsity", "0.5", "--max-steps", "8", "--prune-updates", "4"]
    assert cli("prune", *args, *FAST) == 0
    sparsity = json.loads((out / "sparsity.json").read_text())
    assert sparsity["overall"] == pytest.approx(0.5, abs=1e-3)
    assert set(json.loads((out / "metrics.json").read_text())["metrics"]) == {"exact_match", "f1"}
    assert set(json.loads((out / "predictions.json").read_text())) == dev_ids(squad_dir)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss_prediction" in r]
    assert losses and {"loss_attention", "loss_hidden", "loss_label_ce"} <= set(losses[-1])


def test_evaluate_squad_writes_metrics_and_the_answers_they_score(qa_teacher, squad_dir, tmp_path):
    output = tmp_path / "m.json"
    args = ["--model", qa_teacher, "--task", "squad", "--data-dir", squad_dir, "--doc-stride", "8"]
    assert cli("evaluate", *args, "--output", output) == 0  # the length is the trained one, 32
    record = json.loads(output.read_text())
    predictions = json.loads((tmp_path / "m.predictions.json").read_text())
    examples = read_squad(squad_dir / "dev-v1.1.json", require_answers=True)
    assert set(predictions) == {e.id for e in examples}
    assert record["metrics"] == pytest.approx(squad_metrics(predictions, examples))
    assert record["metrics"] == pytest.approx(json.loads((qa_teacher / "metrics.json").read_text())["metrics"])
    # the same figures from a scorer that shares no code with sparsebert (the official v1.1 rules, in percent)
    scored = subprocess.run([sys.executable, ROOT / "bench" / "squad_v1_score.py", squad_dir / "dev-v1.1.json",
                             tmp_path / "m.predictions.json"], capture_output=True, text=True, check=True)  # fmt: skip
    official = json.loads(scored.stdout)
    assert official == pytest.approx({k: 100 * v for k, v in record["metrics"].items()})
    assert 0 < official["f1"] < 100  # a partly right model: the comparison means something


def test_two_processes_answer_as_one(qa_teacher, squad_dir, tmp_path):
    """Each process pads its windows' logits to a common width before the gather, and the gathered windows
    come back in order without the repeated one (an odd number of windows, one per batch)."""
    from test_end_to_end import _launch_two

    args = ["evaluate", "--model", qa_teacher, "--task", "squad", "--data-dir", squad_dir, "--doc-stride", "8"]
    args += ["--eval-batch-size", "1", "--max-eval-examples", "23"]  # 69 windows of 15 or 32 tokens
    assert cli(*args, "--output", tmp_path / "one.json") == 0
    done = _launch_two([*args, "--output", tmp_path / "two.json"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("json", "predictions.json"):
        assert json.loads((tmp_path / f"two.{name}").read_text()) == json.loads((tmp_path / f"one.{name}").read_text())


def test_squad_files_can_be_given_one_by_one(qa_teacher, squad_dir, tmp_path):
    from sparsebert import api

    config = EvaluateConfig.of(model=str(qa_teacher), task="squad", dev_file=str(squad_dir / "dev-v1.1.json"),
                               doc_stride=8, max_eval_examples=6)  # fmt: skip
    result = api.evaluate(config)
    assert result.output_dir is None and result.details["num_examples"] == 6
    assert len(result.details["predictions"]) == 6


def test_a_head_of_the_other_kind_is_a_one_line_error(qa_teacher, tiny_model_dir, squad_dir, sst_dir, tmp_path, capsys):
    classifier = tmp_path / "classifier"
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig.from_pretrained(tiny_model_dir)).save_pretrained(classifier)
    dev = squad_dir / "dev-v1.1.json"
    capsys.readouterr()  # the save's progress bar
    assert cli("evaluate", "--model", classifier, "--task", "squad", "--dev-file", dev, *WINDOWS) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "sequence-classification head" in err and "task squad needs a question-answering head" in err
    assert cli("evaluate", "--model", qa_teacher, "--task", "sst2", "--data-dir", sst_dir) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "question-answering head" in err and "task sst2" in err


def test_a_dev_file_without_answers_is_refused_before_any_training(squad_dir, tiny_model_dir, tmp_path, capsys):
    articles = squad_articles(1, 3, two_golds=False)
    articles["data"][0]["paragraphs"][0]["qas"][2]["answers"] = []
    (tmp_path / "dev.json").write_text(json.dumps(articles))
    args = ["--model", tiny_model_dir, "--task", "squad", "--train-file", squad_dir / "train-v1.1.json"]
    args += ["--dev-file", tmp_path / "dev.json", "--output-dir", tmp_path / "o"]
    assert cli("finetune", *args, *WINDOWS) == 2
    assert "question s3-c0-q2 has no answers; a dev file needs them to be scored" in capsys.readouterr().err


def test_squad_from_the_hub_layout_becomes_examples(monkeypatch):
    """The hub's SQuAD rows (answers as parallel lists) become QAExamples; the hub itself is replaced here."""
    import datasets

    from sparsebert.data import DataSource, load_task_data
    from sparsebert.tasks import get_task

    row = {"id": "a1", "title": "t", "context": "the film was good", "question": "what was the film",
           "answers": {"text": ["good", "good"], "answer_start": [13, 13]}}  # fmt: skip
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a: asked.append(a) or {"train": [row], "validation": [row]})
    data = load_task_data(get_task("squad"), DataSource(dataset="squad"))
    assert asked == [("squad",)] and data.train[0].answers == [("good", 13), ("good", 13)]
    assert data.dev["dev"][0].context[13:17] == "good" and data.dev["dev"][0].id == "a1"


def test_max_seq_length_is_the_task_s_unless_given():
    assert FinetuneConfig.of(task="squad").data.max_seq_length == 384
    assert PruneConfig.of(task="sst2").data.max_seq_length == 128
    assert FinetuneConfig.of(task="squad", max_seq_length=256).data.max_seq_length == 256
    assert FinetuneConfig().data.max_seq_length is None  # resolved when the data is loaded
    assert EvaluateConfig.of(task="squad").data.max_seq_length is None  # the length the model was trained at


def test_span_distillation_is_the_mean_soft_cross_entropy_of_starts_and_ends():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 2, 7), torch.randn(3, 2, 7)
    by_hand = [(soft_cross_entropy(student[:, i], teacher[:, i], 2.0) * 7) for i in (0, 1)]  # summed over tokens
    assert span_soft_cross_entropy(student, teacher, 2.0) == pytest.approx(float(sum(by_hand) / 2), rel=1e-5)
    config = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    loss = DistillationLoss(config, config, LossWeights(0, 0, 1), temperature=2.0)
    assert float(loss(student, teacher).loss) == pytest.approx(float(sum(by_hand) / 2), rel=1e-5)
    batch = {"start_positions": torch.tensor([0, 1, 2]), "end_positions": torch.tensor([3, 4, 5])}
    ce = [torch.nn.functional.cross_entropy(student[:, i], batch[k]) for i, k in enumerate(batch)]
    assert float(label_cross_entropy(student, batch)) == pytest.approx(float(sum(ce) / 2))
    assert label_cross_entropy(student, {}) is None


def test_padding_positions_do_not_change_a_window_s_span_loss():
    """The same window, alone or in a batch padded wider, gets the same distilled span loss."""
    from sparsebert.distill import span_masked, span_soft_cross_entropy

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(1, 2, 6, generator=gen), torch.randn(1, 2, 6, generator=gen)
    alone = span_soft_cross_entropy(student, teacher, 2.0)
    wide = [torch.cat([t, 5 * torch.randn(1, 2, 4, generator=gen)], dim=-1) for t in (student, teacher)]
    mask = torch.tensor([[1] * 6 + [0] * 4])
    padded = span_soft_cross_entropy(span_masked(wide[0], mask), span_masked(wide[1], mask), 2.0)
    assert float(padded) == pytest.approx(float(alone), rel=1e-5)


def test_evaluate_cuts_windows_as_the_model_was_trained(qa_teacher, squad_dir, tmp_path):
    """The run's --doc-stride travels with the model: evaluate without it scores what the run scored."""
    output = tmp_path / "m.json"
    assert json.loads((qa_teacher / "config.json").read_text())["sparsebert_doc_stride"] == 8
    assert cli("evaluate", "--model", qa_teacher, "--task", "squad", "--data-dir", squad_dir, "--output", output) == 0
    reported = json.loads((qa_teacher / "metrics.json").read_text())["metrics"]
    assert json.loads(output.read_text())["metrics"] == pytest.approx(reported)
