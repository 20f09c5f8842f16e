"""``sparsebert predict``: what users run after compressing — label a file of inputs with a saved model.

The model is an ordinary HF folder or a compressed one (``sparsebert.load`` reads both); its labels are
the ones saved in its config. Inputs are batched in order of length (little padding) and written back
in input order, one JSON line each: ``{"id", "label", "probabilities"}``, or ``{"id", "score"}`` for a
regression model; ``id`` is the input's line number. ``--engine auto`` times the dense model and the
sparse engine on the first batch and keeps the faster, so it never runs slower than the dense model.
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
from transformers import DataCollatorWithPadding

from sparsebert.data import read_labelled_file
from sparsebert.errors import SparseBertError
from sparsebert.export import load
from sparsebert.io import atomic_write_text, check_output_file
from sparsebert.models import check_head, head_kind, inference_length, load_tokenizer
from sparsebert.options import TRAINED_LENGTH, at_least, check_choices, check_text_columns, opt
from sparsebert.runtime.ops import SPARSE_BACKENDS
from sparsebert.tasks import get_task

ENGINES = ("auto", "dense", "sparse")


@dataclass
class PredictConfig:
    """``sparsebert predict``: label a file of inputs with a saved model."""

    model: str | None = opt(None, "model folder (ordinary or compressed) or name", group="predict")
    input: str | None = opt(None, "CSV/TSV/JSONL file of inputs (labels, if any, are ignored)", group="predict")
    output: str | None = opt(None, "JSONL file: one line per input, in input order", group="predict")
    task: str | None = opt(
        None, "read --input in this task's GLUE layout (its text columns; CoLA without a header)", group="predict"
    )
    text_columns: list[str] | None = opt(None, "comma-separated text column(s) of --input", group="predict")
    batch_size: int = opt(32, "inputs per batch", group="predict")
    max_seq_length: int | None = opt(None, TRAINED_LENGTH, group="predict")
    engine: str = opt(
        "auto", "auto: the faster of dense and sparse, timed on the first batch", choices=ENGINES, group="predict"
    )
    backend: str = opt(
        "auto", "the sparse engine's kernels: auto (exact, timed per matrix), fastest (also int8 on 1x4 blocks and "
        "bf16 where native: lossy), cpp, torch, int8", choices=SPARSE_BACKENDS, group="predict",
    )  # fmt: skip
    threads: int | None = opt(None, "CPU threads (default: PyTorch's)", group="predict")

    def __post_init__(self) -> None:
        at_least(self, ("batch_size",), 1)
        if self.max_seq_length is not None:
            at_least(self, ("max_seq_length",), 2)
        check_text_columns(self)
        if self.threads is not None:
            at_least(self, ("threads",), 1)
        check_choices(self)


NO_QA = "predict labels sentences and does not answer questions yet; evaluate --output writes a SQuAD file's answers"


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
        if task.extractive_qa:
            raise SparseBertError(NO_QA)
        glue = path.suffix == ".tsv"
        rows = read_labelled_file(path, task.text_columns, None, header=task.header, glue_format=glue)
    else:
        raise SparseBertError("predict needs --text-columns, or --task to read the task's GLUE layout")
    if not rows:
        raise SparseBertError(f"{path}: no inputs")
    return [(line, texts) for line, texts, _ in rows]


def _batches(rows, tokenizer, config: PredictConfig) -> list[tuple[list[int], dict]]:
    """Padded batches of row positions, in order of length."""
    columns = list(zip(*(texts for _, texts in rows), strict=True))
    encoded = tokenizer(*columns, truncation=True, max_length=config.max_seq_length)
    features = [{k: v[i] for k, v in encoded.items()} for i in range(len(rows))]
    order = sorted(range(len(rows)), key=lambda i: len(features[i]["input_ids"]))
    collate = DataCollatorWithPadding(tokenizer)
    return [
        (chunk, collate([features[i] for i in chunk]))
        for chunk in (order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size))
    ]


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


@torch.inference_mode()
def predict(config: PredictConfig) -> PredictResult:
    """Label ``config.input`` into ``config.output`` (JSON lines, input order)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    check_output_file(config.output, [config.input, config.model])  # never written over what it reads
    rows = read_inputs(config)
    tokenizer = load_tokenizer(config.model)
    model = load(config.model).eval()
    if not hasattr(model, "num_labels"):
        raise SparseBertError(f"{config.model} has no task head to predict with")
    if head_kind([type(model).__name__]) == "QuestionAnswering":
        raise SparseBertError(f"{config.model} has a question-answering head: {NO_QA}")
    if config.task:  # the task asks for its labels (or scores): the head must give them
        check_head(config.model, [type(model).__name__], model.config, get_task(config.task))
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
