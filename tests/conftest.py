"""Fixtures: a tiny WordPiece tokenizer and tiny random BERT-family models, and GLUE-layout data, all
made by the tests (no network, no shared data)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

POSITIVE = ["good", "great", "fine", "superb", "lovely", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull", "ugly", "weak"]
FILLER = ["the", "movie", "film", "plot", "was", "is", "a", "very", "story", "actor", "and", "quite"]
# The STS-B files' header (regression label in the last column).
STSB_HEADER = [
    "index",
    "genre",
    "filename",
    "year",
    "old_index",
    "source1",
    "source2",
    "sentence1",
    "sentence2",
    "score",
]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same random state, whatever ran before it: a test that draws from
    the global generators (``torch.randn``, ``random``, numpy) sees the same inputs on every run."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def sentiment_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """Sentences whose label is the polarity of their one opinion word: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        # 2 to 6 words: batches differ in length, so length grouping and dynamic padding are exercised
        words = [*rng.sample(FILLER, rng.randint(1, 5)), rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 'pre-trained' tiny BERT (random weights) with its tokenizer, saved in HF format."""
    path = tmp_path_factory.mktemp("tiny-bert")
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    return path


def write_tsv(path: Path, header: list[str] | None, rows: list[list], bom: bool = False) -> Path:
    lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, r)) for r in rows]
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sst_dir(tmp_path_factory) -> Path:
    """An SST-2-layout folder with 192 training and 64 dev sentences."""
    path = tmp_path_factory.mktemp("SST-2")
    write_tsv(path / "train.tsv", ["sentence", "label"], [list(r) for r in sentiment_rows(192, 1)])
    write_tsv(path / "dev.tsv", ["sentence", "label"], [list(r) for r in sentiment_rows(64, 2)])
    return path


def cli(*args) -> int:
    """Run the ``sparsebert`` command line in-process; return its exit status."""
    from sparsebert.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code


def outputs_of(model_dir: Path, texts: list[str]) -> torch.Tensor:
    """Logits of a saved model, loaded with plain transformers (no sparsebert code)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**tok(texts, return_tensors="pt", padding=True)).logits
