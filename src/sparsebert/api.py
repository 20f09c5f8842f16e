"""The Python API: one function per job. The CLI is a thin layer over these.

    from sparsebert import FinetuneConfig, PruneConfig, finetune, prune
    finetune(FinetuneConfig.of(model="minilm-l6", task="mrpc", data_dir="glue/MRPC", output_dir="runs/teacher"))
    prune(PruneConfig.of(teacher="runs/teacher", student="minilm-l6", task="mrpc", data_dir="glue/MRPC",
                         sparsity=0.9, output_dir="runs/sparse"))

A configuration is composed of option groups (``config.data.task``, ``config.training.lr``,
``config.pruning.sparsity``: ``sparsebert.config``); ``.of`` takes the flat names the flags use.

A run writes to its output folder: the model and tokenizer in HF format, ``metrics.json``,
``config.yaml`` (the resolved configuration), ``log.jsonl``; ``prune`` adds ``sparsity.json``.
One ``prune`` run, top to bottom: ``data`` (the task's examples and loaders), ``strategies`` (where the
student starts, how it is pruned), ``distill`` (the step), ``train`` + ``hooks`` (the loop), ``runs``
(the folder: claimed, checkpointed, finished).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from sparsebert import data as task_data
from sparsebert.augment import WordNeighbours, augment
from sparsebert.config import CompressConfig, DataOptions, EvaluateConfig, FinetuneConfig, PruneConfig
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


def check_length(data: DataOptions, model: nn.Module) -> None:
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and data.max_seq_length > positions:
        raise SparseBertError(f"--max-seq-length {data.max_seq_length} is over the model's {positions} positions")


def finetune(config: FinetuneConfig) -> RunResult:
    """Fine-tune ``config.model.model`` on the task's labels (the teacher, or a baseline)."""
    require(config, "model", "task", "output_dir")
    check_paths(config)
    started = time.perf_counter()
    accelerator = make_accelerator(config)
    data = task_data.load_data(config.data, config.training)
    tokenizer = load_tokenizer(config.model.model)
    model = load_model(config.model.model, data.task)
    check_length(config.data, model)
    with claimed(config, accelerator) as (out, log):
        log.write({"event": "config", "source": data.source, "train_examples": len(data.train)})
        train = task_data.train_loader(data, tokenizer, config.data, config.training)
        dev = task_data.eval_loaders(data, tokenizer, config.data)
        job = TrainJob(model, classification_step, train, dev)
        loop = Loop(accelerator, config, job, out, log, standard_hooks())
        metrics = loop.run()
        files = {**prediction_files(dev), "metrics.json": metrics_record(data, metrics)}
        seconds = finish(accelerator, loop.model, tokenizer, config, files, started, out, log)
        return RunResult(out, metrics, seconds)


def prune(config: PruneConfig) -> RunResult:
    """Prune the student to ``config.pruning.sparsity`` (by its ``strategy``, SparseBERT by default)."""
    require(config, "teacher", "task", "output_dir")
    pruning, models = config.pruning, config.models
    strategy = TABLE[pruning.strategy]
    if strategy.student_from != "teacher":
        require(config, "student")
    check_paths(config)
    started = time.perf_counter()
    accelerator = make_accelerator(config)
    data = task_data.load_data(config.data, config.training)
    if pruning.augment and data.task.extractive_qa:  # before any model is loaded
        raise SparseBertError(f"--augment rewrites sentences and their labels; task {data.task.name} has spans")
    tokenizer = load_tokenizer(models.teacher)
    teacher = load_model(models.teacher, data.task) if strategy.distills else None  # the others learn from labels
    student = initial_student(models, pruning, teacher, tokenizer, data.task)
    check_length(config.data, student)
    if pruning.augment:
        embeddings = (teacher if teacher is not None else student).get_input_embeddings().weight
        neighbours = WordNeighbours(tokenizer, embeddings)
        data.train = augment(data.train, neighbours, pruning.augment, seed=config.training.seed)
    with claimed(config, accelerator) as (out, log):
        log.write({"event": "config", "source": data.source, "train_examples": len(data.train),
                   "strategy": pruning.strategy})  # fmt: skip
        step_fn, extra = classification_step, []
        if strategy.distills:
            scale = regression_scale(data, pruning.regression_scale)
            step_fn, extra, note = prepare_distillation(pruning, teacher, student, accelerator, scale)
            if note:
                log.write({"event": "note", "message": note})
        head_lr = pruning.head_lr if pruning.head_lr and pruning.head_lr != config.training.lr else None
        train = task_data.train_loader(data, tokenizer, config.data, config.training)
        dev = task_data.eval_loaders(data, tokenizer, config.data)
        job = TrainJob(student, step_fn, train, dev, extra, head_lr)
        hooks = standard_hooks(pruner_factory(pruning), pruning.prune_end if pruning.average_weights else None)
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
    name, output = config.model.model, config.evaluation.output
    if output:
        check_output_file(output, [name, config.data.data_dir, config.data.dev_file])
    started = time.perf_counter()
    accelerator = new_accelerator(mixed_precision=resolve_mixed_precision(config.evaluation.mixed_precision))
    data = task_data.load_data(config.data)
    if output and data.task.extractive_qa:
        check_output_file(predictions_path(output, "predictions.json"), [name, config.data.dev_file])
    tokenizer = load_tokenizer(name)
    model = load_model(name, data.task)
    length = inference_length(config.data.max_seq_length, tokenizer, model, data.task.max_length)
    stride = inference_stride(config.data.doc_stride, model, length)
    splits = task_data.eval_loaders(data, tokenizer, replace(config.data, max_seq_length=length, doc_stride=stride))
    model = fast_attention(model, accelerator.mixed_precision, accelerator.device)
    prepared = accelerator.prepare(model, *(s.loader for s in splits.values()))
    metrics = evaluate_loaders(prepared[0], prepared_splits(splits, prepared[1:]), accelerator)
    record = metrics_record(data, metrics)
    predictions = prediction_files(splits)
    if output and accelerator.is_main_process:
        for file, obj in predictions.items():  # before the metrics, as in a run folder
            atomic_write_json(predictions_path(output, file), obj)
        atomic_write_json(output, record)
    details = dict(record)
    if "predictions.json" in predictions:
        details["predictions"] = predictions["predictions.json"]
    written = Path(output) if output else None
    return RunResult(written, metrics, time.perf_counter() - started, details=details)


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
