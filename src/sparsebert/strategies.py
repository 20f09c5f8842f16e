"""The orders of work that make a small model, in one table (the paper's knowledge analysis), and what
each entry of the table means: where the student starts (``initial_student``), whether it learns from the
teacher or from the labels, and how it is pruned (``pruner_factory``). A new strategy is a row of
``TABLE``; a new kind of start or of pruning is one function here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparsebert.errors import SparseBertError
from sparsebert.models import load_model, load_tokenizer
from sparsebert.pruning import CubicSparsitySchedule, Pruner, resolve_step
from sparsebert.sources import resolve_model
from sparsebert.students import fit_dense_student
from sparsebert.tasks import TaskSpec


@dataclass(frozen=True)
class Strategy:
    name: str
    student_from: str  # "pretrained" | "teacher" (the fine-tuned weights) | "pretrained-cut" (a small dense copy)
    distills: bool  # trained on the teacher's attention, hidden states and logits; else on the labels
    pruning: str  # "gradual" (cubic schedule while training) | "one-shot" (by magnitude, then fixed) | "none"


TABLE: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("sparsebert", student_from="pretrained", distills=True, pruning="gradual"),
        Strategy("finetune-then-prune", student_from="teacher", distills=False, pruning="gradual"),
        # Not in the paper: (c) with the teacher as the signal instead of the labels, which is how
        # SparseML, nn_pruning and oBERT prune; it separates "where the student starts" from "what it learns from".
        Strategy("finetune-then-prune-kd", student_from="teacher", distills=True, pruning="gradual"),
        Strategy("prune-then-finetune", student_from="pretrained", distills=False, pruning="one-shot"),
        Strategy("distill-dense", student_from="pretrained-cut", distills=True, pruning="none"),
    )
}


def initial_student(models, pruning, teacher: nn.Module | None, tokenizer, task: TaskSpec) -> nn.Module:
    """Where ``pruning.strategy``'s student starts (``models``: the teacher and student options).

    sparsebert / prune-then-finetune: the pre-trained weights; finetune-then-prune(-kd): the teacher's;
    distill-dense: the student model (by default the pre-trained model itself) cut down to as many
    encoder weights as the sparse model keeps (layers dropped, then narrowed). A distilling student
    starts with the teacher's task head unless ``--student-head fresh``.
    """
    strategy = TABLE[pruning.strategy]
    if strategy.student_from == "teacher":
        return load_model(models.teacher, task)
    student = load_model(models.student, task)
    if teacher is not None:
        check_same_vocabulary(models.student, models.teacher, student, teacher, tokenizer)
    if strategy.student_from == "pretrained-cut":
        student = fit_dense_student(student, teacher.config, pruning.sparsity)
    if strategy.distills and pruning.student_head == "teacher":
        copy_head(teacher, student)
    return student


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


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json", "spiece.model")


def check_same_vocabulary(student_name: str, teacher_name: str, student: nn.Module, teacher: nn.Module,
                          teacher_tokenizer) -> None:  # fmt: skip
    """A distilled student reads the teacher's token ids: the vocabularies must be the same, entry for
    entry (equal sizes are not enough: a shuffled vocabulary has the same size). A student folder
    without a tokenizer can only be checked by size."""
    same = student.config.vocab_size == teacher.config.vocab_size
    folder = Path(resolve_model(student_name))
    has_tokenizer = not folder.is_dir() or any((folder / f).exists() for f in TOKENIZER_FILES)
    if same and has_tokenizer:
        same = load_tokenizer(student_name).get_vocab() == teacher_tokenizer.get_vocab()
    if not same:
        raise SparseBertError(
            f"student {student_name} and teacher {teacher_name} have different vocabularies: "
            "a distilled student must share the teacher's tokenizer"
        )


def pruner_factory(config) -> Callable[[nn.Module, int], Pruner] | None:
    """How ``config.strategy`` prunes (``config``: the pruning options), built once the run's length is known
    (the schedule is in steps)."""
    how = TABLE[config.strategy].pruning
    if how == "none":
        return None

    def make_pruner(model: nn.Module, n_steps: int) -> Pruner:
        if how == "one-shot":  # on the starting magnitudes, then fixed
            return Pruner.one_shot(model, config.sparsity, config.prune_scope, config.prune_block, config.pattern())
        start, end = resolve_step(config.prune_start, n_steps), resolve_step(config.prune_end, n_steps)
        # masks are updated after an optimizer step: a window ending at step 0 would never prune
        schedule = CubicSparsitySchedule(config.sparsity, start, min(max(end, start, 1), n_steps), config.prune_updates)
        options = {}
        if config.prune_criterion == "obs":
            options = {"fisher_block": config.fisher_block, "fisher_gradients": config.fisher_gradients,
                       "fisher_damp": config.fisher_damp}  # fmt: skip
        return Pruner(model, schedule, config.prune_scope, block=config.prune_block,
                      criterion=config.prune_criterion, pattern=config.pattern(), **options)  # fmt: skip

    return make_pruner
