"""Run configurations: dataclass defaults < YAML recipe (``--config``) < command-line flags.

The resolved configuration is saved beside every result (``config.yaml``), so a run can be repeated.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sparsebert.errors import SparseBertError


@dataclass
class TrainConfig:
    """Options shared by every training command: the task, its data, the optimisation."""

    task: str | None = None
    output_dir: str | None = None
    # data: one source
    data_dir: str | None = None
    dataset: str | None = None
    train_file: str | None = None
    dev_file: str | None = None
    text_columns: list[str] | None = None
    label_column: str | None = None
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    # optimisation
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 32  # per process
    eval_batch_size: int = 64
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    lr_schedule: str = "linear"  # linear | constant
    max_grad_norm: float | None = 1.0
    max_seq_length: int = 128
    seed: int = 42
    eval_every: int | None = 200  # steps between dev evaluations (the reference: 200); 0 = only at the end
    save_every: int = 200  # steps between resumable checkpoints
    log_every: int = 10
    # auto: bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AMX or AVX512-BF16),
    # fp32 elsewhere (emulated bf16 is ~3x slower than fp32 on a CPU without it: BENCHMARKS.md)
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    group_by_length: bool = True  # batches of similar length (less padding), HF Trainer's convention
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        """Check every value on construction: errors come before any model is loaded or file written."""
        _at_least(self, ("batch_size", "eval_batch_size", "log_every"), 1)
        _at_least(self, ("save_every",), 0)
        if self.max_steps is not None:
            _at_least(self, ("max_steps",), 1)
        if self.eval_every is not None:
            _at_least(self, ("eval_every",), 0)
        _at_least(self, ("max_seq_length",), 2)
        _positive(self, ("lr", "epochs"))
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise SparseBertError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise SparseBertError(f"--warmup-ratio must satisfy 0 <= ratio < 1, got {self.warmup_ratio}")
        if self.max_grad_norm is not None:
            _positive(self, ("max_grad_norm",))
        _one_of(self, "lr_schedule", LR_SCHEDULES)
        _one_of(self, "mixed_precision", PRECISIONS)


LR_SCHEDULES = ("linear", "constant")
PRECISIONS = ("auto", "no", "bf16", "fp16")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(config: object, names: tuple[str, ...], low: int) -> None:
    for name in names:
        value = getattr(config, name)
        if value < low:
            raise SparseBertError(f"{_flag(name)} must be >= {low}, got {value}")


def _positive(config: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            raise SparseBertError(f"{_flag(name)} must be a positive number, got {value}")


def _one_of(config: object, name: str, choices: tuple[str, ...]) -> None:
    if getattr(config, name) not in choices:
        raise SparseBertError(f"{_flag(name)} must be one of {', '.join(choices)}; got {getattr(config, name)!r}")


@dataclass
class FinetuneConfig(TrainConfig):
    """``sparsebert finetune``: train the teacher on labels."""

    model: str | None = None


STRATEGIES = ("sparsebert", "finetune-then-prune", "prune-then-finetune", "distill-dense")


@dataclass
class PruneOptions:
    """What SparseBERT adds: the sparsity schedule and the distillation losses."""

    sparsity: float = 0.9
    strategy: str = "sparsebert"
    prune_start: float = 0.0  # step, or fraction of the run when < 1
    prune_end: float = 0.7  # step, or fraction of the run when <= 1
    prune_updates: int = 100
    prune_scope: str = "per_matrix"  # per_matrix | global
    temperature: float = 1.0
    # attention, hidden, prediction. The paper adds them with equal weights over ~100x our CPU budgets;
    # at a few hundred steps the attention-score MSE (largest in size) crowds out the logits, and
    # 0.1,1,5 kept MiniLM-L6 far closer to its teacher (BENCHMARKS.md, "loss weights"). 1,1,1 = paper.
    loss_weights: str = "0.1,1,5"
    regression_target: str = "teacher"  # teacher | label | both
    student_head: str = "teacher"  # teacher (copy the teacher's classifier) | fresh
    head_lr: float | None = None  # learning rate of the (unpruned) task head; None = lr
    augment: int = 0  # augmented copies of each training example (word replacement; 20 in TinyBERT's data)

    def validate_pruning(self) -> None:
        """Check the pruning options before any model is loaded (errors come before slow work)."""
        if not 0.0 <= self.sparsity < 1.0:
            raise SparseBertError(f"sparsity must satisfy 0 <= sparsity < 1, got {self.sparsity}")
        if self.strategy not in STRATEGIES:
            raise SparseBertError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.prune_start < 0 or self.prune_end < 0:
            raise SparseBertError("--prune-start and --prune-end must be >= 0")
        if self.prune_updates < 1:
            raise SparseBertError(f"--prune-updates must be >= 1, got {self.prune_updates}")
        if self.augment < 0:
            raise SparseBertError(f"--augment must be >= 0, got {self.augment}")
        _positive(self, ("temperature",))
        _one_of(self, "prune_scope", ("per_matrix", "global"))
        _one_of(self, "regression_target", ("teacher", "label", "both"))
        _one_of(self, "student_head", ("teacher", "fresh"))
        if self.head_lr is not None:
            _positive(self, ("head_lr",))


@dataclass
class PruneConfig(PruneOptions, TrainConfig):
    """``sparsebert prune``: prune the pre-trained student while distilling from the teacher."""

    teacher: str | None = None
    student: str | None = None
    lr_schedule: str = "constant"  # the reference keeps the LR constant in the joint run

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_pruning()


@dataclass
class CompressConfig(PruneOptions, TrainConfig):
    """``sparsebert compress``: fine-tune the teacher, then prune the student, then report."""

    model: str | None = None
    lr_schedule: str = "constant"
    teacher_epochs: float = 3.0
    teacher_max_steps: int | None = None
    teacher_lr: float = 5e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_pruning()
        _positive(self, ("teacher_epochs", "teacher_lr"))
        if self.teacher_max_steps is not None:
            _at_least(self, ("teacher_max_steps",), 1)


@dataclass
class CompareConfig(CompressConfig):
    """``sparsebert compare``: every strategy at every sparsity, one shared teacher."""

    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.97])
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    dense_student: str | None = None  # distill-dense starts from this model (default: model, cut down)


@dataclass
class EvaluateConfig:
    """``sparsebert evaluate``: dev metrics of a saved model."""

    model: str | None = None
    task: str | None = None
    data_dir: str | None = None
    dataset: str | None = None
    dev_file: str | None = None
    text_columns: list[str] | None = None
    label_column: str | None = None
    max_eval_examples: int | None = None
    eval_batch_size: int = 64
    max_seq_length: int = 128
    output: str | None = None  # where to write metrics.json
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        _at_least(self, ("eval_batch_size", "max_seq_length"), 1)
        _one_of(self, "mixed_precision", PRECISIONS)


C = TypeVar("C")


def _norm(key: str) -> str:
    return key.replace("-", "_")


def build_config(cls: type[C], recipe: str | Path | None = None, **overrides: Any) -> C:
    """Defaults, then the YAML recipe, then ``overrides`` whose value is not None.

    Every value is checked against its option's declared type first (a YAML ``no`` is a boolean, the
    string ``"no"`` is not; ``2.7`` is no step count), so a bad recipe fails before any work starts.
    """
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            raise SparseBertError(f"{path}: recipe file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise SparseBertError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise SparseBertError(f"{path}: a recipe is a mapping of option: value")
        for key, value in loaded.items():
            if _norm(str(key)) not in hints:
                raise SparseBertError(f"{path}: unknown option {key!r} for this command")
            values[_norm(key)] = _typed(value, hints[_norm(key)], f"{path}: option {key}")
    for key, value in overrides.items():
        if value is None:
            continue
        if _norm(key) not in hints:
            raise SparseBertError(f"unknown option: {key}")
        values[_norm(key)] = _typed(value, hints[_norm(key)], _flag(_norm(key)))
    return cls(**values)


def _typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the type ``hint`` declares, or a one-line error naming ``where``."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [_from_text(v.strip(), item, where) for v in value.split(",")]
        if not isinstance(value, list):
            raise SparseBertError(f"{where}: expected a list or comma-separated text, got {value!r}")
        return [_typed(v, item, where) for v in value]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint, True)
    if not ok:
        names = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}
        raise SparseBertError(f"{where}: expected {names[hint]}, got {value!r}")
    return float(value) if hint is float else value


def _from_text(text: str, kind: type, where: str) -> Any:
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        raise SparseBertError(f"{where}: {text!r} is not a number") from None


def to_yaml(config: object) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def require(config: object, *names: str) -> None:
    """Raise a one-line error naming the missing required options."""
    missing = [n for n in names if getattr(config, n) in (None, "")]
    if missing:
        raise SparseBertError("missing required option(s): " + ", ".join("--" + m.replace("_", "-") for m in missing))
