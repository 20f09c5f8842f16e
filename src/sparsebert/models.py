"""Load a model and its tokenizer for a task, the way transformers users expect.

Names are resolved by ``sources`` (an embedded alias, a local folder or a hub id); a folder in the
compressed format (``export``) is accepted wherever an ordinary one is.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from sparsebert.errors import SparseBertError
from sparsebert.export import is_compressed, load  # the compressed format is accepted everywhere
from sparsebert.sources import read_pretrained, resolve_model
from sparsebert.tasks import DEFAULT_LENGTH, DOC_STRIDE, TaskSpec


def load_tokenizer(name: str | os.PathLike) -> PreTrainedTokenizerBase:
    return read_pretrained(AutoTokenizer.from_pretrained, resolve_model(name))


def load_model(name: str | os.PathLike, task: TaskSpec) -> nn.Module:
    """A sequence-classification model for ``task`` (a question-answering one for extractive QA); a fresh
    head when the weights have none.

    Label names are written into the config so the saved model is self-describing.
    """
    resolved = resolve_model(name)
    if is_compressed(Path(resolved)):
        model = load(resolved)
        check_head(name, [type(model).__name__], model.config, task)
        return model
    config = read_pretrained(AutoConfig.from_pretrained, resolved)
    check_head(name, config.architectures, config, task)
    if task.extractive_qa:  # one start and one end logit per token
        return read_pretrained(AutoModelForQuestionAnswering.from_pretrained, resolved, num_labels=2)
    kwargs: dict = {"num_labels": task.num_labels}
    if task.is_regression:
        kwargs["problem_type"] = "regression"
    else:
        kwargs["id2label"] = dict(enumerate(task.labels))
        kwargs["label2id"] = {label: i for i, label in enumerate(task.labels)}
        kwargs["problem_type"] = "single_label_classification"
    return read_pretrained(AutoModelForSequenceClassification.from_pretrained, resolved, **kwargs)


HEADS = {"SequenceClassification": "a sequence-classification head", "QuestionAnswering": "a question-answering head"}


def head_kind(architectures: list[str] | None) -> str | None:
    """Which task head (a key of ``HEADS``) the saved architectures name; None for a bare encoder or another head
    (a masked-LM checkpoint), which loads with a fresh head of the task's kind."""
    for kind in HEADS:
        if architectures and any(kind in a for a in architectures):
            return kind
    return None


def check_head(name: str | os.PathLike, architectures: list[str] | None, config, task: TaskSpec) -> None:
    """A saved task head must be the task's: the same kind (question answering, regression or classes), as many
    outputs, and its labels not in another order.

    Loading overwrites the saved label names with the task's, so a head that names the task's labels in
    another order (a hub MNLI model's contradiction/neutral/entailment) would be scored and saved under
    wrong names. Names that are not the task's (``LABEL_0``, ``POSITIVE`` for SST-2's ``1``) cannot be
    checked and pass.
    """
    saved = head_kind(architectures)
    wanted = "QuestionAnswering" if task.extractive_qa else "SequenceClassification"
    if saved is not None and saved != wanted:
        raise SparseBertError(
            f"model {name} has {HEADS[saved]} but task {task.name} needs {HEADS[wanted]}; "
            "use a model fine-tuned for the task, or a pre-trained one"
        )
    if saved != "SequenceClassification":
        return  # no head (a fresh one is made), or a question-answering head for extractive QA
    _check_classes(name, config, task)


def _check_classes(name: str | os.PathLike, config, task: TaskSpec) -> None:
    """A saved classification or regression head against the task's kind, label count and label order."""
    regression = getattr(config, "problem_type", None) == "regression"
    if regression != task.is_regression and getattr(config, "problem_type", None) is not None:
        kinds = ("a classification", "a regression")
        raise SparseBertError(
            f"model {name} has {kinds[regression]} head but task {task.name} is {kinds[task.is_regression]} task; "
            "use a model fine-tuned for the task"
        )
    num_labels = getattr(config, "num_labels", None)
    if num_labels not in (None, task.num_labels):
        raise SparseBertError(
            f"model {name} has a head for {num_labels} labels but task {task.name} has {task.num_labels}"
        )
    if task.is_regression or not getattr(config, "id2label", None):
        return
    saved = [str(config.id2label[i]).lower() for i in sorted(config.id2label)]
    if sorted(saved) != sorted(t.lower() for t in task.labels) or saved == [t.lower() for t in task.labels]:
        return
    raise SparseBertError(
        f"model {name} has a head for the labels {', '.join(saved)} (in this order) but task {task.name} has "
        f"{', '.join(map(str, task.labels))}; fine-tune a head for the task instead"
    )


def inference_length(
    given: int | None, tokenizer: PreTrainedTokenizerBase, model: nn.Module, default: int = DEFAULT_LENGTH
) -> int:
    """Tokens to truncate to at inference: ``given``, else the length the model was trained at.

    sparsebert saves that length as the tokenizer's ``model_max_length`` (so it travels with the model,
    exported folders included); other tokenizers carry their architecture's limit or a huge sentinel,
    bounded here by the model's positions and, for the sentinel, by ``default`` (the task's length). An
    extractive QA model that sparsebert did not train gets ``default`` too (SQuAD's 384-token windows).
    """
    if given is not None:
        return given
    saved = tokenizer.model_max_length if tokenizer.model_max_length < 100_000 else default
    if _span_model_from_elsewhere(model):  # its tokenizer's 512 is the architecture's limit, not its windows
        saved = default
    positions = getattr(model.config, "max_position_embeddings", None) or saved
    return min(saved, positions)


def _span_model_from_elsewhere(model: nn.Module) -> bool:
    config = model.config
    span = head_kind(getattr(config, "architectures", None)) == "QuestionAnswering"
    return span and getattr(config, "sparsebert_doc_stride", None) is None


def inference_stride(given: int | None, model: nn.Module, length: int) -> int:
    """Extractive QA's window overlap at inference: ``given``, else the one the model was trained with
    (``sparsebert_doc_stride``, saved with it), else BERT's 128 at 384 tokens, a third of shorter windows."""
    if given is not None:
        return given
    return getattr(model.config, "sparsebert_doc_stride", None) or min(DOC_STRIDE, length // 3)


def fast_attention(model: nn.Module, precision: str, device: torch.device | str) -> nn.Module:
    """Eager attention (bmm, softmax, bmm) for bf16 on a CPU; elsewhere the model keeps its own.

    Torch's fused CPU attention (SDPA) is 2.5-3x slower in bf16 than in fp32: forward and backward of one
    MiniLM layer's attention, batch 32, length 53, took ~29 ms in bf16, 9-12 in fp32 and ~6 eager in bf16
    (`bench/attention_cost.py`; torch 2.13, AMD EPYC with AVX512-BF16), a fifth of a bf16 prune-while-distill
    step (BENCHMARKS.md, "Training cost"). The choice is not saved with the model (HF keeps it out of config.json).
    """
    if precision == "bf16" and torch.device(device).type == "cpu" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    return model
