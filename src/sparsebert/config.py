"""The training jobs' options (finetune, prune, compress, compare, evaluate), each declared once with ``opt``
(``sparsebert.options``: dataclass defaults < YAML recipe < flags) in one group, and each job's
configuration composed of groups, as ``run_glue.py`` composes its model / data / training arguments:

    finetune  model  data  training               run
    prune     models data  training(student) pruning run
    compress  model  data  training(student) pruning run  teacher
    compare   ... compress's ...  compare
    evaluate  model  data  evaluation

Code reads ``config.training.lr``; flags, recipes and ``config.yaml`` say ``lr``. Choices come from the
modules that own them (strategies, pruning, tasks). The resolved configuration is saved beside every result
(``config.yaml``), so a run can be repeated.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from sparsebert import strategies
from sparsebert.distill import LossWeights
from sparsebert.errors import SparseBertError
from sparsebert.options import at_least, build_config, check_choices, check_text_columns, group, opt, positive
from sparsebert.pruning import MAX_SPARSITY, PRUNE_BLOCKS, PRUNE_CRITERIA
from sparsebert.pruning.pruner import check_pattern_target
from sparsebert.tasks import DEFAULT_LENGTH, DOC_STRIDE, task_length

STRATEGIES = tuple(strategies.TABLE)
LR_SCHEDULES = ("linear", "constant")
PRECISIONS = ("auto", "no", "bf16", "fp16")
REPORT_TO = ("none", "tensorboard", "wandb")  # accelerate's trackers that write where the run is


@dataclass
class DataOptions:
    """The task and its dev data (one source), as every command that reads a task takes them; what a
    training job trains on is in its training group."""

    task: str | None = opt(
        None,
        "GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli), movie-sentiment, movie-rating, "
        "squad (SQuAD v1.1 question answering), or classification / regression for your own files",
        group="data",
    )
    data_dir: str | None = opt(
        None, "folder in the classic GLUE layout (train.tsv, dev.tsv; squad: train-v1.1.json, dev-v1.1.json)",
        group="data",
    )  # fmt: skip
    dataset: str | None = opt(None, "hub dataset name, e.g. glue or squad (needs network)", group="data")
    dev_file: str | None = opt(None, "your own CSV/TSV/JSONL dev file (squad: SQuAD JSON)", group="data")
    text_columns: list[str] | None = opt(None, "comma-separated text column(s) of your files", group="data")
    label_column: str | None = opt(None, "label column of your files", group="data")
    max_eval_examples: int | None = opt(None, "a fixed random sample of N dev examples", group="data")
    eval_batch_size: int = opt(64, "dev batch size", group="data")
    # None until a task is named: the task's own length (squad's windows are 384 tokens, the rest 128).
    max_seq_length: int | None = opt(
        None, f"truncate inputs to N tokens (default: training, the task's: 384 for squad, else {DEFAULT_LENGTH}; "
        "evaluate: the length the model was trained at, else the task's)", group="data",
    )  # fmt: skip
    doc_stride: int | None = opt(
        None, f"squad: tokens shared by consecutive windows of a context longer than --max-seq-length (default: "
        f"{DOC_STRIDE}; evaluate: the model's)", group="question answering",
    )  # fmt: skip
    max_answer_length: int = opt(30, "squad: the longest answer predicted, in tokens", group="question answering")

    def __post_init__(self) -> None:
        """Check every value on construction: errors come before any model is loaded or file written."""
        at_least(self, ("eval_batch_size", "max_answer_length"), 1)
        at_least(self, ("doc_stride",), 0)
        at_least(self, ("max_seq_length",), 2)
        check_text_columns(self)
        check_choices(self)


@dataclass
class TrainingOptions:
    """What a training job trains on and how it optimises (the fine-tuning defaults; ``prune`` starts from
    ``student_training``)."""

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

    def __post_init__(self) -> None:
        at_least(self, ("batch_size", "log_every"), 1)
        at_least(self, ("save_every", "eval_every"), 0)
        at_least(self, ("max_steps", "max_train_examples"), 1)
        positive(self, ("lr", "epochs"))
        check_choices(self)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise SparseBertError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise SparseBertError(f"--warmup-ratio must satisfy 0 <= ratio < 1, got {self.warmup_ratio}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise SparseBertError(f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")


def student_training() -> TrainingOptions:
    """The student's schedule, where pruning differs from fine-tuning.

    The paper holds 3e-5 constant over ~27,000 steps. Over the few thousand steps a user can afford, the
    masks move for 90% of the run and the larger steps taken while they move are what bring the student
    back: a 3e-4 peak, decayed linearly after a 2% warm-up, kept MiniLM-L6 at 90% 2.2-3.7 points (MRPC)
    and 0.016-0.027 Pearson (movie-rating) closer to its teacher than a 1e-4 peak, on each of three paired
    seeds, and 0.8-1.4 points on movie-sentiment's two (BENCHMARKS.md, "A higher learning rate", "The new
    defaults").
    """
    return TrainingOptions(lr=3e-4, warmup_ratio=0.02)


@dataclass
class RunOptions:
    """Where a training job writes, and what it does with a folder that is already there."""

    output_dir: str | None = opt(None, "where the model, metrics.json, config.yaml and log.jsonl go", group="run")
    overwrite: bool = opt(False, "replace a non-empty output folder that sparsebert wrote", group="run")
    resume: bool = opt(False, "continue from the last checkpoint", group="run")
    report_to: str = opt(
        "none", "also send the log's series to accelerate's trackers (tensorboard: pip install tensorboardX)",
        choices=REPORT_TO, group="run",
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class ModelOptions:
    """The one model a job starts from or reads."""

    model: str | None = opt(
        None, "a model name (minilm-l6, minilm-l3, mpnet-base), a local folder, or a hub id; compress: teacher "
        "and student start from it; evaluate: a saved model folder (ordinary or compressed)", group="model",
    )  # fmt: skip


@dataclass
class TeacherStudent:
    """``prune``'s two models."""

    teacher: str | None = opt(None, "fine-tuned teacher folder (from `sparsebert finetune`)", group="model")
    student: str | None = opt(None, "pre-trained student (usually the teacher's base model)", group="model")


@dataclass
class TeacherSchedule:
    """``compress``'s teacher stage: its own length and rate (the student's are the training group's)."""

    teacher_epochs: float = opt(3.0, "epochs of the teacher's fine-tuning", group="teacher")
    teacher_max_steps: int | None = opt(None, "stop the teacher after N steps", group="teacher")
    teacher_lr: float = opt(5e-5, "the teacher's learning rate (linear decay)", group="teacher")

    def __post_init__(self) -> None:
        positive(self, ("teacher_epochs", "teacher_lr"))
        at_least(self, ("teacher_max_steps",), 1)


@dataclass
class PruningOptions:
    """What SparseBERT adds: the sparsity schedule and the distillation losses."""

    # None until resolved: 0.9, or with --prune-pattern N:M that pattern's 1 - N/M.
    sparsity: float | None = opt(
        None, "target sparsity of the pruned layers, at most 0.99 (0.95 = 20x; default: 0.9, or with "
        "--prune-pattern N:M its 1 - N/M)", group="pruning",
    )  # fmt: skip
    prune_pattern: str | None = opt(
        None, "N:M, e.g. 2:4: at most N nonzero weights in each group of M consecutive inputs of a row (the "
        "pattern GPUs accelerate), reached on the schedule", group="pruning",
    )  # fmt: skip
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
        "taylor", "what ranks the weights: taylor (|w * grad|, averaged over recent steps), obs (second order, "
        "oBERT: a Fisher of recent gradients, survivors updated) or magnitude (the paper); one-shot strategies: "
        "magnitude", choices=PRUNE_CRITERIA, group="pruning",
    )  # fmt: skip
    fisher_block: int = opt(
        32, "obs: consecutive input weights of a row sharing one Fisher block (memory: 4 x this bytes per "
        "weight; oBERT: 50)", group="pruning",
    )  # fmt: skip
    fisher_gradients: int = opt(
        64, "obs: recent gradients the Fisher averages (an exponential window; oBERT: 1,024 per update)",
        group="pruning",
    )  # fmt: skip
    fisher_damp: float = opt(0.01, "obs: added to the Fisher's diagonal, as a fraction of its mean", group="pruning")
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

    def resolve_sparsity(self) -> None:
        """The target a job runs at: ``--sparsity``, else the pattern's 1 - N/M, else 0.9; a pattern must be
        able to reach it (at most N of M kept: at least 1 - N/M). Run by the job once its groups are built,
        so that config.yaml records the target."""
        pattern = self.pattern()
        if self.sparsity is None:
            self.sparsity = 1 - pattern[0] / pattern[1] if pattern else 0.9
        if pattern:
            check_pattern_target(pattern, self.sparsity)

    def pattern(self) -> tuple[int, int] | None:
        """--prune-pattern as (N, M), or None."""
        if self.prune_pattern is None:
            return None
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", self.prune_pattern)
        if not match:
            raise SparseBertError(f"--prune-pattern takes N:M (e.g. 2:4), got {self.prune_pattern!r}")
        return int(match[1]), int(match[2])

    def __post_init__(self) -> None:
        """Check the pruning options before any model is loaded (errors come before slow work)."""
        if self.sparsity is not None and not 0.0 <= self.sparsity <= MAX_SPARSITY:
            raise SparseBertError(f"sparsity must satisfy 0 <= sparsity <= {MAX_SPARSITY}, got {self.sparsity}")
        self.pattern()  # well-formed
        if self.prune_start < 0 or self.prune_end < 0:
            raise SparseBertError("--prune-start and --prune-end must be >= 0")
        at_least(self, ("prune_updates", "fisher_block", "fisher_gradients"), 1)
        positive(self, ("fisher_damp",))
        at_least(self, ("augment",), 0)
        positive(self, ("temperature",))
        positive(self, ("head_lr",))
        LossWeights.parse(self.loss_weights)  # the one rule, checked before anything runs
        check_choices(self)


@dataclass
class CompareOptions:
    """``compare``'s grid: every strategy at every sparsity, one teacher."""

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
        check_choices(self)
        for sparsity in self.sparsities:  # the rule of --sparsity: a stage must not fail after the teacher trained
            if not 0.0 <= sparsity <= MAX_SPARSITY:
                raise SparseBertError(f"--sparsities must lie in [0, {MAX_SPARSITY}], got {sparsity}")


@dataclass
class EvaluationOptions:
    """``evaluate``'s output and precision (fp32 by default: the figure a saved model is judged by)."""

    output: str | None = opt(
        None, "write metrics.json here (squad: and the answers, {question id: text}, beside it as "
        "<name>.predictions.json)", group="run",
    )  # fmt: skip
    mixed_precision: str = opt(
        "no", "no (default): fp32, exact; auto: bf16 where native", choices=PRECISIONS, group="run"
    )

    def __post_init__(self) -> None:
        check_choices(self)


class JobConfig:
    """What every job's configuration offers beside its groups."""

    @classmethod
    def of(cls, **options: Any):
        """The configuration from flat options, as a recipe spells them: ``PruneConfig.of(task="mrpc", lr=1e-4)``."""
        return build_config(cls, **options)


def resolve_length(data: DataOptions) -> None:
    """A training job's length and stride, resolved on construction so that config.yaml records what ran and
    a resumed run or a finished compress stage compares like with like (a job whose task is set later
    resolves it when it loads the data: ``data.load_data``)."""
    if data.max_seq_length is None:
        data.max_seq_length = task_length(data.task)
    if data.doc_stride is None:
        data.doc_stride = DOC_STRIDE


@dataclass
class FinetuneConfig(JobConfig):
    """``sparsebert finetune``: train the teacher on labels."""

    model: ModelOptions = group(ModelOptions)
    data: DataOptions = group(DataOptions)
    training: TrainingOptions = group(TrainingOptions)
    run: RunOptions = group(RunOptions)

    def __post_init__(self) -> None:
        resolve_length(self.data)


@dataclass
class PruneConfig(JobConfig):
    """``sparsebert prune``: prune the pre-trained student while distilling from the teacher."""

    models: TeacherStudent = group(TeacherStudent)
    data: DataOptions = group(DataOptions)
    training: TrainingOptions = group(student_training)
    pruning: PruningOptions = group(PruningOptions)
    run: RunOptions = group(RunOptions)

    def __post_init__(self) -> None:
        resolve_length(self.data)
        self.pruning.resolve_sparsity()


@dataclass
class CompressConfig(JobConfig):
    """``sparsebert compress``: fine-tune the teacher, then prune the student, then report."""

    model: ModelOptions = group(ModelOptions)
    data: DataOptions = group(DataOptions)
    training: TrainingOptions = group(student_training)
    pruning: PruningOptions = group(PruningOptions)
    run: RunOptions = group(RunOptions)
    teacher: TeacherSchedule = group(TeacherSchedule)

    def __post_init__(self) -> None:
        resolve_length(self.data)
        self.pruning.resolve_sparsity()


TrainingJob = FinetuneConfig | PruneConfig  # one run folder trained by the loop (compress runs one of each)


@dataclass
class CompareConfig(CompressConfig):
    """``sparsebert compare``: compress's stages for every strategy at every sparsity, one shared teacher."""

    compare: CompareOptions = group(CompareOptions)


@dataclass
class EvaluateConfig(JobConfig):
    """``sparsebert evaluate``: dev metrics of a saved model."""

    model: ModelOptions = group(ModelOptions)
    data: DataOptions = group(DataOptions)
    evaluation: EvaluationOptions = group(EvaluationOptions)
