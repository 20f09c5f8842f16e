"""Run configurations: dataclass defaults < YAML recipe (``--config``) < command-line flags.

The resolved configuration is saved beside every result (``config.yaml``), so a run can be repeated.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sparsebert import strategies
from sparsebert.errors import SparseBertError
from sparsebert.io import is_sparsebert_output


def opt(default: Any = None, help: str = "", *, choices: tuple | None = None, group: str = "training", factory=None):
    """Declare an option once: its default, its help and its choices serve the dataclass (the API), the
    YAML recipes (type-checked by ``build_config``) and the command line (``add_arguments``)."""
    metadata = {"help": help, "choices": choices, "group": group}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


STRATEGIES = tuple(strategies.TABLE)
LR_SCHEDULES = ("linear", "constant")
PRECISIONS = ("auto", "no", "bf16", "fp16")
# The sparse runtime's kernels (runtime/ops.py). auto: per matrix, the faster of the exact kernels (fp32 CSR,
# dense fp32), timed on the first call at each input size; fastest: the same among the lossy ones too
# (dense bf16 where the CPU has it natively, int8 on 1x4 blocks). Fixed, by density: cpp (compiled CSR),
# torch (MKL CSR), int8 (the VNNI kernel where 1x4 blocks are sparse enough, models pruned with
# --prune-block 4; the rest as cpp).
SPARSE_BACKENDS = ("auto", "fastest", "cpp", "torch", "int8")
PRUNE_BLOCKS = (1, 2, 4, 8)  # consecutive input weights pruned together (--prune-block)
# What ranks the weights for pruning (pruning/pruner.py): magnitude (the paper), or the first-order loss
# change of zeroing each weight, |w * grad| averaged over recent steps (taylor).
PRUNE_CRITERIA = ("magnitude", "taylor")
DEFAULT_LENGTH = 128  # tokens, when neither the options nor the model say otherwise


@dataclass
class DataOptions:
    """The task and its data (one source), as every command that reads a task takes them."""

    task: str | None = opt(
        None,
        "GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli), movie-sentiment, movie-rating, "
        "or classification / regression for your own files",
        group="data",
    )
    data_dir: str | None = opt(None, "folder in the classic GLUE layout (train.tsv, dev.tsv)", group="data")
    dataset: str | None = opt(None, "hub dataset name, e.g. glue (needs network)", group="data")
    dev_file: str | None = opt(None, "your own CSV/TSV/JSONL dev file", group="data")
    text_columns: list[str] | None = opt(None, "comma-separated text column(s) of your files", group="data")
    label_column: str | None = opt(None, "label column of your files", group="data")
    max_eval_examples: int | None = opt(None, "a fixed random sample of N dev examples", group="data")
    eval_batch_size: int = opt(64, "dev batch size", group="data")
    max_seq_length: int = opt(DEFAULT_LENGTH, "truncate inputs to N tokens", group="data")

    def __post_init__(self) -> None:
        """Check every value on construction: errors come before any model is loaded or file written."""
        _at_least(self, ("eval_batch_size",), 1)
        if self.max_seq_length is not None:
            _at_least(self, ("max_seq_length",), 2)
        _check_text_columns(self)
        _check_choices(self)


@dataclass
class TrainConfig(DataOptions):
    """Options shared by every training command: the task, its data, the optimisation."""

    output_dir: str | None = opt(None, "where the model, metrics.json, config.yaml and log.jsonl go", group="run")
    train_file: str | None = opt(None, "your own CSV/TSV/JSONL training file", group="data")
    max_train_examples: int | None = opt(None, "a fixed random sample of N training examples", group="data")
    epochs: float = opt(3.0, "training epochs (fractions allowed)")
    max_steps: int | None = opt(None, "stop after N optimizer steps (overrides --epochs)")
    batch_size: int = opt(32, "training batch size per process")
    lr: float = opt(5e-5, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.01, "AdamW weight decay (none on biases and LayerNorm)")
    warmup_ratio: float = opt(0.1, "fraction of the run with a linear LR warm-up")
    lr_schedule: str = opt("linear", "after the warm-up: linear decay to 0, or constant", choices=LR_SCHEDULES)
    max_grad_norm: float | None = opt(1.0, "clip the gradient norm to this (0: no clipping)")
    seed: int = opt(42, "seed of the initialisation, data order and dropout")
    eval_every: int | None = opt(200, "dev evaluation every N steps (the reference: 200; 0: at the end only)")
    save_every: int = opt(200, "resumable checkpoint every N steps (0: only when stopped)")
    log_every: int = opt(10, "log the mean loss every N steps")
    # emulated bf16 is ~2.6x slower than fp32 on a CPU without bf16 instructions (BENCHMARKS.md)
    mixed_precision: str = opt(
        "auto",
        "auto: bf16 where the hardware has it natively (CUDA with bf16, CPUs with AMX or AVX512-BF16), "
        "fp32 (no) elsewhere",
        choices=PRECISIONS,
    )
    group_by_length: bool = opt(True, "training batches of similar length (less padding), HF Trainer's convention")
    overwrite: bool = opt(False, "replace a non-empty output folder that sparsebert wrote", group="run")
    resume: bool = opt(False, "continue from the last checkpoint", group="run")

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, ("batch_size", "log_every"), 1)
        _at_least(self, ("save_every",), 0)
        if self.max_steps is not None:
            _at_least(self, ("max_steps",), 1)
        if self.eval_every is not None:
            _at_least(self, ("eval_every",), 0)
        _positive(self, ("lr", "epochs"))
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise SparseBertError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise SparseBertError(f"--warmup-ratio must satisfy 0 <= ratio < 1, got {self.warmup_ratio}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise SparseBertError(f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_text_columns(config: object) -> None:
    """One text, or a pair: what BERT-family encoders take (a third column would be silently dropped)."""
    if config.text_columns and len(config.text_columns) > 2:
        count = len(config.text_columns)
        raise SparseBertError(f"--text-columns takes one or two columns (a text or a pair), got {count}")


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


def _check_choices(config: object) -> None:
    """Every option declared with choices holds one of them (lists: every item)."""
    for f in dataclasses.fields(config):
        choices, value = f.metadata.get("choices"), getattr(config, f.name)
        for item in value if isinstance(value, list) else [value]:
            if choices and item is not None and item not in choices:
                raise SparseBertError(f"{_flag(f.name)} must be one of {', '.join(choices)}; got {item!r}")


@dataclass
class FinetuneConfig(TrainConfig):
    """``sparsebert finetune``: train the teacher on labels."""

    model: str | None = opt(None, "pre-trained model: minilm-l6, a local folder, or a hub id", group="model")


@dataclass
class PruneOptions:
    """What SparseBERT adds: the sparsity schedule and the distillation losses."""

    sparsity: float = opt(0.9, "target sparsity of the pruned layers (0.95 = 20x)", group="pruning")
    strategy: str = opt(
        "sparsebert", "sparsebert, or a baseline order of work (see README)", choices=STRATEGIES, group="pruning"
    )
    prune_start: float = opt(0.0, "first pruning step, or a fraction of the run when <= 1", group="pruning")
    prune_end: float = opt(0.9, "step where the target is reached, or a fraction of the run when <= 1", group="pruning")
    prune_updates: int = opt(100, "mask updates in the pruning window (the paper: ~100)", group="pruning")
    prune_scope: str = opt(
        "per_matrix", "one threshold per matrix (the paper) or one for all (no matrix beyond 98%)",
        choices=("per_matrix", "global"), group="pruning",
    )  # fmt: skip
    prune_block: int = opt(
        1, "prune groups of this many consecutive input weights together (1: unstructured, the paper; 4: the "
        "1x4 pattern int8 VNNI kernels need)", choices=PRUNE_BLOCKS, group="pruning",
    )  # fmt: skip
    # The paper ranks by magnitude; at 90% the taylor score kept MiniLM-L6 3-5 points closer to its teacher
    # and without the mid-run collapse (BENCHMARKS.md, "Pruning criterion"). One-shot strategies have no
    # gradient yet: they always rank by magnitude.
    prune_criterion: str = opt(
        "taylor", "what ranks the weights: taylor (|w * grad|, averaged over recent steps) or magnitude (the "
        "paper); one-shot strategies: magnitude", choices=PRUNE_CRITERIA, group="pruning",
    )  # fmt: skip
    temperature: float = opt(1.0, "softmax temperature of the prediction loss (times T², Hinton)", group="pruning")
    # The paper adds the three terms with equal weights over ~100x our CPU budgets; at a few hundred
    # steps the attention-score MSE (largest in size) crowds out the logits, and 0.1,1,5 kept MiniLM-L6
    # far closer to its teacher (BENCHMARKS.md, "loss weights").
    loss_weights: str = opt("0.1,1,5", "attention,hidden,prediction (the paper: 1,1,1)", group="pruning")
    regression_target: str = opt(
        "teacher", "what a regression student's prediction is fitted to", choices=("teacher", "label", "both"),
        group="pruning",
    )  # fmt: skip
    regression_scale: str = opt(
        "variance", "divide a regression student's prediction MSE by the training labels' variance, or not",
        choices=("variance", "none"), group="pruning",
    )  # fmt: skip
    student_head: str = opt(
        "teacher", "start the task head from the teacher's, or fresh", choices=("teacher", "fresh"), group="pruning"
    )
    head_lr: float | None = opt(None, "learning rate of the (unpruned) task head (default: --lr)", group="pruning")
    augment: int = opt(
        0, "augmented copies of each training example, labelled by the teacher (TinyBERT: 20)", group="pruning"
    )
    average_weights: bool = opt(
        False, "keep the mean of the student's weights over the steps after --prune-end (masks fixed) instead of "
        "the last ones", group="pruning",
    )  # fmt: skip

    def validate_pruning(self) -> None:
        """Check the pruning options before any model is loaded (errors come before slow work)."""
        if not 0.0 <= self.sparsity < 1.0:
            raise SparseBertError(f"sparsity must satisfy 0 <= sparsity < 1, got {self.sparsity}")
        if self.prune_start < 0 or self.prune_end < 0:
            raise SparseBertError("--prune-start and --prune-end must be >= 0")
        _at_least(self, ("prune_updates",), 1)
        _at_least(self, ("augment",), 0)
        _positive(self, ("temperature",))
        if self.head_lr is not None:
            _positive(self, ("head_lr",))
        _check_loss_weights(self.loss_weights)


def _check_loss_weights(text: Any) -> None:
    if isinstance(text, dict):
        text = list(text.values())
    parts = text.split(",") if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
    try:
        ok = parts is not None and len(parts) == 3 and all(math.isfinite(float(p)) and float(p) >= 0 for p in parts)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SparseBertError(f"--loss-weights must be three numbers >= 0 (attention,hidden,prediction), got {text!r}")


@dataclass
class StudentSchedule:
    """The student's learning-rate schedule, where pruning differs from fine-tuning.

    The paper holds 3e-5 constant over ~27,000 steps. Over the few thousand steps a user can afford, the
    masks move for 90% of the run and the larger steps taken while they move are what bring the student
    back: a 3e-4 peak, decayed linearly after a 2% warm-up, kept MiniLM-L6 at 90% 2.2-3.7 points (MRPC)
    and 0.016-0.027 Pearson (movie-rating) closer to its teacher than a 1e-4 peak, on each of three paired
    seeds, and 0.8-1.4 points on movie-sentiment's two (BENCHMARKS.md, "A higher learning rate", "The new
    defaults").
    """

    lr: float = opt(3e-4, "the student's peak learning rate (AdamW; the paper: 3e-5 over ~100x more steps)")
    warmup_ratio: float = opt(0.02, "fraction of the student's run with a linear LR warm-up")
    lr_schedule: str = opt(
        "linear", "the student's LR after the warm-up: linear decay to 0, or constant (the paper)",
        choices=LR_SCHEDULES,
    )  # fmt: skip


@dataclass
class PruneConfig(PruneOptions, StudentSchedule, TrainConfig):
    """``sparsebert prune``: prune the pre-trained student while distilling from the teacher."""

    teacher: str | None = opt(None, "fine-tuned teacher folder (from `sparsebert finetune`)", group="model")
    student: str | None = opt(None, "pre-trained student (usually the teacher's base model)", group="model")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_pruning()


@dataclass
class CompressConfig(PruneOptions, StudentSchedule, TrainConfig):
    """``sparsebert compress``: fine-tune the teacher, then prune the student, then report."""

    model: str | None = opt(None, "pre-trained model (teacher and student start from it)", group="model")
    teacher_epochs: float = opt(3.0, "epochs of the teacher's fine-tuning", group="teacher")
    teacher_max_steps: int | None = opt(None, "stop the teacher after N steps", group="teacher")
    teacher_lr: float = opt(5e-5, "the teacher's learning rate (linear decay)", group="teacher")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_pruning()
        _positive(self, ("teacher_epochs", "teacher_lr"))
        if self.teacher_max_steps is not None:
            _at_least(self, ("teacher_max_steps",), 1)


@dataclass
class CompareConfig(CompressConfig):
    """``sparsebert compare``: every strategy at every sparsity, one shared teacher."""

    sparsities: list[float] = opt(
        help="comma-separated sparsities", factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.97], group="compare"
    )
    strategies: list[str] = opt(
        help="comma-separated strategies", factory=lambda: list(STRATEGIES), choices=STRATEGIES, group="compare"
    )
    dense_student: str | None = opt(
        None, "pre-trained model distill-dense starts from, e.g. minilm-l3 (default: --model, cut down)",
        group="compare",
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        for sparsity in self.sparsities:
            if not 0.0 <= sparsity < 1.0:
                raise SparseBertError(f"--sparsities must lie in [0, 1), got {sparsity}")


TRAINED_LENGTH = f"truncate inputs to N tokens (default: the length the model was trained at, else {DEFAULT_LENGTH})"


@dataclass
class EvaluateConfig(DataOptions):
    """``sparsebert evaluate``: dev metrics of a saved model."""

    model: str | None = opt(None, "model folder (ordinary or compressed) or name", group="model")
    output: str | None = opt(None, "write metrics.json here", group="run")
    mixed_precision: str = opt("no", "no (default): fp32, exact; auto: bf16 where native", choices=PRECISIONS)
    max_seq_length: int | None = opt(None, TRAINED_LENGTH, group="data")


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
        _at_least(self, ("batch_size",), 1)
        if self.max_seq_length is not None:
            _at_least(self, ("max_seq_length",), 2)
        _check_text_columns(self)
        if self.threads is not None:
            _at_least(self, ("threads",), 1)
        _check_choices(self)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The configuration a parsed command line asks for: its ``--config`` recipe, then its flags.

    With ``--resume`` the interrupted run's options come first (nanoGPT's resume): ``--resume
    --output-dir D`` alone continues the run in D as it was started, whatever the defaults are now; an
    option given again must match it (``api._check_resume``).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    config = build_config(cls, args.config, **flags)
    saved = resumed_options(config)
    return build_config(cls, args.config, base=saved, **flags) if saved else config


def saved_options(folder: Path) -> dict[str, Any]:
    """The options a run in ``folder`` was started with (its ``config.yaml``; {} if it has none)."""
    path = folder / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def resumed_options(config: object) -> dict[str, Any]:
    """The options saved by the run that ``--resume`` continues ({} if none), read only from a folder that
    sparsebert wrote, less the options that say where and how to start."""
    folder = Path(config.output_dir) if getattr(config, "resume", False) and config.output_dir else None
    if folder is None or not is_sparsebert_output(folder):
        return {}
    names = {f.name for f in dataclasses.fields(config)} - {"output_dir", "overwrite", "resume"}
    return {key: value for key, value in saved_options(folder).items() if key in names}


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per option of ``cls``, from its declaration (type, choices, help, default).

    Every flag defaults to None, so ``build_config`` can tell a given flag from an absent one (flags
    override the recipe, which overrides the defaults).
    """
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        group = f.metadata.get("group", "options")
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        kind, help_text = _base_type(hints[f.name]), f.metadata.get("help", "")
        help_text += f" (default: {shown})" if shown not in (None, False, "") else ""
        kwargs: dict[str, Any] = {"default": None, "help": help_text.replace("%", "%%")}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            kwargs["metavar"] = "A,B,..."
        else:
            kwargs["type"] = kind
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        groups[group].add_argument(_flag(f.name), **kwargs)


def _base_type(hint: Any) -> Any:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


C = TypeVar("C")


def _norm(key: str) -> str:
    return key.replace("-", "_")


def build_config(
    cls: type[C], recipe: str | Path | None = None, *, base: dict[str, Any] | None = None, **overrides: Any
) -> C:
    """Defaults, then ``base`` (a resumed run's options), then the YAML recipe, then ``overrides`` whose
    value is not None.

    Every value is checked against its option's declared type first (a YAML ``no`` is a boolean, the
    string ``"no"`` is not; ``2.7`` is no step count), so a bad recipe fails before any work starts.
    """
    hints = typing.get_type_hints(cls)
    values = {key: _typed(value, hints[key], f"saved option {key}") for key, value in (base or {}).items()}
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
