"""Resolve a model name to weights and load it for a task, the way transformers users expect.

A name is an alias of an embedded model (``minilm-l6``, ``minilm-l3``), a local folder, or a hub id. A path-looking
name that does not exist is an error here: passed on, transformers would try it as a hub id and fail
offline with a confusing message.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from sparsebert.errors import SparseBertError
from sparsebert.packaged import minilm_l3_path, minilm_l6_path
from sparsebert.tasks import TaskSpec

ALIASES = {"minilm-l6": minilm_l6_path, "minilm-l3": minilm_l3_path}


def resolve_model(name: str | os.PathLike) -> str:
    """Return a local folder or a hub id for ``name``."""
    name = str(name)
    if name in ALIASES:
        return str(ALIASES[name]())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SparseBertError(f"{path}: not a model folder (no config.json)")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name:
        raise SparseBertError(f"model path {name} does not exist or is not a folder")
    return name  # a hub id such as "bert-base-uncased" or "google/electra-small-discriminator"


def read_pretrained(fn, name: str, **kwargs):
    """Load through transformers; every failure to read the files becomes a one-line error."""
    try:
        return fn(name, **kwargs)
    except SafetensorError as exc:
        raise SparseBertError(f"could not read the weights of {name} (damaged or truncated file?): {exc}") from None
    except OSError as exc:
        where = "" if Path(name).is_dir() else " (not a local folder; hub said)"
        raise SparseBertError(f"could not load model {name!r}{where}: {exc}") from None


def load_tokenizer(name: str | os.PathLike) -> PreTrainedTokenizerBase:
    return read_pretrained(AutoTokenizer.from_pretrained, resolve_model(name))


def load_model(name: str | os.PathLike, task: TaskSpec) -> nn.Module:
    """A sequence-classification model for ``task``; a fresh head when the weights have none.

    Label names are written into the config so the saved model is self-describing.
    """
    resolved = resolve_model(name)
    from sparsebert.export import is_compressed, load  # the compressed format is accepted everywhere

    if is_compressed(Path(resolved)):
        return load(resolved)
    config = read_pretrained(AutoConfig.from_pretrained, resolved)
    kwargs: dict = {"num_labels": task.num_labels}
    if task.is_regression:
        kwargs["problem_type"] = "regression"
    else:
        kwargs["id2label"] = dict(enumerate(task.labels))
        kwargs["label2id"] = {label: i for i, label in enumerate(task.labels)}
        kwargs["problem_type"] = "single_label_classification"
    has_head = config.architectures and any("SequenceClassification" in a for a in config.architectures)
    if has_head and getattr(config, "num_labels", None) not in (None, task.num_labels):
        raise SparseBertError(
            f"model {name} has a head for {config.num_labels} labels but task {task.name} has {task.num_labels}"
        )
    return read_pretrained(AutoModelForSequenceClassification.from_pretrained, resolved, **kwargs)
