"""Task data: read it (GLUE folders, the user's files, or the hub), check it, tokenise it.

Every problem with the user's files becomes a one-line ``SparseBertError`` naming the file and line.
Examples are tokenised once without padding; ``DataCollatorWithPadding`` pads each batch to its own
longest sequence (dynamic padding), which is what makes short-sentence tasks cheap on a CPU.
Extractive QA (SQuAD) reads its own JSON and cuts contexts into windows (``sparsebert.qa``); each dev split
comes with the scorer that turns the model's outputs into the task's metrics (``sparsebert.scoring``).
"""

from __future__ import annotations

import csv
import io
import json
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from sparsebert.errors import SparseBertError
from sparsebert.packaged import PACKAGED_TASKS, packaged_task_dir
from sparsebert.qa import QAExample, model_inputs, prepare_eval_features, prepare_train_features, read_squad
from sparsebert.scoring import EvalSplit, LabelScorer, SpanScorer
from sparsebert.tasks import TaskSpec, get_task

if TYPE_CHECKING:
    from sparsebert.config import DataOptions, TrainingOptions

csv.field_size_limit(sys.maxsize)


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]
    label: int | float


@dataclass
class TaskData:
    """A task's resolved spec (labels known) with its train and dev splits."""

    task: TaskSpec
    train: list[Example] | list[QAExample]  # QAExample for extractive QA (SQuAD)
    dev: dict[str, list[Example] | list[QAExample]]  # "dev" first; MNLI adds "dev_mismatched"
    source: str


@dataclass(frozen=True)
class DataSource:
    """Where the data comes from: exactly one of a GLUE folder, the hub, or the user's own files."""

    data_dir: str | None = None
    dataset: str | None = None
    train_file: str | None = None
    dev_file: str | None = None
    text_columns: tuple[str, ...] | None = None
    label_column: str | None = None

    def describe(self) -> str:
        if self.data_dir:
            return f"folder {self.data_dir}"
        if self.dataset:
            return f"hub dataset {self.dataset}"
        return f"files {self.train_file}, {self.dev_file}"


# -- raw readers -----------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """A file's text (UTF-8, an optional byte-order mark); bad bytes name their line and offset."""
    if not path.is_file():
        raise SparseBertError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SparseBertError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def _read_rows(path: Path, delimiter: str, quoting: int) -> list[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter, quoting=quoting)
    return [(reader.line_num, row) for row in reader if row]


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    for line_no, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SparseBertError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise SparseBertError(f"{path}:{line_no}: expected a JSON object per line")
        rows.append((line_no, obj))
    return rows


def read_labelled_file(
    path: Path,
    text_columns: tuple[str | int, ...],
    label_column: str | int | None,
    *,
    header: bool = True,
    glue_format: bool = False,
    skip_malformed: bool = False,
) -> list[tuple[int, tuple[str, ...], str | None]]:
    """Return (line number, texts, raw label) rows. Columns are names (with a header) or positions.

    ``label_column=None`` reads inputs without labels (``sparsebert predict``): the raw label is None.
    ``glue_format`` reads tab-separated files with no quoting, as GLUE's files need (their sentences
    contain unbalanced quotes).
    """
    columns = (*text_columns, label_column) if label_column is not None else tuple(text_columns)
    n_texts = len(text_columns)
    if path.suffix in (".jsonl", ".json"):
        out = []
        for line_no, obj in _read_jsonl(path):
            missing = [c for c in columns if c not in obj]
            if missing:
                raise SparseBertError(f"{path}:{line_no}: missing field(s) {', '.join(map(str, missing))}")
            values = [str(obj[c]) for c in columns]
            out.append((line_no, tuple(values[:n_texts]), values[n_texts] if label_column is not None else None))
        return out

    delimiter = "\t" if glue_format or path.suffix == ".tsv" else ","
    quoting = csv.QUOTE_NONE if glue_format else csv.QUOTE_MINIMAL
    rows = _read_rows(path, delimiter, quoting)
    positions = list(columns)
    if header:
        if not rows:
            raise SparseBertError(f"{path}: empty file (expected a header line)")
        names = [n.strip() for n in rows[0][1]]
        missing = [c for c in columns if not isinstance(c, int) and c not in names]
        if missing:
            raise SparseBertError(f"{path}: no column {missing[0]!r} in header ({', '.join(names)})")
        positions = [c if isinstance(c, int) else names.index(c) for c in columns]
        rows = rows[1:]
    need = max(positions) + 1
    out = []
    for line_no, row in rows:
        if len(row) < need:
            if skip_malformed:
                continue
            raise SparseBertError(f"{path}:{line_no}: expected at least {need} columns, found {len(row)}")
        values = [row[p] for p in positions]
        out.append((line_no, tuple(values[:n_texts]), values[n_texts].strip() if label_column is not None else None))
    return out


# -- labels ----------------------------------------------------------------------------------------


def _to_label(task: TaskSpec, raw: str, where: str) -> int | float:
    if task.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise SparseBertError(f"{where}: label {raw!r} is not a number (task {task.name} is regression)") from None
    label_ids = {label: i for i, label in enumerate(task.labels)}
    if raw not in label_ids:
        # Accept 1.0 for "1" and similar numeric spellings.
        try:
            as_int = str(int(float(raw)))
        except ValueError:
            as_int = None
        if as_int not in label_ids:
            raise SparseBertError(
                f"{where}: unknown label {raw!r} for task {task.name} (expected one of {', '.join(task.labels)})"
            )
        raw = as_int
    return label_ids[raw]


def _examples(task: TaskSpec, path: Path, rows: list[tuple[int, tuple[str, ...], str]]) -> list[Example]:
    if not rows:
        raise SparseBertError(f"{path}: no examples")
    return [Example(texts, _to_label(task, raw, f"{path}:{line_no}")) for line_no, texts, raw in rows]


# -- sources ---------------------------------------------------------------------------------------


def _from_glue_dir(task: TaskSpec, data_dir: Path, need_train: bool) -> tuple[list[Example], dict]:
    if not data_dir.is_dir():
        raise SparseBertError(f"{data_dir}: data directory not found")
    read = lambda name: _examples(  # noqa: E731
        task,
        data_dir / name,
        read_labelled_file(
            data_dir / name,
            task.text_columns,
            task.label_column,
            header=task.header,
            glue_format=True,
            skip_malformed=task.skip_malformed,
        ),
    )
    train = read(task.train_file) if need_train else []
    dev = {split: read(name) for split, name in task.dev_files.items()}
    return train, dev


def _from_files(task: TaskSpec, source: DataSource, need_train: bool) -> tuple[TaskSpec, list[Example], dict]:
    text_columns = source.text_columns or tuple(c for c in task.text_columns if isinstance(c, str))
    label_column = source.label_column or task.label_column
    if not text_columns:
        raise SparseBertError("--text-columns is required with --train-file/--dev-file for this task")
    read = lambda p: read_labelled_file(Path(p), text_columns, label_column)  # noqa: E731
    train_rows = read(source.train_file) if need_train and source.train_file else []
    dev_rows = read(source.dev_file)
    if task.labels == ():  # generic classification: the labels are those of the training file
        if not train_rows:
            raise SparseBertError("--task classification needs --train-file to learn the label set")
        task = replace(task, labels=tuple(sorted({raw for _, _, raw in train_rows})))
    train = _examples(task, Path(source.train_file), train_rows) if train_rows else []
    return task, train, {"dev": _examples(task, Path(source.dev_file), dev_rows)}


def _from_hub(task: TaskSpec, dataset: str, need_train: bool) -> tuple[list[Example], dict]:
    """Load ``dataset`` (e.g. "glue") with 🤗 datasets; labels come back as ids in the hub's order."""
    if task.hub is None:
        raise SparseBertError(f"task {task.name} is not on the hub; use --data-dir or --train-file")
    from datasets import load_dataset

    try:
        ds = load_dataset(dataset, task.hub[1])
    except Exception as exc:  # the hub raises many types; the user needs the message, not a traceback
        raise SparseBertError(f"could not load {dataset}/{task.hub[1]} from the hub: {exc}") from None

    def convert(split: str) -> list[Example]:
        part = ds[split]
        names = getattr(part.features["label"], "names", None)
        out = []
        for row in part:
            label = row["label"]
            if label == -1:  # unlabelled test rows
                continue
            if task.is_regression:
                value: int | float = float(label)
            else:
                name = names[label] if names and names[label] in task.labels else str(label)
                value = task.labels.index(name)
            out.append(Example(tuple(row[c] for c in task.hub_text_columns), value))
        if not out:
            raise SparseBertError(f"hub split {dataset}/{task.hub[1]}:{split} has no labelled examples")
        return out

    train = convert("train") if need_train else []
    return train, {name: convert(split) for name, split in task.hub_dev_splits.items()}


def _squad_from_hub(dataset: str, splits: dict[str, str], need_train: bool) -> tuple[list, dict]:
    """SQuAD from the hub (``squad``: splits train and validation), as ``QAExample``s."""
    from datasets import load_dataset

    try:
        ds = load_dataset(dataset)
    except Exception as exc:  # the hub raises many types; the user needs the message, not a traceback
        raise SparseBertError(f"could not load {dataset} from the hub: {exc}") from None

    def convert(split: str) -> list[QAExample]:
        return [
            QAExample(row["id"], row["question"], row["context"],
                      list(zip(row["answers"]["text"], row["answers"]["answer_start"], strict=True)))
            for row in ds[split]
        ]  # fmt: skip

    return (convert("train") if need_train else []), {name: convert(split) for name, split in splits.items()}


def _squad_splits(task: TaskSpec, source: DataSource, need_train: bool) -> tuple[list, dict]:
    """SQuAD v1.1 (official JSON) from a folder (``train-v1.1.json``, ``dev-v1.1.json``), the user's files or
    the hub. Every dev question needs its answers: they are what the dev split is scored against, and a file
    without them should fail now, not after the training."""
    if source.dataset:
        return _squad_from_hub(source.dataset, task.hub_dev_splits, need_train)
    if source.data_dir:
        folder = Path(source.data_dir)
        if not folder.is_dir():
            raise SparseBertError(f"{folder}: data directory not found")
        train_path, dev_paths = folder / task.train_file, {s: folder / name for s, name in task.dev_files.items()}
    else:
        if not source.dev_file or (need_train and not source.train_file):
            raise SparseBertError("--train-file and --dev-file go together (evaluate needs --dev-file only)")
        train_path, dev_paths = Path(source.train_file or ""), {"dev": Path(source.dev_file)}
    train = read_squad(train_path, require_answers=True) if need_train else []
    dev = {split: read_squad(path, require_answers=False) for split, path in dev_paths.items()}
    for split, examples in dev.items():
        unanswered = next((e for e in examples if not e.answers), None)
        if unanswered is not None:
            raise SparseBertError(
                f"{dev_paths[split]}: question {unanswered.id} has no answers; a dev file needs them to be scored"
            )
    return train, dev


def load_task_data(
    task: TaskSpec,
    source: DataSource,
    *,
    need_train: bool = True,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
) -> TaskData:
    """Read a task's splits from exactly one source. The embedded task needs no source."""
    chosen = [bool(source.data_dir), bool(source.dataset), bool(source.train_file or source.dev_file)]
    if sum(chosen) > 1:
        raise SparseBertError("give only one data source: --data-dir, --dataset, or --train-file/--dev-file")
    if not any(chosen):
        if task.name not in PACKAGED_TASKS:
            raise SparseBertError(f"task {task.name} needs data: --data-dir, --dataset or --train-file/--dev-file")
        source = replace(source, data_dir=str(packaged_task_dir(task.name)))
    if task.extractive_qa:
        train, dev = _squad_splits(task, source, need_train)
    elif source.data_dir:
        train, dev = _from_glue_dir(task, Path(source.data_dir), need_train)
    elif source.dataset:
        train, dev = _from_hub(task, source.dataset, need_train)
    else:
        if not source.dev_file or (need_train and not source.train_file):
            raise SparseBertError("--train-file and --dev-file go together (evaluate needs --dev-file only)")
        task, train, dev = _from_files(task, source, need_train)
    if max_train_examples:
        train = subsample(train, max_train_examples)
    if max_eval_examples:
        dev = {k: subsample(v, max_eval_examples) for k, v in dev.items()}
    return TaskData(task, train, dev, source.describe())


def subsample(examples: list, n: int, seed: int = 0) -> list:
    """A fixed random sample of ``n`` examples, in file order (files are often sorted by label)."""
    if n >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


# -- tokenisation ----------------------------------------------------------------------------------


def encode(examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[dict]:
    """Tokenise (pairs where the task has two texts), truncating to ``max_length``; no padding yet."""
    columns = list(zip(*(e.texts for e in examples), strict=True))
    enc = tokenizer(*columns[:2], truncation=True, max_length=max_length)
    features = []
    for i, e in enumerate(examples):
        item = {k: v[i] for k, v in enc.items()}
        item["labels"] = e.label
        features.append(item)
    return features


class LengthGroupedSampler(Sampler[int]):
    """Training order in which each batch holds examples of similar length (less padding).

    The HF Trainer's ``group_by_length`` convention: shuffle, cut into mega-batches of up to 50
    batches, sort each mega-batch by length, cut it into batches; then the batches are shuffled too,
    so lengths do not drift in waves through the epoch. The order depends only on ``seed`` and the
    epoch (``set_epoch``), never on a global random state: a resumed run and every process of a
    multi-process run see the same batches. An incomplete batch comes last (``drop_last`` drops it).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.mega = batch_size * max(1, min(len(lengths) // (batch_size * 4), 50))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        full, partial = [], []
        for start in range(0, len(order), self.mega):
            mega = sorted(order[start : start + self.mega], key=self.lengths.__getitem__, reverse=True)
            for i in range(0, len(mega), self.batch_size):
                batch = mega[i : i + self.batch_size]
                (full if len(batch) == self.batch_size else partial).append(batch)
        for i in torch.randperm(len(full), generator=generator).tolist():
            yield from full[i]
        for batch in partial:
            yield from batch


def make_loader(
    features: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool = False,
    group_by_length: bool = False,
    seed: int = 0,
) -> DataLoader:
    """Dynamically padded batches; shuffled training batches are length-grouped if asked.

    Every loader gets its own generator: without one, every new iterator (each epoch, each dev
    evaluation, the one a resumed run starts mid-epoch) draws a seed from the global generator and
    shifts the dropout masks, so a resumed run would no longer match an uninterrupted one.
    """
    collator = DataCollatorWithPadding(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    if not shuffle:  # its own generator too: a dev evaluation must not shift the training's random state
        return DataLoader(
            features, batch_size=batch_size, collate_fn=collator, drop_last=drop_last, generator=generator
        )
    sampler = (
        LengthGroupedSampler([len(f["input_ids"]) for f in features], batch_size, seed) if group_by_length else None
    )
    return DataLoader(
        features,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        collate_fn=collator,
        drop_last=drop_last,
        generator=generator,
    )


def load_data(options: DataOptions, training: TrainingOptions | None = None) -> TaskData:
    """A job's task data from its data options (``--task``, ``--data-dir`` / ``--dataset`` / files) and, for
    a training job, its training options (``--train-file``, ``--max-train-examples``).

    A training job whose ``max_seq_length`` is still unresolved (its task was set after the configuration
    was built) gets the task's length here, before config.yaml is written; evaluate keeps None (the length
    the model was trained at, ``models.inference_length``).
    """
    source = DataSource(
        data_dir=options.data_dir,
        dataset=options.dataset,
        train_file=training.train_file if training else None,
        dev_file=options.dev_file,
        text_columns=tuple(options.text_columns) if options.text_columns else None,
        label_column=options.label_column,
    )
    task = get_task(options.task)
    if training is not None and options.max_seq_length is None:
        options.max_seq_length = task.max_length
    return load_task_data(
        task,
        source,
        need_train=training is not None,
        max_train_examples=training.max_train_examples if training else None,
        max_eval_examples=options.max_eval_examples,
    )


def eval_loaders(data: TaskData, tokenizer: PreTrainedTokenizerBase, options: DataOptions) -> dict[str, EvalSplit]:
    """Each dev split's batches with its scorer. Classification: in order of length (least padding; the
    metrics do not depend on the order). Extractive QA: the windows in order, since post-processing ties
    each row of logits to its window, and the model sees them without the post-processing keys."""
    splits = {}
    length = options.max_seq_length
    for split, examples in data.dev.items():
        if data.task.extractive_qa:
            features = prepare_eval_features(examples, tokenizer, length, options.doc_stride)
            inputs, scorer = model_inputs(features), SpanScorer(examples, features, options.max_answer_length)
        else:
            inputs = sorted(encode(examples, tokenizer, length), key=lambda f: len(f["input_ids"]))
            scorer = LabelScorer(data.task)
        splits[split] = EvalSplit(make_loader(inputs, tokenizer, options.eval_batch_size, shuffle=False), scorer)
    return splits


def train_loader(
    data: TaskData, tokenizer: PreTrainedTokenizerBase, options: DataOptions, training: TrainingOptions
) -> DataLoader:
    """Shuffled (by default length-grouped) training batches; the incomplete last batch is skipped,
    as in the reference. Extractive QA trains on windows, each labelled with its answer's token span."""
    if data.task.extractive_qa:
        features = prepare_train_features(data.train, tokenizer, options.max_seq_length, options.doc_stride)
    else:
        features = encode(data.train, tokenizer, options.max_seq_length)
    return make_loader(features, tokenizer, training.batch_size, shuffle=True, drop_last=True,
                       group_by_length=training.group_by_length, seed=training.seed)  # fmt: skip
