"""TinyBERT-style distillation losses, usable on their own with any pair of HF encoders.

Attention is matched on the *scores before softmax* (as TinyBERT and SparseBERT do). Transformers does
not return those (``output_attentions`` gives probabilities, and forces the slow eager kernel), so
``AttentionScoreRecorder`` hooks the query and key projections that the pruning engine already finds
and keeps ``Q`` and ``K`` (``AttentionScores``: the scores ``Q K^T / sqrt(d_head)`` as their factors).
Padded positions are 0 in both models, which is what TinyBERT's ``where(score <= -1e2, 0, score)`` does
to the additive mask. The loss never builds the seq x seq matrices (``score_mse``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sparsebert.errors import SparseBertError
from sparsebert.layers import find_prunable_linears

if TYPE_CHECKING:
    from sparsebert.data import TaskData


class AttentionScoreRecorder:
    """Records each layer's pre-softmax attention scores during a forward pass.

    Use as ``with AttentionScoreRecorder(model) as rec: out = model(...)`` then ``rec.scores(mask)``.
    """

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        self.num_heads = getattr(config, "num_attention_heads", None) or config.n_heads
        linears = find_prunable_linears(model)
        self._q = [t.module for t in linears if t.role == "query"]
        self._k = [t.module for t in linears if t.role == "key"]
        self._outputs: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> AttentionScoreRecorder:
        self._outputs.clear()
        for module in (*self._q, *self._k):
            self._handles.append(module.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._outputs[id(module)] = output

    def scores(self, attention_mask: torch.Tensor | None) -> list[AttentionScores]:
        """Per layer, the scores as (batch, heads, seq, d_head) factors, padded positions zeroed in both."""
        result = []
        for q_mod, k_mod in zip(self._q, self._k, strict=True):
            # fp32 factors even when the forward ran in bf16: the loss compares small differences
            q, k = self._outputs[id(q_mod)].float(), self._outputs[id(k_mod)].float()
            b, s, width = q.shape
            d = width // self.num_heads
            if attention_mask is not None:
                keep = attention_mask[:, :, None].to(q.dtype)
                q, k = q * keep, k * keep
            q, k = (t.view(b, s, self.num_heads, d).transpose(1, 2) * d**-0.25 for t in (q, k))
            result.append(AttentionScores(q, k))
        return result


@dataclass(frozen=True)
class AttentionScores:
    """One layer's pre-softmax scores ``query @ key^T`` held as the two (batch, heads, seq, d_head) factors,
    each scaled by d_head^-1/4. Why factors: the scores are seq x seq per head (226 MB in fp32 for one layer
    of a SQuAD batch, 32 x 384 tokens, 12 heads), while their distance to the teacher's needs only d x d
    products (``score_mse``)."""

    query: torch.Tensor
    key: torch.Tensor

    def dense(self) -> torch.Tensor:
        """The (batch, heads, seq, seq) scores themselves."""
        return self.query @ self.key.transpose(-1, -2)


def score_mse(student: AttentionScores | torch.Tensor, teacher: AttentionScores | torch.Tensor) -> torch.Tensor:
    """The mean squared difference of two layers' scores, ``F.mse_loss(student, teacher)`` on the dense matrices.

    From factors it builds neither matrix: ||A - B||^2 = <A, A> + <B, B> - 2<A, B>, and for A = Q1 K1^T,
    B = Q2 K2^T, <A, B> = sum((Q1^T Q2) * (K1^T K2)) per batch row and head: d x d products, seq/d times
    fewer multiply-adds than the scores (12x at 384 tokens and 32 per head) and no seq^2 memory. In fp32,
    not under autocast: the expansion loses ~1e-7 of <A, A>, far below what bf16 would lose.
    """
    if not (isinstance(student, AttentionScores) and isinstance(teacher, AttentionScores)):
        dense = [x.dense() if isinstance(x, AttentionScores) else x for x in (student, teacher)]
        return F.mse_loss(dense[0].float(), dense[1].float())
    with torch.autocast(student.query.device.type, enabled=False):

        def inner(a: AttentionScores, b: AttentionScores) -> torch.Tensor:
            return ((a.query.mT @ b.query) * (a.key.mT @ b.key)).sum()

        total = inner(student, student) + inner(teacher, teacher) - 2 * inner(student, teacher)
    batch, heads, seq, _ = student.query.shape
    return total.clamp_min(0) / (batch * heads * seq * seq)


@dataclass
class LossWeights:
    """Weights of the three terms; SparseBERT adds them with equal weights."""

    attention: float = 1.0
    hidden: float = 1.0
    prediction: float = 1.0

    @classmethod
    def parse(cls, text: str | list | tuple | dict | LossWeights | None) -> LossWeights:
        """Accept ``"1,1,1"``, ``[1, 1, 1]`` (attention, hidden, prediction) or ``{"hidden": 0, ...}`` (the
        terms not named keep 1); every weight a finite number >= 0. The option (``--loss-weights``) is checked
        with this same rule when the configuration is built."""
        if text is None or isinstance(text, LossWeights):
            return text or cls()
        try:
            if isinstance(text, dict):
                weights = cls(**{str(k): float(v) for k, v in text.items()})
            else:
                parts = text.split(",") if isinstance(text, str) else list(text)
                weights = cls(*(float(p) for p in parts)) if len(parts) == 3 else None
        except (TypeError, ValueError):
            weights = None
        values = [weights.attention, weights.hidden, weights.prediction] if weights else []
        if not values or not all(math.isfinite(v) and v >= 0 for v in values):
            raise SparseBertError(
                f"--loss-weights must be three numbers >= 0 (attention,hidden,prediction), got {text!r}"
            )
        return weights


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Uniform mapping for any pair of depths: student layer i (0-based) learns from teacher layer
    ceil((i + 1) * t / s) - 1, so the last layers always meet ((i+1)*k - 1 when t = k * s).

    Dense students are cut from the teacher's layers by the same map (``students``), so each keeps
    the layer it is distilled from.
    """
    if not 1 <= student_layers <= teacher_layers:
        raise SparseBertError(f"a student of {student_layers} layers cannot map onto a teacher of {teacher_layers}")
    return [((i + 1) * teacher_layers + student_layers - 1) // student_layers - 1 for i in range(student_layers)]


def attention_comparable(student_config, teacher_config) -> bool:
    """Attention scores are distilled head to head, so the head counts must be equal (a narrowed dense
    student has fewer heads: its attention term is dropped by ``api``, refused by ``DistillationLoss``)."""
    return student_config.num_attention_heads == teacher_config.num_attention_heads


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy to the teacher's softened distribution, averaged over batch x classes (reference).

    Scaled by temperature² (Hinton et al.): softening shrinks the gradients by 1/T², so without it a
    higher temperature would also quietly lower the prediction term's weight. At T = 1 (the default,
    TinyBERT's) this is the reference's loss exactly.
    """
    targets = F.softmax(teacher_logits / temperature, dim=-1)
    return (-targets * F.log_softmax(student_logits / temperature, dim=-1)).mean() * temperature**2


def span_soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float) -> torch.Tensor:  # fmt: skip
    """Extractive QA's prediction term: the soft cross-entropy over token positions of the start logits and of
    the end logits, each ``(batch, 2, tokens)`` (start, end), summed over positions and averaged over the
    batch and the two, times temperature².

    Summed over positions rather than averaged (``soft_cross_entropy`` averages over classes): a batch's
    width is its own longest window (dynamic padding), so an average would weigh each batch by 1/width and
    shrink the term ~200x at 384 tokens next to a two-class task's.
    """
    targets = F.softmax(teacher_logits / temperature, dim=-1)
    per_row = (-targets * F.log_softmax(student_logits / temperature, dim=-1)).sum(-1)
    return per_row.mean() * temperature**2


def head_logits(outputs) -> torch.Tensor:
    """A model's task outputs as one tensor: the logits (batch, classes), or for a question-answering head the
    start and end logits stacked as (batch, 2, tokens)."""
    if hasattr(outputs, "start_logits"):
        return torch.stack((outputs.start_logits, outputs.end_logits), dim=1)
    return outputs.logits


def span_masked(logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Span logits (batch, 2, tokens) with the padding positions pushed far below any real one, so that the
    softmax over positions (the teacher's targets, the student's log-probabilities) is the same for a window
    whatever the width of the batch it lands in; classification logits pass unchanged."""
    if logits.ndim != 3 or attention_mask is None:
        return logits
    return logits.masked_fill(attention_mask[:, None, :] == 0, -1e4)


def label_cross_entropy(student_logits: torch.Tensor, batch: dict) -> torch.Tensor | None:
    """The student's cross-entropy to the batch's labels, logged beside the losses (not trained on), or None
    where there is none: no labels, or regression. For a span head, the mean of the start and end terms."""
    logits = student_logits.detach().float()
    if logits.ndim == 3 and "start_positions" in batch:
        positions = (batch["start_positions"], batch["end_positions"])
        return sum(F.cross_entropy(logits[:, i], positions[i]) for i in (0, 1)) / 2
    if logits.ndim == 2 and logits.shape[-1] > 1 and batch.get("labels") is not None:
        return F.cross_entropy(logits, batch["labels"])
    return None


LABEL_KEYS = ("labels", "start_positions", "end_positions")  # what the loss reads; the models never see them


@dataclass
class DistillOutput:
    """The total loss and its detached parts (for logging, without a device sync per step)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class DistillationLoss(nn.Module):
    """L = w_a * L_attn + w_h * L_hidden + w_p * L_pred between a student and a teacher.

    ``hidden_states`` follow transformers' convention: embedding output first, then one per layer.
    When the student is narrower than the teacher a learned linear map lifts its hidden states (its
    parameters belong in the optimizer: ``optimizer = AdamW([*student.parameters(), *loss.parameters()])``).
    """

    def __init__(
        self,
        student_config,
        teacher_config,
        weights: LossWeights | None = None,
        temperature: float = 1.0,
        regression_target: str = "teacher",
        regression_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.weights = weights or LossWeights()
        self.temperature = temperature
        if regression_target not in ("teacher", "label", "both"):
            raise SparseBertError(f"regression target must be teacher, label or both; got {regression_target!r}")
        self.regression_target = regression_target
        if not regression_scale > 0:
            raise SparseBertError(f"regression scale must be > 0, got {regression_scale}")
        self.regression_scale = regression_scale
        self.layer_map = layer_map(student_config.num_hidden_layers, teacher_config.num_hidden_layers)
        s_width, t_width = student_config.hidden_size, teacher_config.hidden_size
        self.projection = nn.Linear(s_width, t_width) if s_width != t_width else None
        if self.weights.attention and not attention_comparable(student_config, teacher_config):
            raise SparseBertError(
                "attention distillation needs equal head counts "
                f"(student {student_config.num_attention_heads}, teacher {teacher_config.num_attention_heads}); "
                "set the attention weight to 0"
            )

    def attention_loss(self, student_scores: list[AttentionScores | torch.Tensor],
                       teacher_scores: list[AttentionScores | torch.Tensor]) -> torch.Tensor:  # fmt: skip
        """Summed over the student's layers, each against the teacher layer ``layer_map`` gives it."""
        pairs = zip(student_scores, self.layer_map, strict=True)
        return sum(score_mse(s, teacher_scores[t]) for s, t in pairs)

    def hidden_loss(
        self, student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        pairs = [(student_hidden[0], teacher_hidden[0])]
        pairs += [(student_hidden[i + 1], teacher_hidden[t + 1]) for i, t in enumerate(self.layer_map)]
        lift = self.projection if self.projection is not None else (lambda x: x)
        return sum(F.mse_loss(lift(s).float(), t.float()) for s, t in pairs)

    def prediction_loss(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """Soft cross-entropy to the teacher (extractive QA: over the start and the end positions, logits of
        shape (batch, 2, tokens), see ``head_logits``), or the regression MSE."""
        if student_logits.ndim == 3:
            return span_soft_cross_entropy(student_logits, teacher_logits, self.temperature)
        if student_logits.shape[-1] > 1:
            return soft_cross_entropy(student_logits, teacher_logits, self.temperature)
        s = student_logits.squeeze(-1)
        loss = student_logits.new_zeros(())
        if self.regression_target in ("teacher", "both"):
            loss = loss + F.mse_loss(s, teacher_logits.squeeze(-1))
        if self.regression_target in ("label", "both"):
            if labels is None:
                raise SparseBertError("regression distillation against the label needs labels in the batch")
            loss = loss + F.mse_loss(s, labels.to(s.dtype))
        return loss / self.regression_scale

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_hidden: tuple[torch.Tensor, ...] | None = None,
        teacher_hidden: tuple[torch.Tensor, ...] | None = None,
        student_scores: list[torch.Tensor] | None = None,
        teacher_scores: list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
    ) -> DistillOutput:
        """The weighted sum, computed in fp32 whatever precision the forward passes ran in."""
        student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
        total = student_logits.new_zeros(())
        parts: dict[str, torch.Tensor] = {}
        if self.weights.attention:
            term = self.attention_loss(student_scores, teacher_scores)
            total = total + self.weights.attention * term
            parts["attention"] = term.detach()
        if self.weights.hidden:
            term = self.hidden_loss(student_hidden, teacher_hidden)
            total = total + self.weights.hidden * term
            parts["hidden"] = term.detach()
        if self.weights.prediction:
            term = self.prediction_loss(student_logits, teacher_logits, labels)
            total = total + self.weights.prediction * term
            parts["prediction"] = term.detach()
        return DistillOutput(total, parts)


def distillation_step(teacher: nn.Module, student: nn.Module, loss_fn: DistillationLoss):
    """The prune-while-distill step as the loop calls it, ``step_fn(model, batch) -> (loss, parts)``:
    teacher forward (no grad), student forward, the three losses. ``bench/`` times this same function.

    The student's cross-entropy to the labels is logged too (not trained on): it is the "fitting
    ability" curve that makes strategies comparable. Extractive QA distils the start and end logits
    (``head_logits``); the attention and hidden terms do not depend on the head.
    """
    t_rec = AttentionScoreRecorder(teacher.module if hasattr(teacher, "module") else teacher)
    s_rec = AttentionScoreRecorder(student)
    want_hidden, want_attn = bool(loss_fn.weights.hidden), bool(loss_fn.weights.attention)

    def step_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        mask = inputs.get("attention_mask")
        with torch.no_grad(), t_rec:
            t_out = teacher(**inputs, output_hidden_states=want_hidden)
            t_scores = t_rec.scores(mask) if want_attn else None
        with s_rec:
            s_out = model(**inputs, output_hidden_states=want_hidden)
            s_scores = s_rec.scores(mask) if want_attn else None
        s_logits, t_logits = span_masked(head_logits(s_out), mask), span_masked(head_logits(t_out), mask)
        result = loss_fn(s_logits, t_logits, s_out.hidden_states, t_out.hidden_states, s_scores, t_scores,
                         batch.get("labels"))  # fmt: skip
        label_ce = label_cross_entropy(s_logits, batch)
        if label_ce is not None:
            result.parts["label_ce"] = label_ce
        return result.loss, result.parts

    return step_fn


def regression_scale(data: TaskData, how: str) -> float:
    """What a regression student's prediction MSE is divided by: the training labels' variance (``how`` =
    "variance"), so the term has the same size whatever the labels' units (in a rating's units, -4..4, it
    made two thirds of the loss where a classifier's three terms are of one size; BENCHMARKS.md
    "Regression at 90%"); 1 for "none" and for classification."""
    if not data.task.is_regression or how == "none" or len(data.train) < 2:
        return 1.0
    labels = [float(e.label) for e in data.train]
    return max(statistics.pvariance(labels), 1e-6)


def prepare_distillation(config, teacher: nn.Module, student: nn.Module, accelerator, scale: float):
    """The distilling strategies' step and the modules it trains beside the student (a projection), from
    ``prune``'s pruning options (``loss_weights``, ``temperature``, ``regression_target``). The teacher is prepared
    for evaluation on the accelerator. Returns (step_fn, extra modules, a note for the log or None)."""
    from sparsebert.models import fast_attention

    teacher_config = teacher.config
    teacher = fast_attention(teacher, accelerator.mixed_precision, accelerator.device)
    teacher = accelerator.prepare_model(teacher, evaluation_mode=True).eval()
    weights, note = LossWeights.parse(config.loss_weights), None
    if not attention_comparable(student.config, teacher_config):
        weights.attention = 0.0
        note = "student has fewer heads: attention loss disabled"
    loss_fn = DistillationLoss(
        student.config, teacher_config, weights, config.temperature, config.regression_target, scale
    )
    extra = [loss_fn] if loss_fn.projection is not None else []
    return distillation_step(teacher, student, loss_fn), extra, note
