"""Readers for every source and layout, and their one-line errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import STSB_HEADER, write_tsv

from sparsebert.data import DataSource, LengthGroupedSampler, load_task_data, make_loader, subsample
from sparsebert.errors import SparseBertError
from sparsebert.packaged import movie_rows
from sparsebert.tasks import get_task


def test_mrpc_layout_with_byte_order_mark(tmp_path):
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    rows = [[1, 11, 12, 'He said "yes', "He agreed"], [0, 13, 14, "A cat.", "A dog."]]
    write_tsv(tmp_path / "train.tsv", header, rows, bom=True)
    write_tsv(tmp_path / "dev.tsv", header, rows[:1], bom=True)
    data = load_task_data(get_task("MRPC"), DataSource(data_dir=str(tmp_path)))
    assert [e.label for e in data.train] == [1, 0]
    # GLUE files hold unbalanced quotes: they must be read without CSV quoting.
    assert data.train[0].texts == ('He said "yes', "He agreed")
    assert len(data.dev["dev"]) == 1


def test_cola_has_no_header(tmp_path):
    rows = [["gj04", 1, "", "The book was read."], ["gj04", 0, "*", "Book the read was."]]
    write_tsv(tmp_path / "train.tsv", None, rows)
    write_tsv(tmp_path / "dev.tsv", None, rows)
    data = load_task_data(get_task("CoLA"), DataSource(data_dir=str(tmp_path)))
    assert [(e.texts, e.label) for e in data.dev["dev"]] == [(("The book was read.",), 1), (("Book the read was.",), 0)]


def test_stsb_is_regression_and_mnli_has_two_dev_sets(tmp_path):
    sts = tmp_path / "STS-B"
    sts.mkdir()
    header = STSB_HEADER
    row = [0, "main", "f", "2012", 1, "none", "none", "A man plays.", "A man is playing.", "4.750"]
    write_tsv(sts / "train.tsv", header, [row])
    write_tsv(sts / "dev.tsv", header, [row])
    data = load_task_data(get_task("STS-B"), DataSource(data_dir=str(sts)))
    assert data.task.is_regression and data.train[0].label == pytest.approx(4.75)

    mnli = tmp_path / "MNLI"
    mnli.mkdir()
    header = ["index", "sentence1", "sentence2", "label1", "gold_label"]
    write_tsv(mnli / "train.tsv", header, [[0, "p", "h", "neutral", "neutral"]])
    write_tsv(mnli / "dev_matched.tsv", header, [[0, "p", "h", "x", "entailment"]])
    write_tsv(mnli / "dev_mismatched.tsv", header, [[0, "p", "h", "x", "contradiction"]])
    data = load_task_data(get_task("mnli"), DataSource(data_dir=str(mnli)))
    labels = get_task("mnli").labels
    assert data.dev["dev"][0].label == labels.index("entailment")
    assert data.dev["dev_mismatched"][0].label == labels.index("contradiction")


def test_qqp_skips_malformed_rows_but_others_report_the_line(tmp_path):
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    write_tsv(tmp_path / "train.tsv", header, [[0, 1, 2, "q1?", "q2?", 1], [1, 3, "broken"]])
    write_tsv(tmp_path / "dev.tsv", header, [[0, 1, 2, "q1?", "q2?", 0]])
    data = load_task_data(get_task("qqp"), DataSource(data_dir=str(tmp_path)))
    assert len(data.train) == 1
    header = ["index", "sentence1", "sentence2", "label"]
    write_tsv(tmp_path / "train.tsv", header, [[0, "a", "b", "entailment"], [1, "only"]])
    with pytest.raises(SparseBertError, match=r"train.tsv:3: expected at least 4 columns"):
        load_task_data(get_task("rte"), DataSource(data_dir=str(tmp_path)))


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"train.tsv": "sentence\tlabel\nok\t1\n"}, r"dev.tsv: file not found"),
        (
            {"train.tsv": "sentence\tlabel\nok\t7\n", "dev.tsv": "sentence\tlabel\nok\t1\n"},
            r"train.tsv:2: unknown label '7'",
        ),
        ({"train.tsv": "text\tlabel\nok\t1\n", "dev.tsv": "sentence\tlabel\nok\t1\n"}, r"no column 'sentence'"),
        ({"train.tsv": "sentence\tlabel\n", "dev.tsv": "sentence\tlabel\nok\t1\n"}, r"train.tsv: no examples"),
        ({"train.tsv": "", "dev.tsv": "sentence\tlabel\nok\t1\n"}, r"train.tsv: empty file"),
    ],
)
def test_bad_glue_folders_name_the_file(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SparseBertError, match=message):
        load_task_data(get_task("sst2"), DataSource(data_dir=str(tmp_path)))


def test_missing_data_dir_and_conflicting_sources(tmp_path):
    with pytest.raises(SparseBertError, match="data directory not found"):
        load_task_data(get_task("sst2"), DataSource(data_dir=str(tmp_path / "nope")))
    with pytest.raises(SparseBertError, match="only one data source"):
        load_task_data(get_task("sst2"), DataSource(data_dir=str(tmp_path), dataset="glue"))
    with pytest.raises(SparseBertError, match="needs data"):
        load_task_data(get_task("rte"), DataSource())


def test_user_files_csv_and_jsonl(tmp_path):
    (tmp_path / "train.csv").write_text('premise,hypothesis,gold\n"a, quoted",b,yes\nc,d,no\n')
    (tmp_path / "dev.jsonl").write_text(json.dumps({"premise": "e", "hypothesis": "f", "gold": "no"}) + "\n")
    source = DataSource(
        train_file=str(tmp_path / "train.csv"),
        dev_file=str(tmp_path / "dev.jsonl"),
        text_columns=("premise", "hypothesis"),
        label_column="gold",
    )
    data = load_task_data(get_task("classification"), source)
    assert data.task.labels == ("no", "yes")  # learnt from the training file, sorted
    assert data.train[0].texts == ("a, quoted", "b") and data.train[0].label == 1
    assert data.dev["dev"][0].label == 0

    (tmp_path / "bad.jsonl").write_text('{"premise": "e", "hypothesis": "f", "gold": "no"}\n{oops\n')
    with pytest.raises(SparseBertError, match=r"bad.jsonl:2: not valid JSON"):
        load_task_data(
            get_task("classification"),
            DataSource(
                train_file=str(tmp_path / "train.csv"),
                dev_file=str(tmp_path / "bad.jsonl"),
                text_columns=("premise", "hypothesis"),
                label_column="gold",
            ),
        )
    (tmp_path / "dev2.jsonl").write_text('{"premise": "e", "gold": "maybe"}\n')
    with pytest.raises(SparseBertError, match=r"dev2.jsonl:1: missing field\(s\) hypothesis"):
        load_task_data(
            get_task("classification"),
            DataSource(
                train_file=str(tmp_path / "train.csv"),
                dev_file=str(tmp_path / "dev2.jsonl"),
                text_columns=("premise", "hypothesis"),
                label_column="gold",
            ),
        )


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(SparseBertError, match=r"unknown task 'squadx'.*mrpc"):
        get_task("squadx")


def test_subsample_is_fixed_and_keeps_both_classes():
    from sparsebert.data import Example

    examples = [Example(("x",), 0)] * 50 + [Example(("y",), 1)] * 50  # sorted by label, like some files
    sample = subsample(examples, 20)
    assert sample == subsample(examples, 20) and len(sample) == 20
    assert {e.label for e in sample} == {0, 1}


def test_movie_sentiment_labelling_rule_and_split(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text("1\t2.5\tgreat fun\r\n10\t-1.2\tdull\r\n3\t0.2\tmeh\r\n20\t0.9\tnice\r\n", encoding="utf-8")
    train, dev = movie_rows(raw)
    assert train == [("great fun", 1)]  # id 3 is near-neutral (|rating| < 0.5): dropped
    assert sorted(dev) == [("dull", 0), ("nice", 1)]  # ids divisible by 10 go to dev
    train, dev = movie_rows(raw, rating=True)  # movie-rating: every snippet, its mean rating as the label
    assert sorted(train) == [("great fun", 2.5), ("meh", 0.2)]
    assert sorted(dev) == [("dull", -1.2), ("nice", 0.9)]


def _lengths(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 120) for _ in range(n)]


def test_length_grouped_batches_are_homogeneous_deterministic_and_complete():
    lengths, bs = _lengths(1000, 0), 16
    sampler = LengthGroupedSampler(lengths, bs, seed=7)
    order = list(sampler)
    assert sorted(order) == list(range(1000))  # every example once per epoch
    assert order == list(LengthGroupedSampler(lengths, bs, seed=7))  # a function of the seed alone
    assert order != list(LengthGroupedSampler(lengths, bs, seed=8))
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(1000))  # a new order each epoch
    batches = [order[i : i + bs] for i in range(0, 1000 - 1000 % bs, bs)]
    padded = sum(bs * max(lengths[i] for i in b) for b in batches)
    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    padded_random = sum(bs * max(lengths[i] for i in shuffled[j : j + bs]) for j in range(0, 992, bs))
    assert padded < 0.6 * padded_random  # far less padding than random batches
    first_batch_lengths = [lengths[i] for i in batches[0]]
    assert first_batch_lengths == sorted(first_batch_lengths, reverse=True)
    # batches are shuffled across the epoch, not in one long descending sweep
    maxima = [max(lengths[i] for i in b) for b in batches]
    assert maxima != sorted(maxima, reverse=True)


def test_train_loader_groups_by_length_only_when_asked(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = random.Random(3)
    features = [{"input_ids": [2] + [5] * rng.randint(1, 40) + [3], "labels": 0} for _ in range(256)]
    widths = {}
    for grouped in (True, False):
        loader = make_loader(features, tokenizer, 16, shuffle=True, drop_last=True, group_by_length=grouped, seed=1)
        widths[grouped] = sum(b["input_ids"].shape[1] for b in loader)
        assert sum(len(b["labels"]) for b in loader) == 256
    assert widths[True] < 0.8 * widths[False]
