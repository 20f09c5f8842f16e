"""Fixtures: a tiny WordPiece tokenizer and tiny random BERT-family models, and GLUE-layout data, all
made by the tests (no network, no shared data)."""

from __future__ import annotations

import json
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


# Extractive QA (SQuAD v1.1): tiny articles from the tiny vocabulary, windows that overflow at 32 tokens.
QA_WINDOWS = ["--max-seq-length", "32", "--doc-stride", "8"]
QA_FAST = [*QA_WINDOWS, "--batch-size", "16", "--eval-batch-size", "8", "--log-every", "2", "--eval-every", "0",
        "--mixed-precision", "no"]  # fmt: skip


def squad_articles(n_contexts: int, seed: int, two_golds: bool) -> dict:
    """SQuAD v1.1 JSON: contexts of 45 words from the tiny vocabulary, each holding its six POSITIVE words once;
    question k of a context asks for the word after POSITIVE[k] ("what is <word>"; "what" is [UNK]), and the
    answer is that word with its successor. Dev questions also accept the one word (the official dev set has
    several answers per question)."""
    rng = random.Random(seed)
    paragraphs = []
    for c in range(n_contexts):
        words = [rng.choice(FILLER + NEGATIVE) for _ in range(45)]
        places = rng.sample(range(0, 44, 2), len(POSITIVE))  # never the last word: every answer has two
        for word, place in zip(POSITIVE, places, strict=True):
            words[place] = word
        context = " ".join(words)
        qas = []
        for k, (word, place) in enumerate(zip(POSITIVE, places, strict=True)):
            start = len(" ".join(words[:place])) + (1 if place else 0)
            text = f"{word} {words[place + 1]}"
            answers = [{"text": text, "answer_start": start}]
            if two_golds:
                answers.append({"text": word, "answer_start": start})
            qas.append({"id": f"s{seed}-c{c}-q{k}", "question": f"what is {word}", "answers": answers})
        paragraphs.append({"context": context, "qas": qas})
    return {"version": "1.1", "data": [{"title": "tiny", "paragraphs": paragraphs}]}


@pytest.fixture(scope="session")
def squad_dir(tmp_path_factory) -> Path:
    """train-v1.1.json (48 questions) and dev-v1.1.json (24 questions) in a folder, as SQuAD is distributed."""
    path = tmp_path_factory.mktemp("squad")
    (path / "train-v1.1.json").write_text(json.dumps(squad_articles(8, 1, two_golds=False)))
    (path / "dev-v1.1.json").write_text(json.dumps(squad_articles(4, 2, two_golds=True)))
    return path


@pytest.fixture(scope="session")
def qa_teacher(tiny_model_dir, squad_dir, tmp_path_factory) -> Path:
    """A tiny span model trained at 32 tokens with windows sharing 8 (both saved with it), shared by the QA tests."""
    out = tmp_path_factory.mktemp("qa-runs") / "teacher"
    args = ["--model", tiny_model_dir, "--task", "squad", "--data-dir", squad_dir, "--output-dir", out]
    assert cli("finetune", *args, "--max-steps", "12", "--lr", "3e-3", *QA_FAST) == 0
    return out
