"""``sparsebert predict``: what users run after compressing — label a file of inputs, or answer its questions,
with a saved model.

The model is an ordinary HF folder or a compressed one (``sparsebert.load`` reads both); its labels are
the ones saved in its config. Inputs are batched in order of length (little padding) and written back
in input order, one JSON line each: ``{"id", "label", "probabilities"}``, or ``{"id", "score"}`` for a
regression model; ``id`` is the input's line number. ``--engine auto`` times the dense model and the
sparse engine on a middle batch and keeps the faster, so it never runs slower than the dense model.

Extractive QA runs with ``--task squad``, or with no ``--task`` when the model has a question-answering head (the
head says what the model can do; a classifier without ``--task`` still needs ``--text-columns``). Its input is a
SQuAD v1.1 JSON file (answers optional, ignored) or JSON lines of ``{"id", "question", "context"}`` (``id``
optional: the line number); each context is cut into windows at the model's trained length and overlap
(``--max-seq-length``, ``--doc-stride`` override them), as ``evaluate`` cuts them, and ``qa.postprocess`` picks the
best span over a question's windows, so predict and evaluate give the same answers. One JSON line per question, in
input order: ``{"id", "answer", "score", "start", "end"}``, ``context[start:end] == answer`` (character offsets);
a question without any valid span gets ``"answer": ""``, ``"score": null`` (JSON has no -inf) and ``start == end
== 0``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, DataCollatorWithPadding, PreTrainedTokenizerBase

from sparsebert.data import _read_jsonl, _read_text, read_labelled_file
from sparsebert.errors import SparseBertError
from sparsebert.export import load
from sparsebert.io import atomic_write_text, check_output_file
from sparsebert.models import check_head, head_kind, inference_length, inference_stride, load_tokenizer
from sparsebert.options import TRAINED_LENGTH, at_least, check_choices, check_text_columns, opt
from sparsebert.qa import QAExample, QAPrediction, model_inputs, postprocess, prepare_eval_features, read_squad
from sparsebert.runtime.ops import SPARSE_BACKENDS
from sparsebert.sources import read_pretrained, resolve_model
from sparsebert.tasks import get_task

ENGINES = ("auto", "dense", "sparse")


@dataclass
class PredictConfig:
    """``sparsebert predict``: label a file of inputs with a saved model."""

    model: str | None = opt(None, "model folder (ordinary or compressed) or name", group="predict")
    input: str | None = opt(
        None, "CSV/TSV/JSONL file of inputs (labels, if any, are ignored); squad: SQuAD JSON or JSON lines of "
        '{"id", "question", "context"}', group="predict",
    )  # fmt: skip
    output: str | None = opt(None, "JSONL file: one line per input, in input order", group="predict")
    task: str | None = opt(
        None, "read --input in this task's GLUE layout (its text columns; CoLA without a header); squad: answer "
        "questions (the default for a model with a question-answering head)", group="predict",
    )  # fmt: skip
    text_columns: list[str] | None = opt(None, "comma-separated text column(s) of --input", group="predict")
    batch_size: int = opt(32, "inputs per batch", group="predict")
    max_seq_length: int | None = opt(None, TRAINED_LENGTH, group="predict")
    doc_stride: int | None = opt(
        None, "squad: tokens shared by consecutive windows of a long context (default: the model's)", group="predict"
    )
    max_answer_length: int = opt(30, "squad: the longest answer predicted, in tokens", group="predict")
    engine: str = opt(
        "auto", "auto: the faster of dense and sparse, timed on the first batch", choices=ENGINES, group="predict"
    )
    backend: str = opt(
        "auto", "the sparse engine's kernels: auto (exact, timed per matrix), fastest (also int8 on 1x4 blocks and "
        "bf16 where native: lossy), cpp, torch, int8, bf16 (AVX512-BF16: bf16 activations, lossy)",
        choices=SPARSE_BACKENDS, group="predict",
    )  # fmt: skip
    threads: int | None = opt(None, "CPU threads (default: PyTorch's)", group="predict")

    def __post_init__(self) -> None:
        at_least(self, ("batch_size", "max_answer_length", "threads"), 1)
        at_least(self, ("doc_stride",), 0)
        at_least(self, ("max_seq_length",), 2)
        check_text_columns(self)
        check_choices(self)


@dataclass
class PredictResult:
    output: Path
    count: int
    seconds: float
    engine: str


def read_inputs(config: PredictConfig) -> list[tuple[int, tuple[str, ...]]]:
    """(line number, texts) of every input: the task's GLUE layout, or the named columns of one's own file."""
    path = Path(config.input)
    if config.text_columns:
        rows = read_labelled_file(path, tuple(config.text_columns), None)
    elif config.task:
        task = get_task(config.task)
        glue = path.suffix == ".tsv"
        rows = read_labelled_file(path, task.text_columns, None, header=task.header, glue_format=glue)
    else:
        raise SparseBertError("predict needs --text-columns, or --task to read the task's GLUE layout")
    if not rows:
        raise SparseBertError(f"{path}: no inputs")
    return [(line, texts) for line, texts, _ in rows]


def _padded_batches(
    features: list[dict], tokenizer: PreTrainedTokenizerBase, batch_size: int
) -> list[tuple[list[int], dict]]:
    """Padded batches of feature positions, in order of length (little padding; results go back by position)."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    collate = DataCollatorWithPadding(tokenizer)
    return [
        (chunk, collate([features[i] for i in chunk]))
        for chunk in (order[i : i + batch_size] for i in range(0, len(order), batch_size))
    ]


def _batches(rows, tokenizer, config: PredictConfig) -> list[tuple[list[int], dict]]:
    """Padded batches of row positions, in order of length."""
    columns = list(zip(*(texts for _, texts in rows), strict=True))
    encoded = tokenizer(*columns, truncation=True, max_length=config.max_seq_length)
    features = [{k: v[i] for k, v in encoded.items()} for i in range(len(rows))]
    return _padded_batches(features, tokenizer, config.batch_size)


def choose_engine(model: nn.Module, batch: dict, engine: str, backend: str = "auto") -> tuple[nn.Module, str]:
    """The model to run: as loaded (dense), on the sparse CPU engine (its kernels from ``backend``), or
    whichever is faster on ``batch``."""
    if engine == "dense":
        return model, "dense"
    from sparsebert.runtime import sparsify
    from sparsebert.runtime.timing import median_ms

    sparse = copy.deepcopy(model) if engine == "auto" else model
    sparsify(sparse, backend=backend)
    if engine == "sparse":
        return sparse, "sparse"
    # interleaved, after a warm-up (the sparse kernels are built on first use)
    sparse_ms, dense_ms = median_ms([lambda: sparse(**batch), lambda: model(**batch)], warmup=1, reps=3, budget_s=10)
    return (sparse, "sparse") if sparse_ms < dense_ms else (model, "dense")


def _record(line: int, logits: torch.Tensor, id2label: dict) -> dict:
    if logits.numel() == 1:
        return {"id": line, "score": float(logits)}
    probs = torch.softmax(logits.float(), dim=-1)
    labels = [str(id2label.get(i, i)) for i in range(len(probs))]
    scores = dict(zip(labels, probs.tolist(), strict=True))
    return {"id": line, "label": labels[int(probs.argmax())], "probabilities": scores}


# -- extractive question answering ---------------------------------------------------------------

QA_TASK = "squad"
QUESTION_LINE = '{"id", "question", "context"}'


def _saved_head(model: str) -> str | None:
    """The head kind a model folder names (``models.HEADS``), from its config.json alone: the input is read, and a
    bad one refused, before the weights are loaded."""
    return head_kind(read_pretrained(AutoConfig.from_pretrained, resolve_model(model)).architectures)


def answers_questions(config: PredictConfig) -> bool:
    """Whether this run answers questions: ``--task squad``, or a question-answering head and no ``--task``.

    Without ``--task`` the head decides, since a span head cannot label sentences and a classifier cannot answer;
    ``--text-columns`` (sentences to label) never applies to questions, so each mismatch is a one-line error
    rather than a file of meaningless outputs. A ``--task`` is checked against the head once it is loaded.
    """
    if config.task:
        task = get_task(config.task)
        if task.extractive_qa and config.text_columns:
            raise SparseBertError(
                f"--text-columns does not apply to --task {task.name}: its --input is SQuAD JSON or JSON lines of "
                f"{QUESTION_LINE}"
            )
        return task.extractive_qa
    qa_head = _saved_head(config.model) == "QuestionAnswering"
    if qa_head and config.text_columns:
        raise _labels_from_qa(config.model)
    return qa_head


def _labels_from_qa(model: str) -> SparseBertError:
    return SparseBertError(
        f"{model} has a question-answering head: predict labels sentences (--text-columns) with a classifier; "
        f"this model answers questions (--task {QA_TASK}: SQuAD JSON or JSON lines of {QUESTION_LINE})"
    )


def _question_line(path: Path, line: int, obj: dict, seen: dict[str, int]) -> tuple[str | int, QAExample]:
    """One JSON line's (id as given, example); ids must be unique, as answers are matched to questions by id."""
    missing = [key for key in ("question", "context") if key not in obj]
    if missing:
        raise SparseBertError(f"{path}:{line}: missing field(s) {', '.join(missing)} (expected {QUESTION_LINE})")
    for key in ("question", "context"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise SparseBertError(f"{path}:{line}: {key} must be non-empty text, got {json.dumps(obj[key])[:40]}")
    qid = obj.get("id", line)
    if not isinstance(qid, str | int) or isinstance(qid, bool):
        raise SparseBertError(f"{path}:{line}: id must be a string or a whole number, got {json.dumps(qid)[:40]}")
    if str(qid) in seen:
        raise SparseBertError(f"{path}:{line}: duplicate id {json.dumps(qid)} (first on line {seen[str(qid)]})")
    seen[str(qid)] = line
    return qid, QAExample(str(qid), obj["question"], obj["context"], [])


def read_questions(path: str | Path) -> list[tuple[str | int, QAExample]]:
    """(id to write, example) of every question, in file order: a SQuAD JSON file, or JSON lines of questions.

    The layout is told by the content, not the suffix: a file that is one JSON object with a ``data`` key, or one
    object over several lines, is SQuAD (``read_squad``'s checks and messages; answers are optional and ignored);
    anything else is read line by line, so a bad line is named by its number (also in a one-line file).
    """
    path = Path(path)
    text = _read_text(path)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and ("data" in whole or len(text.strip().splitlines()) > 1):
        return [(example.id, example) for example in read_squad(path, require_answers=False)]
    seen: dict[str, int] = {}
    rows = [_question_line(path, line, obj, seen) for line, obj in _read_jsonl(path)]
    if not rows:
        raise SparseBertError(f"{path}: no questions")
    return rows


def _answer_record(qid: str | int, found: QAPrediction) -> dict:
    """A question's JSON line; no valid span has score -inf, which JSON cannot hold: null."""
    score = found.score if found.score != float("-inf") else None
    return {"id": qid, "answer": found.text, "score": score, "start": found.char_start, "end": found.char_end}


def _windows(
    config: PredictConfig, examples: list[QAExample], tokenizer: PreTrainedTokenizerBase, model: nn.Module
) -> list[dict]:
    """The questions' windows at the model's trained length and overlap (as ``evaluate`` cuts them), unless
    overridden; a question that leaves no room for its context names the input file too."""
    length = inference_length(config.max_seq_length, tokenizer, model, get_task(QA_TASK).max_length)
    stride = inference_stride(config.doc_stride, model, length)
    try:
        return prepare_eval_features(examples, tokenizer, length, stride)
    except SparseBertError as exc:
        raise SparseBertError(f"{config.input}: {exc}") from None


def predict_answers(
    config: PredictConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[tuple[str | int, QAExample]]
) -> PredictResult:
    """Answer the questions ``rows`` (``read_questions``) into ``config.output`` (JSON lines, input order)."""
    examples = [example for _, example in rows]
    features = _windows(config, examples, tokenizer, model)
    batches = _padded_batches(model_inputs(features), tokenizer, config.batch_size)
    started = time.perf_counter()
    model, engine = choose_engine(model, batches[len(batches) // 2][1], config.engine, config.backend)
    starts: list = [None] * len(features)
    ends: list = [None] * len(features)
    for positions, batch in tqdm(batches, desc=f"predict ({engine})", unit="batch"):
        outputs = model(**batch)
        for position, start, end in zip(positions, outputs.start_logits, outputs.end_logits, strict=True):
            starts[position], ends[position] = start.float().numpy(), end.float().numpy()
    found = postprocess(examples, features, starts, ends, max_answer_length=config.max_answer_length)
    seconds = time.perf_counter() - started
    lines = (json.dumps(_answer_record(qid, found[example.id])) + "\n" for qid, example in rows)
    atomic_write_text(config.output, "".join(lines))
    return PredictResult(Path(config.output), len(rows), seconds, engine)


# -- the command ---------------------------------------------------------------------------------


def _load(config: PredictConfig, questions: bool) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model (eval mode) and its tokenizer, its head checked against the task (or, without one, against labels
    asked of a span head whose config.json did not name it: a compressed folder may name it only in its manifest)."""
    tokenizer = load_tokenizer(config.model)
    model = load(config.model).eval()
    architectures = [type(model).__name__]
    if not hasattr(model, "num_labels"):
        raise SparseBertError(f"{config.model} has no task head to predict with")
    if config.task:  # the task asks for its labels, scores or answers: the head must give them
        check_head(config.model, architectures, model.config, get_task(config.task))
    elif not questions and head_kind(architectures) == "QuestionAnswering":
        raise _labels_from_qa(config.model)
    return model, tokenizer


@torch.inference_mode()
def predict(config: PredictConfig) -> PredictResult:
    """Label ``config.input`` (or answer its questions) into ``config.output`` (JSON lines, input order)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    check_output_file(config.output, [config.input, config.model])  # never written over what it reads
    questions = answers_questions(config)
    rows = read_questions(config.input) if questions else read_inputs(config)  # a bad input fails before loading
    model, tokenizer = _load(config, questions)
    if questions:
        return predict_answers(config, model, tokenizer, rows)
    config = dataclasses.replace(config, max_seq_length=inference_length(config.max_seq_length, tokenizer, model))
    batches = _batches(rows, tokenizer, config)
    started = time.perf_counter()
    model, engine = choose_engine(model, batches[len(batches) // 2][1], config.engine, config.backend)
    results: list[dict | None] = [None] * len(rows)
    for positions, batch in tqdm(batches, desc=f"predict ({engine})", unit="batch"):
        logits = model(**batch).logits
        for position, row_logits in zip(positions, logits, strict=True):
            results[position] = _record(rows[position][0], row_logits, model.config.id2label)
    seconds = time.perf_counter() - started
    atomic_write_text(config.output, "".join(json.dumps(r) + "\n" for r in results))
    return PredictResult(Path(config.output), len(rows), seconds, engine)
