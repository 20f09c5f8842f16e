"""How a dev split is scored: what an evaluation keeps of each batch, and how that becomes the task's metrics.

``train.evaluate`` is the same loop for every task (forward each batch, hand the outputs to the split's scorer,
score at the end); what differs per task lives here, one scorer per kind of head, built with the split's
loader by ``data.eval_loaders``:

* ``LabelScorer`` (classification, regression): the logits and the labels of every example, then the task's
  GLUE metrics.
* ``SpanScorer`` (extractive QA): the start and end logits of every window, then ``qa.postprocess`` (the best
  span of each question over its windows) and ``qa.squad_metrics``. Post-processing needs the windows in the
  loader's order, so its loader is never sorted; the last evaluation's answers are kept for
  ``predictions.json``.

Under ``accelerate launch`` every process gathers the same outputs, so every process scores the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from sparsebert.metrics import compute_metrics, predictions_from_logits
from sparsebert.qa import QAExample, postprocess, squad_metrics
from sparsebert.tasks import TaskSpec


class Accelerator(Protocol):
    """What a scorer uses of 🤗 Accelerate's ``Accelerator`` (a protocol: predict and the runtime import this
    module, and must not import accelerate)."""

    def pad_across_processes(self, tensor: torch.Tensor, dim: int = 0, pad_index: int = 0) -> torch.Tensor: ...

    def gather_for_metrics(self, data: Any) -> Any: ...


class Scorer(Protocol):
    """What ``train.evaluate`` asks of a split's scorer."""

    def collect(self, batch: dict, outputs: Any, accelerator: Accelerator) -> Any:
        """What is kept of one batch's model outputs, gathered from every process (called on every process)."""

    def score(self, collected: list) -> dict[str, float]:
        """The split's metrics from every batch's ``collect``, in loader order."""

    def predictions(self) -> dict | None:
        """The last evaluation's predictions as a JSON object for a file, or None if the task writes none."""


@dataclass
class LabelScorer:
    """Classification and regression: argmax (or the scalar) of the logits against the labels."""

    task: TaskSpec

    def collect(self, batch: dict, outputs: Any, accelerator: Accelerator) -> tuple[np.ndarray, np.ndarray]:
        logits, labels = accelerator.gather_for_metrics((outputs.logits.float(), batch["labels"]))
        return logits.cpu().numpy(), labels.cpu().numpy()

    def score(self, collected: list) -> dict[str, float]:
        logits = np.concatenate([logits for logits, _ in collected])
        labels = np.concatenate([labels for _, labels in collected])
        return compute_metrics(self.task, predictions_from_logits(self.task, logits), labels)

    def predictions(self) -> None:
        return None


@dataclass
class SpanScorer:
    """Extractive QA: the best answer of each question over its windows, scored by the official SQuAD rules.

    ``features`` are ``qa.prepare_eval_features(examples, ...)`` in the loader's order (one per window).
    """

    examples: Sequence[QAExample]
    features: Sequence[dict]
    max_answer_length: int
    answers: dict[str, str] | None = None  # {question id: answer text} of the last evaluation

    def collect(self, batch: dict, outputs: Any, accelerator: Accelerator) -> np.ndarray:
        """(windows, 2, tokens) start and end logits; batches differ in width on each process (dynamic padding),
        so they are padded to a common width before the gather (post-processing ignores the padding)."""
        logits = torch.stack((outputs.start_logits, outputs.end_logits), dim=1).float()
        logits = accelerator.gather_for_metrics(accelerator.pad_across_processes(logits, dim=2))
        return logits.cpu().numpy()

    def score(self, collected: list) -> dict[str, float]:
        rows = [row for logits in collected for row in logits]  # one (2, width) array per window
        found = postprocess(
            self.examples,
            self.features,
            [row[0] for row in rows],
            [row[1] for row in rows],
            max_answer_length=self.max_answer_length,
        )
        self.answers = {qid: prediction.text for qid, prediction in found.items()}
        return squad_metrics(self.answers, self.examples)

    def predictions(self) -> dict[str, str] | None:
        return self.answers


@dataclass
class EvalSplit:
    """A dev split as the loop evaluates it: its batches and its scorer."""

    loader: DataLoader
    scorer: Scorer


def prediction_files(splits: dict[str, EvalSplit]) -> dict[str, dict]:
    """The files the last evaluation's predictions go to in a run folder: ``predictions.json`` for the
    ``dev`` split (SQuAD's official prediction format for QA), ``predictions_<split>.json`` for others."""
    files = {}
    for split, evaluated in splits.items():
        predictions = evaluated.scorer.predictions()
        if predictions is not None:
            name = "predictions.json" if split == "dev" else f"predictions_{split.removeprefix('dev_')}.json"
            files[name] = predictions
    return files
