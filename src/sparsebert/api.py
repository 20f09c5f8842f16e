"""The Python API: one function per job. The CLI is a thin layer over these.

    from sparsebert import FinetuneConfig, PruneConfig, finetune, prune
    finetune(FinetuneConfig(model="minilm-l6", task="mrpc", data_dir="glue/MRPC", output_dir="runs/teacher"))
    prune(PruneConfig(teacher="runs/teacher", student="minilm-l6", task="mrpc", data_dir="glue/MRPC",
                      sparsity=0.9, output_dir="runs/sparse"))

A run writes to its output folder: the model and tokenizer in HF format, ``metrics.json``,
``config.yaml`` (the resolved configuration), ``log.jsonl``; ``prune`` adds ``sparsity.json``.
One ``prune`` run, top to bottom: ``data`` (the task's examples and loaders), ``strategies`` (where the
student starts, how it is pruned), ``distill`` (the step), ``train`` + ``hooks`` (the loop), ``runs``
(the folder: claimed, checkpointed, finished).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sparsebert import data as task_data
from sparsebert.augment import WordNeighbours, augment
from sparsebert.config import CompressConfig, EvaluateConfig, FinetuneConfig, PruneConfig, TrainConfig
from sparsebert.distill import prepare_distillation, regression_scale
from sparsebert.errors import SparseBertError
from sparsebert.hardware import resolve_mixed_precision
from sparsebert.hooks import standard_hooks
from sparsebert.io import atomic_write_json, check_output_file, read_json
from sparsebert.models import fast_attention, inference_length, inference_stride, load_model, load_tokenizer
from sparsebert.options import require
from sparsebert.pipeline import run_stage, teacher_first
from sparsebert.pruning import sparsity_report
from sparsebert.runs import check_paths, claimed, finish, metrics_record
from sparsebert.scoring import prediction_files
from sparsebert.strategies import TABLE, initial_student, pruner_factory
from sparsebert.train import Loop, TrainJob, make_accelerator, new_accelerator, prepared_splits
from sparsebert.train import evaluate as evaluate_loaders


@dataclass
class RunResult:
    """What every job returns (finetune, prune, evaluate, compress, compare), for the CLI or a user's code.

    ``metrics`` are the dev metrics of the model the job produced or read (compress: the student's;
    compare: none, see ``details``); ``details`` holds what a job writes beside them: evaluate's
    metrics.json record, compress's report, compare's results.
    """

    output_dir: Path | None  # the folder (evaluate: the --output file) written; None if nothing was
    metrics: dict[str, float]
    seconds: float
    sparsity: dict | None = None  # sparsity.json of the pruned model
    details: dict = field(default_factory=dict)


def classification_step(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Fine-tuning's step: the model's own loss on the labels (cross-entropy, or MSE for regression)."""
    return model(**batch).loss, {}


def check_length(config: TrainConfig, model: nn.Module) -> None:
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and config.max_seq_length > positions:
        raise SparseBertError(f"--max-seq-length {config.max_seq_length} is over the model's {positions} positions")


def finetune(config: FinetuneConfig) -> RunResult:
    """Fine-tune ``config.model`` on the task's labels (the teacher, or a baseline)."""
    require(config, "model", "task", "output_dir")
    check_paths(config)
    started = time.perf_counter()
    accelerator = make_accelerator(config)
    data = task_data.load_data(config)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, data.task)
    check_length(config, model)
    with claimed(config, accelerator) as (out, log):
        log.write({"event": "config", "source": data.source, "train_examples": len(data.train)})
        train, dev = task_data.train_loader(data, tokenizer, config), task_data.eval_loaders(data, tokenizer, config)
        job = TrainJob(model, classification_step, train, dev)
        loop = Loop(accelerator, config, job, out, log, standard_hooks())
        metrics = loop.run()
        files = {**prediction_files(dev), "metrics.json": metrics_record(data, metrics)}
        seconds = finish(accelerator, loop.model, tokenizer, config, files, started, out, log)
        return RunResult(out, metrics, seconds)


def prune(config: PruneConfig) -> RunResult:
    """Prune the student to ``config.sparsity`` (by ``config.strategy``, SparseBERT by default)."""
    require(config, "teacher", "task", "output_dir")
    strategy = TABLE[config.strategy]
    if strategy.student_from != "teacher":
        require(config, "student")
    check_paths(config)
    started = time.perf_counter()
    accelerator = make_accelerator(config)
    data = task_data.load_data(config)
    if config.augment and data.task.extractive_qa:  # before any model is loaded
        raise SparseBertError(f"--augment rewrites sentences and their labels; task {data.task.name} has spans")
    tokenizer = load_tokenizer(config.teacher)
    teacher = load_model(config.teacher, data.task) if strategy.distills else None  # the others learn from labels
    student = initial_student(config, teacher, tokenizer, data.task)
    check_length(config, student)
    if config.augment:
        embeddings = (teacher if teacher is not None else student).get_input_embeddings().weight
        data.train = augment(data.train, WordNeighbours(tokenizer, embeddings), config.augment, seed=config.seed)
    with claimed(config, accelerator) as (out, log):
        log.write({"event": "config", "source": data.source, "train_examples": len(data.train),
                   "strategy": config.strategy})  # fmt: skip
        step_fn, extra = classification_step, []
        if strategy.distills:
            scale = regression_scale(data, config.regression_scale)
            step_fn, extra, note = prepare_distillation(config, teacher, student, accelerator, scale)
            if note:
                log.write({"event": "note", "message": note})
        head_lr = config.head_lr if config.head_lr and config.head_lr != config.lr else None
        train, dev = task_data.train_loader(data, tokenizer, config), task_data.eval_loaders(data, tokenizer, config)
        job = TrainJob(student, step_fn, train, dev, extra, head_lr)
        hooks = standard_hooks(pruner_factory(config), config.prune_end if config.average_weights else None)
        loop = Loop(accelerator, config, job, out, log, hooks)
        metrics = loop.run()
        report = sparsity_report(accelerator.unwrap_model(loop.model))
        files = {"sparsity.json": report, **prediction_files(dev), "metrics.json": metrics_record(data, metrics)}
        seconds = finish(accelerator, loop.model, tokenizer, config, files, started, out, log)
        return RunResult(out, metrics, seconds, report)


def evaluate(config: EvaluateConfig) -> RunResult:
    """Dev metrics of a saved model; the metrics.json record in ``details`` (written to --output if given).

    Extractive QA also writes its answers beside --output (``<stem>.predictions.json``, the official SQuAD
    prediction format), and returns them in ``details["predictions"]``.
    """
    require(config, "model", "task")
    if config.output:
        check_output_file(config.output, [config.model, config.data_dir, config.dev_file])
    started = time.perf_counter()
    accelerator = new_accelerator(mixed_precision=resolve_mixed_precision(config.mixed_precision))
    data = task_data.load_data(config, need_train=False)
    if config.output and data.task.extractive_qa:
        check_output_file(predictions_path(config.output, "predictions.json"), [config.model, config.dev_file])
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, data.task)
    length = inference_length(config.max_seq_length, tokenizer, model, data.task.max_length)
    stride = inference_stride(config.doc_stride, model, length)
    config = dataclasses.replace(config, max_seq_length=length, doc_stride=stride)
    splits = task_data.eval_loaders(data, tokenizer, config)
    model = fast_attention(model, accelerator.mixed_precision, accelerator.device)
    prepared = accelerator.prepare(model, *(s.loader for s in splits.values()))
    metrics = evaluate_loaders(prepared[0], prepared_splits(splits, prepared[1:]), accelerator)
    record = metrics_record(data, metrics)
    predictions = prediction_files(splits)
    if config.output and accelerator.is_main_process:
        for name, obj in predictions.items():  # before the metrics, as in a run folder
            atomic_write_json(predictions_path(config.output, name), obj)
        atomic_write_json(config.output, record)
    details = dict(record)
    if "predictions.json" in predictions:
        details["predictions"] = predictions["predictions.json"]
    output = Path(config.output) if config.output else None
    return RunResult(output, metrics, time.perf_counter() - started, details=details)


def predictions_path(output: str | Path, name: str) -> Path:
    """Where evaluate writes a predictions file: beside its --output, ``m.json`` -> ``m.predictions.json``
    (``m.predictions_mismatched.json`` for another split)."""
    output = Path(output)
    return output.with_name(f"{output.stem}.{name}")


def compress(config: CompressConfig) -> RunResult:
    """The main job: fine-tune the teacher, prune-while-distill the student, evaluate both, report.

    With ``--resume`` finished stages are skipped and an interrupted one continues (the teacher is
    trained once).
    """
    from sparsebert.report import write_report

    started = time.perf_counter()
    with teacher_first(config, finetune) as (out, student_config):
        run_stage(student_config, prune)
        report = write_report(out, config)
    sparsity = read_json(out / "student" / "sparsity.json")
    return RunResult(out, report["student"], time.perf_counter() - started, sparsity, report)
