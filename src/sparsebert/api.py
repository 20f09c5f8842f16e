"""The Python API: one function per job. The CLI is a thin layer over these.

    from sparsebert import FinetuneConfig, PruneConfig, finetune, prune
    finetune(FinetuneConfig(model="minilm-l6", task="mrpc", data_dir="glue/MRPC", output_dir="runs/teacher"))
    prune(PruneConfig(teacher="runs/teacher", student="minilm-l6", task="mrpc", data_dir="glue/MRPC",
                      sparsity=0.9, output_dir="runs/sparse"))

A run writes to its output folder: the model and tokenizer in HF format, ``metrics.json``,
``config.yaml`` (the resolved configuration), ``log.jsonl``; ``prune`` adds ``sparsity.json``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from torch import nn

from sparsebert.augment import WordNeighbours, augment
from sparsebert.config import (
    CompressConfig,
    EvaluateConfig,
    FinetuneConfig,
    PruneConfig,
    PruneOptions,
    TrainConfig,
    require,
    saved_options,
    to_yaml,
)
from sparsebert.data import DataSource, TaskData, encode, load_task_data, make_loader
from sparsebert.distill import AttentionScoreRecorder, DistillationLoss, LossWeights, attention_comparable
from sparsebert.errors import SparseBertError
from sparsebert.io import (
    JsonlLog,
    atomic_write_json,
    atomic_write_text,
    check_not_an_input,
    check_output_file,
    claimed_output_dir,
    publish_dir,
)
from sparsebert.models import inference_length, load_model, load_tokenizer
from sparsebert.pruning import CubicSparsitySchedule, Pruner, resolve_step, sparsity_report
from sparsebert.sources import resolve_model
from sparsebert.strategies import TABLE
from sparsebert.students import fit_dense_student
from sparsebert.tasks import get_task
from sparsebert.train import (
    CHECKPOINT,
    Loop,
    fast_attention,
    make_accelerator,
    new_accelerator,
    recover_checkpoint,
    resolve_mixed_precision,
)
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


def _source(config) -> DataSource:
    return DataSource(
        data_dir=config.data_dir,
        dataset=config.dataset,
        train_file=getattr(config, "train_file", None),
        dev_file=config.dev_file,
        text_columns=tuple(config.text_columns) if config.text_columns else None,
        label_column=config.label_column,
    )


def _load_data(config, need_train: bool = True) -> TaskData:
    return load_task_data(
        get_task(config.task),
        _source(config),
        need_train=need_train,
        max_train_examples=getattr(config, "max_train_examples", None),
        max_eval_examples=config.max_eval_examples,
    )


def _eval_loaders(data: TaskData, tokenizer, config) -> dict:
    """Dev batches in order of length (least padding; the metrics do not depend on the order)."""
    loaders = {}
    for split, examples in data.dev.items():
        features = sorted(encode(examples, tokenizer, config.max_seq_length), key=lambda f: len(f["input_ids"]))
        loaders[split] = make_loader(features, tokenizer, config.eval_batch_size, shuffle=False)
    return loaders


def _train_loader(data: TaskData, tokenizer, config: TrainConfig):
    """Shuffled (by default length-grouped) training batches; the incomplete last batch is skipped,
    as in the reference."""
    features = encode(data.train, tokenizer, config.max_seq_length)
    return make_loader(
        features,
        tokenizer,
        config.batch_size,
        shuffle=True,
        drop_last=True,
        group_by_length=config.group_by_length,
        seed=config.seed,
    )


RESUME_MAY_CHANGE = ("output_dir", "overwrite", "resume", "log_every", "eval_every", "save_every")


def check_paths(config: object) -> None:
    """The output folder must not be, contain or sit inside any input (checked before any work)."""
    inputs = ("data_dir", "train_file", "dev_file", "teacher", "student", "model", "dense_student")
    check_not_an_input(config.output_dir, [getattr(config, name, None) for name in inputs])


def check_inputs(config: CompressConfig) -> None:
    """With --overwrite, read the data and the model's tokenizer before a multi-stage job empties its
    folder: a typo in a path must not cost the previous results. (Without it nothing is deleted, and
    the stages report bad inputs themselves.)"""
    if config.overwrite:
        _load_data(config)
        load_tokenizer(config.model)


def _check_resume(config: TrainConfig, out: Path) -> None:
    """A resumed run must be the run that was interrupted: refuse options that change its result."""
    if not (out / CHECKPOINT).exists():
        if (out / "metrics.json").exists():
            raise SparseBertError(f"{out} holds a finished run; nothing to resume (use --overwrite to redo it)")
        return
    changed = _changed_options(config, out)
    if changed:
        raise SparseBertError(f"--resume with changed options ({changed}); resume with the checkpoint's options")


def _changed_options(config: TrainConfig, out: Path) -> str:
    """The options that differ from the run saved in ``out`` and change its result ('' if none)."""
    saved = saved_options(out)
    now = dataclasses.asdict(config)
    now["mixed_precision"] = resolve_mixed_precision(config.mixed_precision)  # saved resolved (``auto``: what ran)
    changed = [k for k in now if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]]
    return ", ".join(f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in changed)


@contextmanager
def _run_dir(config: TrainConfig, accelerator: Accelerator) -> Iterator[tuple[Path, JsonlLog]]:
    """The run's output folder, held (locked) by the main process for the whole job."""
    out = Path(config.output_dir)
    main = accelerator.is_main_process
    with claimed_by_main_process(out, overwrite=config.overwrite, resume=config.resume):
        if main:
            if config.resume:
                recover_checkpoint(out)
                _check_resume(config, out)
                if not (out / CHECKPOINT).exists():  # nothing to continue: a fresh start, a fresh log
                    (out / "log.jsonl").unlink(missing_ok=True)
            atomic_write_text(out / "config.yaml", to_yaml(config))
        accelerator.wait_for_everyone()
        yield out, JsonlLog(out / "log.jsonl", enabled=main)


def _metrics_record(data: TaskData, metrics: dict[str, float]) -> dict:
    return {"task": data.task.name, "split": "dev", "num_examples": len(data.dev["dev"]), "metrics": metrics}


def _finish(
    accelerator: Accelerator,
    model: nn.Module,
    tokenizer,
    max_length: int,
    out: Path,
    files: dict[str, dict],
    log: JsonlLog,
    started: float,
) -> float:
    """Save the model atomically, write the JSON files (metrics.json last: it marks a finished run).

    Returns the run's wall time, also logged as the ``saved`` event.
    """
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        staging = out / ".staging"
        accelerator.unwrap_model(model).save_pretrained(staging, safe_serialization=True)
        tokenizer.model_max_length = max_length  # what evaluate and predict truncate to by default
        tokenizer.save_pretrained(staging)
        publish_dir(staging, out)
        for name, obj in files.items():
            atomic_write_json(out / name, obj)
        if (out / CHECKPOINT).exists():
            shutil.rmtree(out / CHECKPOINT)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    log.write({"event": "saved", "wall_seconds": round(seconds, 2)})
    return seconds


def _classification_step(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    return model(**batch).loss, {}


def finetune(config: FinetuneConfig) -> RunResult:
    """Fine-tune ``config.model`` on the task's labels (the teacher, or a baseline)."""
    require(config, "model", "task", "output_dir")
    check_paths(config)
    started = time.perf_counter()
    accelerator = make_accelerator(config)
    data = _load_data(config)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, data.task)
    _check_length(config, model)
    with _run_dir(config, accelerator) as (out, log):
        log.write({"event": "config", "source": data.source, "train_examples": len(data.train)})
        train, dev = _train_loader(data, tokenizer, config), _eval_loaders(data, tokenizer, config)
        loop = Loop(accelerator, config, model, _classification_step, train, dev, data.task, out, log)
        metrics = loop.run()
        files = {"metrics.json": _metrics_record(data, metrics)}
        seconds = _finish(accelerator, loop.model, tokenizer, config.max_seq_length, out, files, log, started)
        return RunResult(out, metrics, seconds)


def _check_length(config: TrainConfig, model: nn.Module) -> None:
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and config.max_seq_length > positions:
        raise SparseBertError(f"--max-seq-length {config.max_seq_length} is over the model's {positions} positions")


def copy_head(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Copy the task head (every parameter outside the base encoder) from teacher to student.

    The pre-trained student has no head; starting it from the teacher's saves the run from first
    having to learn one while its encoder is being pruned (the failure mode of a short budget).
    """
    prefix = student.base_model_prefix + "."
    t_state = teacher.state_dict()
    copied = []
    with torch.no_grad():
        for name, p in student.named_parameters():
            if not name.startswith(prefix) and name in t_state and t_state[name].shape == p.shape:
                p.copy_(t_state[name])
                copied.append(name)
    return copied


def _initial_student(config: PruneConfig, teacher: nn.Module | None, tokenizer, task) -> nn.Module:
    """Where each strategy's student starts.

    sparsebert / prune-then-finetune: the pre-trained weights; finetune-then-prune(-kd): the teacher's;
    distill-dense: the student model (by default the pre-trained model itself) cut down to as many
    encoder weights as the sparse model keeps (layers dropped, then narrowed).
    """
    strategy = TABLE[config.strategy]
    if strategy.student_from == "teacher":
        return load_model(config.teacher, task)
    student = load_model(config.student, task)
    if teacher is not None:
        _check_same_vocabulary(config, student, teacher, tokenizer)
    if strategy.student_from == "pretrained-cut":
        student = fit_dense_student(student, teacher.config, config.sparsity)
    if strategy.distills and config.student_head == "teacher":
        copy_head(teacher, student)
    return student


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json", "spiece.model")


def _check_same_vocabulary(config: PruneConfig, student: nn.Module, teacher: nn.Module, teacher_tokenizer) -> None:
    """A distilled student reads the teacher's token ids: the vocabularies must be the same, entry for
    entry (equal sizes are not enough: a shuffled vocabulary has the same size). A student folder
    without a tokenizer can only be checked by size."""
    same = student.config.vocab_size == teacher.config.vocab_size
    folder = Path(resolve_model(config.student))
    has_tokenizer = not folder.is_dir() or any((folder / f).exists() for f in TOKENIZER_FILES)
    if same and has_tokenizer:
        same = load_tokenizer(config.student).get_vocab() == teacher_tokenizer.get_vocab()
    if not same:
        raise SparseBertError(
            f"student {config.student} and teacher {config.teacher} have different vocabularies: "
            "a distilled student must share the teacher's tokenizer"
        )


def _distillation_step(teacher: nn.Module, student: nn.Module, loss_fn: DistillationLoss):
    """The prune-while-distill step: teacher forward (no grad), student forward, the three losses.

    The student's cross-entropy to the labels is logged too (not trained on): it is the "fitting
    ability" curve that makes strategies comparable.
    """
    t_rec = AttentionScoreRecorder(teacher.module if hasattr(teacher, "module") else teacher)
    s_rec = AttentionScoreRecorder(student)
    want_hidden, want_attn = bool(loss_fn.weights.hidden), bool(loss_fn.weights.attention)

    def step_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        labels = batch.get("labels")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        mask = inputs.get("attention_mask")
        with torch.no_grad(), t_rec:
            t_out = teacher(**inputs, output_hidden_states=want_hidden)
            t_scores = t_rec.scores(mask) if want_attn else None
        with s_rec:
            s_out = model(**inputs, output_hidden_states=want_hidden)
            s_scores = s_rec.scores(mask) if want_attn else None
        result = loss_fn(
            s_out.logits, t_out.logits, s_out.hidden_states, t_out.hidden_states, s_scores, t_scores, labels
        )
        if labels is not None and s_out.logits.shape[-1] > 1:
            result.parts["label_ce"] = F.cross_entropy(s_out.logits.detach().float(), labels)
        return result.loss, result.parts

    return step_fn


def _pruner_factory(config: PruneConfig) -> Callable[[nn.Module, int], Pruner] | None:
    """How the strategy prunes, built once the run's length is known (the schedule is in steps)."""
    pruning = TABLE[config.strategy].pruning
    if pruning == "none":
        return None

    def make_pruner(model: nn.Module, n_steps: int) -> Pruner:
        if pruning == "one-shot":  # on the starting magnitudes, then fixed
            return Pruner.one_shot(model, config.sparsity, config.prune_scope, config.prune_block)
        start, end = resolve_step(config.prune_start, n_steps), resolve_step(config.prune_end, n_steps)
        # masks are updated after an optimizer step: a window ending at step 0 would never prune
        schedule = CubicSparsitySchedule(config.sparsity, start, min(max(end, start, 1), n_steps), config.prune_updates)
        return Pruner(model, schedule, config.prune_scope, block=config.prune_block, criterion=config.prune_criterion)

    return make_pruner


def _regression_scale(config: PruneConfig, data: TaskData) -> float:
    """What a regression student's prediction MSE is divided by: the training labels' variance, so the
    term has the same size whatever the labels' units (in a rating's units, -4..4, it made two thirds
    of the loss where a classifier's three terms are of one size; BENCHMARKS.md "Regression at 90%")."""
    if not data.task.is_regression or config.regression_scale == "none":
        return 1.0
    labels = [float(e.label) for e in data.train]
    return max(statistics.pvariance(labels), 1e-6) if len(labels) > 1 else 1.0


def _distillation(
    config: PruneConfig, teacher: nn.Module, student: nn.Module, accelerator, log: JsonlLog, regression_scale: float
):
    """The distilling strategies' step and the modules it trains beside the student (a projection)."""
    teacher_config = teacher.config
    teacher = fast_attention(teacher, accelerator.mixed_precision, accelerator.device)
    teacher = accelerator.prepare_model(teacher, evaluation_mode=True).eval()
    weights = LossWeights.parse(config.loss_weights)
    if not attention_comparable(student.config, teacher_config):
        weights.attention = 0.0
        log.write({"event": "note", "message": "student has fewer heads: attention loss disabled"})
    loss_fn = DistillationLoss(
        student.config, teacher_config, weights, config.temperature, config.regression_target, regression_scale
    )
    extra = [loss_fn] if loss_fn.projection is not None else []
    return _distillation_step(teacher, student, loss_fn), extra


def prune(config: PruneConfig) -> RunResult:
    """Prune the student to ``config.sparsity`` (by ``config.strategy``, SparseBERT by default)."""
    require(config, "teacher", "task", "output_dir")
    strategy = TABLE[config.strategy]
    if strategy.student_from != "teacher":
        require(config, "student")
    check_paths(config)
    started = time.perf_counter()
    accelerator = make_accelerator(config)
    data = _load_data(config)
    tokenizer = load_tokenizer(config.teacher)
    # Only the distilling strategies use the teacher; the others train on labels.
    teacher = load_model(config.teacher, data.task) if strategy.distills else None
    student = _initial_student(config, teacher, tokenizer, data.task)
    _check_length(config, student)
    if config.augment:
        embeddings = (teacher if teacher is not None else student).get_input_embeddings().weight
        data.train = augment(data.train, WordNeighbours(tokenizer, embeddings), config.augment, seed=config.seed)
    with _run_dir(config, accelerator) as (out, log):
        log.write(
            {"event": "config", "source": data.source, "train_examples": len(data.train), "strategy": config.strategy}
        )
        step_fn, extra = _classification_step, []
        if strategy.distills:
            step_fn, extra = _distillation(config, teacher, student, accelerator, log, _regression_scale(config, data))
        head_lr = config.head_lr if config.head_lr and config.head_lr != config.lr else None
        train, dev = _train_loader(data, tokenizer, config), _eval_loaders(data, tokenizer, config)
        loop = Loop(accelerator, config, student, step_fn, train, dev, data.task, out, log,
                    pruner_factory=_pruner_factory(config), extra_modules=extra, head_lr=head_lr,
                    average_from=config.prune_end if config.average_weights else None)  # fmt: skip
        metrics = loop.run()
        report = sparsity_report(accelerator.unwrap_model(loop.model))
        files = {"sparsity.json": report, "metrics.json": _metrics_record(data, metrics)}
        seconds = _finish(accelerator, loop.model, tokenizer, config.max_seq_length, out, files, log, started)
        return RunResult(out, metrics, seconds, report)


def evaluate(config: EvaluateConfig) -> RunResult:
    """Dev metrics of a saved model; the metrics.json record in ``details`` (written to --output if given)."""
    require(config, "model", "task")
    if config.output:
        check_output_file(config.output, [config.model, config.data_dir, config.dev_file])
    started = time.perf_counter()
    accelerator = new_accelerator(mixed_precision=resolve_mixed_precision(config.mixed_precision))
    data = _load_data(config, need_train=False)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, data.task)
    config = dataclasses.replace(config, max_seq_length=inference_length(config.max_seq_length, tokenizer, model))
    loaders = _eval_loaders(data, tokenizer, config)
    model = fast_attention(model, accelerator.mixed_precision, accelerator.device)
    prepared = accelerator.prepare(model, *loaders.values())
    metrics = evaluate_loaders(prepared[0], dict(zip(loaders, prepared[1:], strict=True)), data.task, accelerator)
    record = _metrics_record(data, metrics)
    if config.output and accelerator.is_main_process:
        atomic_write_json(config.output, record)
    output = Path(config.output) if config.output else None
    return RunResult(output, metrics, time.perf_counter() - started, details=record)


def stage_configs(config: CompressConfig, out: Path) -> tuple[FinetuneConfig, PruneConfig]:
    """Split a compress/compare configuration into the teacher's and a student's run."""
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)}
    shared.update(overwrite=False, resume=False, output_dir=None)
    teacher = FinetuneConfig(
        **{
            **shared,
            "model": config.model,
            "output_dir": str(out / "teacher"),
            "epochs": config.teacher_epochs,
            "max_steps": config.teacher_max_steps,
            "lr": config.teacher_lr,
            "lr_schedule": "linear",
            "warmup_ratio": FinetuneConfig.warmup_ratio,  # --warmup-ratio is the student's (StudentSchedule)
        }
    )
    prune_options = {f.name: getattr(config, f.name) for f in dataclasses.fields(PruneOptions)}
    student = PruneConfig(
        **{
            **shared,
            **prune_options,
            "teacher": teacher.output_dir,
            "student": config.model,
            "output_dir": str(out / "student"),
        }
    )
    return teacher, student


def run_stage(config: TrainConfig, fn) -> bool:
    """Run one stage unless it already finished; continue it if a checkpoint is there. True if it ran.

    A finished stage is reused only if it was run with the same options (else its results would be
    reported as those of the options asked for).
    """
    stage_dir = Path(config.output_dir)
    if (stage_dir / "metrics.json").exists():
        changed = _changed_options(config, stage_dir)
        if changed:
            raise SparseBertError(
                f"{stage_dir} holds a finished run with other options ({changed}); use --overwrite to redo it"
            )
        return False
    if stage_dir.is_dir():
        recover_checkpoint(stage_dir)
    config.resume = (stage_dir / CHECKPOINT).exists()
    config.overwrite = not config.resume
    fn(config)
    return True


def compress(config: CompressConfig) -> RunResult:
    """The main job: fine-tune the teacher, prune-while-distill the student, evaluate both, report.

    With ``--resume`` finished stages are skipped and an interrupted one continues (the teacher is
    trained once).
    """
    from sparsebert.report import write_report

    require(config, "model", "task", "output_dir")
    check_paths(config)
    check_inputs(config)
    out, started = Path(config.output_dir), time.perf_counter()
    with claimed_by_main_process(out, overwrite=config.overwrite, resume=config.resume):
        if PartialState().is_main_process and not (config.resume and (out / "config.yaml").exists()):
            atomic_write_text(out / "config.yaml", to_yaml(config))  # what `compress --resume` starts from
        teacher_cfg, student_cfg = stage_configs(config, out)
        run_stage(teacher_cfg, finetune)
        run_stage(student_cfg, prune)
        report = write_report(out, config)
    sparsity = json.loads((out / "student" / "sparsity.json").read_text())
    return RunResult(out, report["student"], time.perf_counter() - started, sparsity, report)


def claimed_by_main_process(out: Path, *, overwrite: bool, resume: bool):
    """The folder of a multi-stage job (compress, compare), held by the main process for the whole job."""
    if PartialState().is_main_process:
        return claimed_output_dir(out, overwrite=overwrite, resume=resume)
    return nullcontext()
