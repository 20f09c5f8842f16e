"""Load a model and its tokenizer for a task, the way transformers users expect.

Names are resolved by ``sources`` (an embedded alias, a local folder or a hub id); a folder in the
compressed format (``export``) is accepted wherever an ordinary one is.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from sparsebert.errors import SparseBertError
from sparsebert.export import is_compressed, load  # the compressed format is accepted everywhere
from sparsebert.sources import read_pretrained, resolve_model
from sparsebert.tasks import TaskSpec


def load_tokenizer(name: str | os.PathLike) -> PreTrainedTokenizerBase:
    return read_pretrained(AutoTokenizer.from_pretrained, resolve_model(name))


def load_model(name: str | os.PathLike, task: TaskSpec) -> nn.Module:
    """A sequence-classification model for ``task``; a fresh head when the weights have none.

    Label names are written into the config so the saved model is self-describing.
    """
    resolved = resolve_model(name)
    if is_compressed(Path(resolved)):
        model = load(resolved)
        _check_head(name, [type(model).__name__], model.config.num_labels, task)
        return model
    config = read_pretrained(AutoConfig.from_pretrained, resolved)
    kwargs: dict = {"num_labels": task.num_labels}
    if task.is_regression:
        kwargs["problem_type"] = "regression"
    else:
        kwargs["id2label"] = dict(enumerate(task.labels))
        kwargs["label2id"] = {label: i for i, label in enumerate(task.labels)}
        kwargs["problem_type"] = "single_label_classification"
    _check_head(name, config.architectures, getattr(config, "num_labels", None), task)
    return read_pretrained(AutoModelForSequenceClassification.from_pretrained, resolved, **kwargs)


def _check_head(name: str | os.PathLike, architectures: list[str] | None, num_labels: int | None, task: TaskSpec):
    """A saved task head must have the task's number of outputs (a model without a head gets a fresh one)."""
    has_head = architectures and any("SequenceClassification" in a for a in architectures)
    if has_head and num_labels not in (None, task.num_labels):
        raise SparseBertError(
            f"model {name} has a head for {num_labels} labels but task {task.name} has {task.num_labels}"
        )
