"""Question answering after compressing: the compressed format and the sparse engine keep a span head's start and
end logits, and ``predict`` answers a SQuAD file or JSON lines of questions exactly as ``evaluate`` does."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import cli
from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

from sparsebert.export import export_compressed, load
from sparsebert.pruning import Pruner
from sparsebert.qa import read_squad
from sparsebert.runtime import SparseEncoder, sparsify
from sparsebert.runtime.bf16 import bf16_available


@pytest.fixture(scope="module")
def pruned_pair(qa_teacher, tmp_path_factory) -> tuple[Path, Path]:
    """The teacher one-shot pruned to 90% as an HF folder (tokenizer and window settings kept) and compressed."""
    root = tmp_path_factory.mktemp("qa-pruned")
    model = load(qa_teacher)
    Pruner.one_shot(model, 0.9)
    model.save_pretrained(root / "hf")
    AutoTokenizer.from_pretrained(qa_teacher).save_pretrained(root / "hf")
    export_compressed(root / "hf", root / "csr")
    return root / "hf", root / "csr"


def _span_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(**batch)
    return out.start_logits, out.end_logits


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _predict(model: Path, inputs: Path, out: Path, *extra) -> list[dict]:
    assert cli("predict", "--model", model, "--input", inputs, "--output", out, "--batch-size", "5", *extra) == 0
    return _lines(out)


def test_export_round_trip_keeps_the_span_head(pruned_pair, qa_teacher):
    hf, csr = pruned_pair
    dense, back = load(hf), load(csr)
    assert type(back) is BertForQuestionAnswering
    assert len(json.loads((csr / "sparsebert_manifest.json").read_text())["sparse"]) == 12  # every projection CSR
    assert back.config.sparsebert_doc_stride == 8 and AutoTokenizer.from_pretrained(csr).model_max_length == 32
    torch.manual_seed(1)
    ids = torch.randint(5, back.config.vocab_size, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": (torch.arange(20) > 6).long().expand(3, -1)}
    for got, want in zip(_span_logits(back, batch), _span_logits(dense, batch), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("backend", "tolerance"),
    [("auto", 1e-4), ("torch", 1e-4),
     pytest.param("bf16", 0.01, marks=pytest.mark.skipif(not bf16_available(), reason="needs AVX512-BF16"))],
)  # fmt: skip
def test_the_sparse_engine_keeps_the_span_logits(backend, tolerance):
    """Exact backends to 1e-4; the bf16 engine (lossy) within bf16's rounding."""
    config = BertConfig(vocab_size=80, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    torch.manual_seed(0)
    dense = BertForQuestionAnswering(config).eval()
    Pruner.one_shot(dense, 0.9)
    fast = copy.deepcopy(dense)
    report = sparsify(fast, mode="encoder", backend=backend)
    assert report.mode == "encoder" and isinstance(fast.bert.encoder, SparseEncoder)
    ids = torch.randint(5, 80, (3, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 4:] = 0
    for m in (mask, None):
        batch = {"input_ids": ids, "attention_mask": m}
        for got, want in zip(_span_logits(fast, batch), _span_logits(dense, batch), strict=True):
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


def test_predict_answers_as_evaluate_from_a_squad_file_and_from_json_lines(qa_teacher, squad_dir, tmp_path):
    dev = squad_dir / "dev-v1.1.json"
    args = ["--model", qa_teacher, "--task", "squad", "--dev-file", dev]
    assert cli("evaluate", *args, "--output", tmp_path / "m.json") == 0  # the model's length and stride: 32, 8
    expected = json.loads((tmp_path / "m.predictions.json").read_text())
    examples = read_squad(dev, require_answers=True)
    from_squad = _predict(qa_teacher, dev, tmp_path / "a.jsonl", "--task", "squad", "--engine", "dense")
    assert [r["id"] for r in from_squad] == [e.id for e in examples]  # input order
    assert {r["id"]: r["answer"] for r in from_squad} == expected and all(r["answer"] for r in from_squad)
    for record, example in zip(from_squad, examples, strict=True):
        assert example.context[record["start"] : record["end"]] == record["answer"]
    # the same questions as JSON lines, backwards, with numeric ids and a blank line; no --task: the head decides
    lines = [{"id": k, "question": e.question, "context": e.context} for k, e in enumerate(examples)][::-1]
    jsonl = tmp_path / "questions.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines[:3]) + "\n\n" + "".join(
        json.dumps(line) + "\n" for line in lines[3:]
    ))  # fmt: skip
    from_lines = _predict(qa_teacher, jsonl, tmp_path / "b.jsonl", "--engine", "dense")
    assert [r["id"] for r in from_lines] == [line["id"] for line in lines]
    assert [r["answer"] for r in from_lines] == [expected[examples[r["id"]].id] for r in from_lines]
    # the windows follow --max-seq-length / --doc-stride when given
    wider = _predict(qa_teacher, dev, tmp_path / "c.jsonl", "--max-seq-length", "64", "--doc-stride", "16")
    assert [r["score"] for r in wider] != [r["score"] for r in from_squad]


def test_the_sparse_engine_and_the_compressed_folder_give_the_dense_answers(pruned_pair, squad_dir, tmp_path):
    hf, csr = pruned_pair
    dev = squad_dir / "dev-v1.1.json"
    dense = _predict(hf, dev, tmp_path / "dense.jsonl", "--task", "squad", "--engine", "dense")
    for name, model, engine in (("sparse", csr, "sparse"), ("auto", csr, "auto"), ("hf-sparse", hf, "sparse")):
        got = _predict(model, dev, tmp_path / f"{name}.jsonl", "--task", "squad", "--engine", engine)
        assert [(r["id"], r["answer"], r["start"], r["end"]) for r in got] == [
            (r["id"], r["answer"], r["start"], r["end"]) for r in dense
        ], name
        assert [r["score"] for r in got] == pytest.approx([r["score"] for r in dense], abs=1e-4)


def test_bad_question_files_and_mismatched_options_are_one_line_errors(qa_teacher, tmp_path, capsys):
    good = json.dumps({"id": "q1", "question": "what is good", "context": "the film was good"})
    no_context = json.dumps({"id": "q2", "question": "what is bad"})
    cases = {  # file: (text, what the error says)
        "no-context.jsonl": (f"{good}\n{no_context}\n", "no-context.jsonl:2: missing field(s) context"),
        "not-json.jsonl": (f"{good}\nwhat is good?\n", "not-json.jsonl:2: not valid JSON"),
        "dup.jsonl": (f"{good}\n{good}\n", 'dup.jsonl:2: duplicate id "q1" (first on line 1)'),
        "empty.jsonl": (good.replace("the film was good", " ") + "\n", "empty.jsonl:1: context must be non-empty text"),
        "one-line.jsonl": ('{"text": "good film"}', "one-line.jsonl:1: missing field(s) question, context"),
        "squad.json": (json.dumps({"data": [{"paragraphs": [{"qas": []}]}]}), "squad.json: not SQuAD JSON"),
        "pretty.json": (json.dumps({"version": "1.1"}, indent=1), "pretty.json: not SQuAD JSON"),
    }
    capsys.readouterr()
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        assert cli("predict", "--model", qa_teacher, "--input", tmp_path / name, "--output", tmp_path / "o.jsonl") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and message in err, (name, err)
    args = ["predict", "--model", qa_teacher, "--input", tmp_path / "dup.jsonl", "--output", tmp_path / "o.jsonl"]
    assert cli(*args, "--text-columns", "question") == 2
    assert "question-answering head: predict labels sentences" in capsys.readouterr().err
    (tmp_path / "sst.jsonl").write_text('{"sentence": "good film"}\n')
    assert cli(*args[:4], tmp_path / "sst.jsonl", *args[5:], "--task", "sst2") == 2
    assert "question-answering head but task sst2" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_the_timed_and_exported_paths_take_a_span_head():
    """bench and onnx call models through FirstOutput: a QA head gives its start and end logits stacked."""
    from transformers import AutoModelForQuestionAnswering, BertConfig

    from sparsebert.runtime.onnx_export import FirstOutput

    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = AutoModelForQuestionAnswering.from_config(config).eval()
    ids = torch.randint(5, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, stacked = model(input_ids=ids), FirstOutput(model)(ids, torch.ones_like(ids))
    assert stacked.shape == (2, 9, 2)
    assert torch.equal(stacked[..., 0], out.start_logits) and torch.equal(stacked[..., 1], out.end_logits)
