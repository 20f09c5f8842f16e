"""The multi-stage jobs' pipeline (``compress``, ``compare``): one folder, the teacher's stage first, then
the students' stages, each a run folder of its own that is skipped when finished and continued when
interrupted, so that ``--resume`` trains nothing twice."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from accelerate import PartialState

from sparsebert import checkpoints
from sparsebert.config import (
    CompressConfig,
    FinetuneConfig,
    PruneConfig,
    RunOptions,
    TeacherStudent,
    TrainingJob,
    TrainingOptions,
)
from sparsebert.data import load_data
from sparsebert.errors import SparseBertError
from sparsebert.io import atomic_write_text
from sparsebert.models import load_tokenizer
from sparsebert.options import require, to_yaml
from sparsebert.runs import changed_options, check_paths, claimed_by_main_process


def stage_configs(config: CompressConfig, out: Path) -> tuple[FinetuneConfig, PruneConfig]:
    """Split a compress/compare configuration into the teacher's and a student's run: both read the same
    data; the teacher trains with the fine-tuning schedule at the teacher's length and rate, the student
    with the job's training options (the student's schedule)."""
    data, training = copy.deepcopy(config.data), config.training
    teacher_training = replace(
        copy.deepcopy(training),
        epochs=config.teacher.teacher_epochs,
        max_steps=config.teacher.teacher_max_steps,
        lr=config.teacher.teacher_lr,
        lr_schedule="linear",
        warmup_ratio=TrainingOptions().warmup_ratio,  # --warmup-ratio is the student's
    )
    report_to = config.run.report_to
    teacher = FinetuneConfig(
        model=copy.deepcopy(config.model),
        data=data,
        training=teacher_training,
        run=RunOptions(output_dir=str(out / "teacher"), report_to=report_to),
    )
    student = PruneConfig(
        models=TeacherStudent(teacher=teacher.run.output_dir, student=config.model.model),
        data=copy.deepcopy(data),
        training=copy.deepcopy(training),
        pruning=copy.deepcopy(config.pruning),
        run=RunOptions(output_dir=str(out / "student"), report_to=report_to),
    )
    return teacher, student


def run_stage(config: TrainingJob, job: Callable) -> bool:
    """Run one stage unless it already finished; continue it if a checkpoint is there. True if it ran.

    A finished stage is reused only if it was run with the same options (else its results would be
    reported as those of the options asked for).
    """
    stage_dir = Path(config.run.output_dir)
    if (stage_dir / "metrics.json").exists():
        changed = changed_options(config, stage_dir)
        if changed:
            raise SparseBertError(
                f"{stage_dir} holds a finished run with other options ({changed}); use --overwrite to redo it"
            )
        return False
    config.run.resume = checkpoints.exists(stage_dir)
    config.run.overwrite = not config.run.resume
    job(config)
    return True


def check_inputs(config: CompressConfig) -> None:
    """With --overwrite, read the data and the model's tokenizer before a multi-stage job empties its
    folder: a typo in a path must not cost the previous results. (Without it nothing is deleted, and
    the stages report bad inputs themselves.)"""
    if config.run.overwrite:
        load_data(copy.deepcopy(config.data), config.training)
        load_tokenizer(config.model.model)


@contextmanager
def teacher_first(config: CompressConfig, finetune: Callable) -> Iterator[tuple[Path, PruneConfig]]:
    """Claim the job's folder (``--resume`` continues it, ``--overwrite`` empties it), run (or reuse) the
    teacher's stage with ``finetune``, and hand over the student stages' template configuration."""
    require(config, "model", "task", "output_dir")
    check_paths(config)
    check_inputs(config)
    out = Path(config.run.output_dir)
    with claimed_by_main_process(out, overwrite=config.run.overwrite, resume=config.run.resume):
        if PartialState().is_main_process and not (config.run.resume and (out / "config.yaml").exists()):
            atomic_write_text(out / "config.yaml", to_yaml(config))  # what `--resume` alone starts from
        PartialState().wait_for_everyone()  # the folder is claimed (and emptied) before any rank looks inside
        teacher, student = stage_configs(config, out)
        run_stage(teacher, finetune)
        yield out, student
