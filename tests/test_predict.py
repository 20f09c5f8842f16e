"""``sparsebert predict`` on a pruned model: HF and compressed folders agree, every layout reads, bad rows
name their line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli, sentiment_rows, write_tsv

from sparsebert.runtime.bf16 import bf16_available

FAST = ["--max-seq-length", "16", "--batch-size", "16", "--eval-batch-size", "32"]


@pytest.fixture(scope="module")
def pruned_pair(tiny_model_dir, sst_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A pruned classifier as an HF folder and as a compressed folder."""
    root = tmp_path_factory.mktemp("predict")
    common = ["--task", "sst2", "--data-dir", sst_dir, *FAST]
    assert cli("finetune", "--model", tiny_model_dir, "--output-dir", root / "t", "--max-steps", "6", *common) == 0
    args = ["prune", "--teacher", root / "t", "--student", tiny_model_dir, "--strategy", "sparsebert"]
    assert cli(*args, "--sparsity", "0.9", "--max-steps", "6", "--output-dir", root / "s", *common) == 0
    assert cli("export", "--model", root / "s", "--output-dir", root / "csr") == 0
    return root / "s", root / "csr"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_hf_and_compressed_folders_give_the_same_labels(pruned_pair, sst_dir, tmp_path, capsys):
    hf, csr = pruned_pair
    outputs = {}
    runs = (("hf", hf, "dense", "auto"), ("csr", csr, "sparse", "auto"), ("auto", csr, "auto", "auto"),
            ("torch", csr, "sparse", "torch"))  # fmt: skip
    for name, model, engine, backend in runs:
        out = tmp_path / f"{name}.jsonl"
        args = ["predict", "--model", model, "--input", sst_dir / "dev.tsv", "--task", "sst2", "--output", out]
        assert cli(*args, "--engine", engine, "--backend", backend, "--batch-size", "7") == 0
        outputs[name] = _lines(out)
    assert "sentences/s" in capsys.readouterr().out
    assert len(outputs["hf"]) == 64  # one line per input, in input order (ids are line numbers)
    assert [r["id"] for r in outputs["hf"]] == list(range(2, 66))
    for name in ("csr", "auto", "torch"):
        assert [r["label"] for r in outputs[name]] == [r["label"] for r in outputs["hf"]]
        for a, b in zip(outputs[name], outputs["hf"], strict=True):
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)
    assert all(set(r["probabilities"]) == {"0", "1"} for r in outputs["hf"])


def test_cola_layout_and_own_files(pruned_pair, tmp_path, capsys):
    hf, _ = pruned_pair
    rows = sentiment_rows(5, 3)
    write_tsv(tmp_path / "cola.tsv", None, [["src", label, "", text] for text, label in rows])  # no header
    assert (
        cli("predict", "--model", hf, "--input", tmp_path / "cola.tsv", "--task", "cola", "--output", tmp_path / "c")
        == 0
    )
    assert len(_lines(tmp_path / "c")) == 5
    (tmp_path / "own.jsonl").write_text('{"text": "good film"}\n{"body": "no text here"}\n')
    code = cli(
        "predict",
        "--model",
        hf,
        "--input",
        tmp_path / "own.jsonl",
        "--text-columns",
        "text",
        "--output",
        tmp_path / "o",
    )
    err = capsys.readouterr().err
    assert code == 2 and "own.jsonl:2: missing field(s) text" in err and "Traceback" not in err


def test_predict_truncates_as_in_training_and_never_replaces_what_it_reads(pruned_pair, tmp_path, capsys):
    from sparsebert.models import load_tokenizer

    hf, csr = pruned_pair
    assert load_tokenizer(hf).model_max_length == load_tokenizer(csr).model_max_length == 16  # the training length
    rows = [[" ".join(text for text, _ in sentiment_rows(12, seed))] for seed in range(6)]  # ~50 tokens each
    inputs = write_tsv(tmp_path / "long.tsv", ["text"], rows)
    probabilities = {}
    for length in ([], ["--max-seq-length", "16"], ["--max-seq-length", "64"]):
        out = tmp_path / f"p{length}.jsonl"
        assert cli("predict", "--model", hf, "--input", inputs, "--text-columns", "text", "--output", out, *length) == 0
        probabilities[tuple(length)] = [r["probabilities"] for r in _lines(out)]
    assert probabilities[()] == probabilities[("--max-seq-length", "16")]
    assert probabilities[()] != probabilities[("--max-seq-length", "64")]  # the length matters on these inputs
    before = inputs.read_text()
    code = cli("predict", "--model", hf, "--input", inputs, "--text-columns", "text", "--output", inputs)
    assert code == 2 and "would replace the input" in capsys.readouterr().err
    assert inputs.read_text() == before
    code = cli("predict", "--model", hf, "--input", inputs, "--text-columns", "text", "--output", hf / "config.json")
    assert code == 2 and "would replace the input" in capsys.readouterr().err


@pytest.mark.skipif(not bf16_available(), reason="the bf16 engine needs AVX512-BF16")
def test_predict_on_the_bf16_engine_stays_within_bf16s_rounding(pruned_pair, sst_dir, tmp_path):
    """``--backend bf16`` through the CLI: every probability within 0.02 of the exact engine's, so every label
    the exact engine gives with a margin is the same."""
    _, csr = pruned_pair
    outputs = {}
    for backend in ("auto", "bf16"):
        out = tmp_path / f"{backend}.jsonl"
        args = ["predict", "--model", csr, "--input", sst_dir / "dev.tsv", "--task", "sst2", "--output", out]
        assert cli(*args, "--engine", "sparse", "--backend", backend) == 0
        outputs[backend] = _lines(out)
    for exact, fast in zip(outputs["auto"], outputs["bf16"], strict=True):
        assert fast["probabilities"] == pytest.approx(exact["probabilities"], abs=0.02)
        if abs(exact["probabilities"]["1"] - 0.5) > 0.05:
            assert fast["label"] == exact["label"]
