"""A job's output folder: claimed before any work, checked on resume, finished atomically.

Every training job (``finetune``, ``prune``, each stage of ``compress`` and ``compare``) goes through the
same three moments: ``claimed`` (locked, empty unless resumed, the resolved options written as
``config.yaml``, the checkpoints settled), the training loop, then ``finish`` (the model published by
rename, the JSON results written, ``metrics.json`` last: it marks a finished run).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from accelerate import Accelerator, PartialState
from torch import nn

from sparsebert import checkpoints
from sparsebert.config import TrainingJob
from sparsebert.data import TaskData
from sparsebert.errors import SparseBertError
from sparsebert.hardware import resolve_mixed_precision
from sparsebert.io import (
    JsonlLog,
    atomic_write_json,
    atomic_write_text,
    check_not_an_input,
    claimed_output_dir,
    publish_dir,
)
from sparsebert.options import flat_options, saved_options, to_yaml
from sparsebert.tasks import get_task

RESUME_MAY_CHANGE = ("output_dir", "overwrite", "resume", "log_every", "eval_every", "save_every", "report_to")
INPUTS = ("data_dir", "train_file", "dev_file", "teacher", "student", "model", "dense_student")
log = logging.getLogger(__name__)


def check_paths(config: object) -> None:
    """The output folder must not be, contain or sit inside any input (checked before any work)."""
    options = flat_options(config)
    check_not_an_input(options["output_dir"], [options.get(name) for name in INPUTS])


def changed_options(config: TrainingJob, out: Path) -> str:
    """The options that differ from the run saved in ``out`` and change its result ('' if none)."""
    saved = saved_options(out)
    now = flat_options(config)
    now["mixed_precision"] = resolve_mixed_precision(now["mixed_precision"])  # saved resolved (``auto``: what ran)
    changed = [k for k in now if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]]
    return ", ".join(f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in changed)


def check_resume(config: TrainingJob, out: Path) -> None:
    """A resumed run must be the run that was interrupted: refuse options that change its result."""
    if (out / "metrics.json").exists():  # also when a kill left a checkpoint behind after the model was saved
        raise SparseBertError(f"{out} holds a finished run; nothing to resume (use --overwrite to redo it)")
    if not (out / checkpoints.LATEST).exists():
        return
    changed = changed_options(config, out)
    if changed:
        raise SparseBertError(f"--resume with changed options ({changed}); resume with the checkpoint's options")


def _settle(config: TrainingJob, out: Path) -> None:
    """On resume: the newest good checkpoint in place (damaged ones moved aside, said), the options checked."""
    if (out / "metrics.json").exists():
        check_resume(config, out)  # a finished run: refused before anything is moved
    settled = checkpoints.settle(out)
    for note in settled.notes if settled else []:
        log.warning("%s", note)
        JsonlLog(out / "log.jsonl").write({"event": "checkpoint_damaged", "message": note})
    check_resume(config, out)
    if not (out / checkpoints.LATEST).exists():  # nothing to continue: a fresh start, a fresh log
        (out / "log.jsonl").unlink(missing_ok=True)


@contextmanager
def claimed(config: TrainingJob, accelerator: Accelerator) -> Iterator[tuple[Path, JsonlLog]]:
    """The run's output folder, held (locked) by the main process for the whole job, and its log."""
    run = config.run
    out = Path(run.output_dir)
    main = accelerator.is_main_process
    with claimed_by_main_process(out, overwrite=run.overwrite, resume=run.resume):
        if main:
            if run.resume:
                _settle(config, out)
            atomic_write_text(out / "config.yaml", to_yaml(config))
        accelerator.wait_for_everyone()
        yield out, JsonlLog(out / "log.jsonl", enabled=main)


def claimed_by_main_process(out: Path, *, overwrite: bool, resume: bool):
    """A folder held by the main process only (the other processes of ``accelerate launch`` wait on it)."""
    if PartialState().is_main_process:
        return claimed_output_dir(out, overwrite=overwrite, resume=resume)
    return nullcontext()


def metrics_record(data: TaskData, metrics: dict[str, float]) -> dict:
    return {"task": data.task.name, "split": "dev", "num_examples": len(data.dev["dev"]), "metrics": metrics}


def finish(
    accelerator: Accelerator, model: nn.Module, tokenizer, config: TrainingJob, files: dict[str, dict],
    started: float, out: Path, run_log: JsonlLog,
) -> float:  # fmt: skip
    """Save the model atomically, write the JSON files (metrics.json last: it marks a finished run), drop
    the checkpoints. Returns the run's wall time, also logged as the ``saved`` event.

    What inference needs to cut inputs as training did travels with the model: the length (the tokenizer's
    ``model_max_length``) and, for extractive QA, the windows' overlap (``sparsebert_doc_stride`` in
    config.json)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        staging = out / ".staging"
        unwrapped = accelerator.unwrap_model(model)
        if get_task(config.data.task).extractive_qa:
            unwrapped.config.sparsebert_doc_stride = config.data.doc_stride
        unwrapped.save_pretrained(staging, safe_serialization=True)
        tokenizer.model_max_length = config.data.max_seq_length  # what evaluate and predict truncate to by default
        tokenizer.save_pretrained(staging)
        publish_dir(staging, out)
        for name, obj in files.items():
            atomic_write_json(out / name, obj)
        checkpoints.remove(out)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    run_log.write({"event": "saved", "wall_seconds": round(seconds, 2)})
    return seconds
