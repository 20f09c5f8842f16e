"""What each task is: its columns in the classic GLUE files, its labels, its metrics.

Columns are header names, or 0-based positions for header-less files (CoLA). ``labels`` lists the
label strings as they appear in the files (their order fixes the class ids); ``None`` means regression.
SQuAD (``extractive_qa``) has neither columns nor labels: its files are the official JSON (``sparsebert.qa``)
and its answers are spans of the context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sparsebert.errors import SparseBertError

DEFAULT_LENGTH = 128  # tokens, when neither the options, the task nor the model say otherwise
DOC_STRIDE = 128  # extractive QA: tokens shared by consecutive windows (BERT's SQuAD setting, at 384 tokens)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_columns: tuple[str | int, ...]
    label_column: str | int
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    train_file: str = "train.tsv"
    dev_files: dict[str, str] = field(default_factory=lambda: {"dev": "dev.tsv"})
    header: bool = True
    skip_malformed: bool = False  # QQP's train file has a few broken rows; GLUE's reference skips them
    hub: tuple[str, str | None] | None = None  # (dataset, config) on the Hugging Face hub
    hub_text_columns: tuple[str, ...] = ()
    hub_dev_splits: dict[str, str] = field(default_factory=lambda: {"dev": "validation"})
    # Answers are spans of a context (SQuAD): a question-answering head, windows of the context, EM/F1.
    extractive_qa: bool = False
    # Tokens per input (a window, for extractive QA) when --max-seq-length is not given.
    max_length: int = DEFAULT_LENGTH

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


BINARY = ("0", "1")
NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            "cola",
            (3,),
            1,
            BINARY,
            ("mcc", "accuracy"),
            header=False,
            hub=("glue", "cola"),
            hub_text_columns=("sentence",),
        ),
        TaskSpec(
            "sst2",
            ("sentence",),
            "label",
            BINARY,
            ("accuracy",),
            hub=("glue", "sst2"),
            hub_text_columns=("sentence",),
        ),
        TaskSpec(
            "mrpc",
            ("#1 String", "#2 String"),
            "Quality",
            BINARY,
            ("accuracy", "f1"),
            hub=("glue", "mrpc"),
            hub_text_columns=("sentence1", "sentence2"),
        ),
        TaskSpec(
            "stsb",
            ("sentence1", "sentence2"),
            "score",
            None,
            ("pearson", "spearman"),
            hub=("glue", "stsb"),
            hub_text_columns=("sentence1", "sentence2"),
        ),
        TaskSpec(
            "qqp",
            ("question1", "question2"),
            "is_duplicate",
            BINARY,
            ("accuracy", "f1"),
            skip_malformed=True,
            hub=("glue", "qqp"),
            hub_text_columns=("question1", "question2"),
        ),
        TaskSpec(
            "mnli",
            ("sentence1", "sentence2"),
            "gold_label",
            ("contradiction", "entailment", "neutral"),
            ("accuracy",),
            dev_files={"dev": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"},
            hub=("glue", "mnli"),
            hub_text_columns=("premise", "hypothesis"),
            hub_dev_splits={"dev": "validation_matched", "dev_mismatched": "validation_mismatched"},
        ),
        TaskSpec(
            "qnli",
            ("question", "sentence"),
            "label",
            NLI2,
            ("accuracy",),
            hub=("glue", "qnli"),
            hub_text_columns=("question", "sentence"),
        ),
        TaskSpec(
            "rte",
            ("sentence1", "sentence2"),
            "label",
            NLI2,
            ("accuracy",),
            hub=("glue", "rte"),
            hub_text_columns=("sentence1", "sentence2"),
        ),
        TaskSpec(
            "wnli",
            ("sentence1", "sentence2"),
            "label",
            BINARY,
            ("accuracy",),
            hub=("glue", "wnli"),
            hub_text_columns=("sentence1", "sentence2"),
        ),
        # The embedded default: binary sentiment of real movie-review snippets (see sparsebert.packaged).
        TaskSpec("movie-sentiment", ("sentence",), "label", BINARY, ("accuracy", "f1")),
        # The same snippets as regression on their mean human rating (-4 .. 4).
        TaskSpec("movie-rating", ("sentence",), "label", None, ("pearson", "spearman")),
        # SQuAD v1.1 in its official JSON; 384-token windows are the length BERT's SQuAD results use.
        TaskSpec(
            "squad",
            (),
            "answers",
            (),
            ("exact_match", "f1"),
            train_file="train-v1.1.json",
            dev_files={"dev": "dev-v1.1.json"},
            hub=("squad", None),
            extractive_qa=True,
            max_length=384,
        ),
    ]
}

# Folder spellings of the GLUE distribution and other common names.
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "sts": "stsb", "mnli-m": "mnli", "mnli-matched": "mnli"}

# For the user's own files: labels are read from the training file.
GENERIC = {
    "classification": TaskSpec("classification", ("text",), "label", (), ("accuracy", "f1")),
    "regression": TaskSpec("regression", ("text",), "label", None, ("pearson", "spearman")),
}


def get_task(name: str) -> TaskSpec:
    """Look a task up by name, case- and folder-spelling-insensitive (``SST-2`` is ``sst2``)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in TASKS:
        return TASKS[key]
    if key in GENERIC:
        return GENERIC[key]
    known = ", ".join([*TASKS, *GENERIC])
    raise SparseBertError(f"unknown task {name!r}; known tasks: {known}")


def task_length(name: str | None) -> int | None:
    """The task's default number of tokens per input, or None for no task or an unknown one (that error is
    ``get_task``'s, raised where the data is loaded)."""
    try:
        return get_task(name).max_length if name else None
    except SparseBertError:
        return None
