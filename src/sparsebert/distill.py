"""TinyBERT-style distillation losses, usable on their own with any pair of HF encoders.

Attention is matched on the *scores before softmax* (as TinyBERT and SparseBERT do). Transformers does
not return those (``output_attentions`` gives probabilities, and forces the slow eager kernel), so
``AttentionScoreRecorder`` hooks the query and key projections that the pruning engine already finds
and recomputes ``Q K^T / sqrt(d_head)``. Padded positions are set to 0 in both models, which is what
TinyBERT's ``where(score <= -1e2, 0, score)`` does to the additive mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sparsebert.errors import SparseBertError
from sparsebert.pruning.layers import find_prunable_linears


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

    def scores(self, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
        """Per layer: (batch, heads, seq, seq) scores with padded rows and columns set to 0."""
        result = []
        for q_mod, k_mod in zip(self._q, self._k, strict=True):
            # fp32 scores even when the forward ran in bf16: the loss compares small differences
            q, k = self._outputs[id(q_mod)].float(), self._outputs[id(k_mod)].float()
            b, s, width = q.shape
            d = width // self.num_heads
            qh = q.view(b, s, self.num_heads, d).transpose(1, 2)
            kh = k.view(b, s, self.num_heads, d).transpose(1, 2)
            scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
            if attention_mask is not None:
                valid = attention_mask[:, None, :, None].bool() & attention_mask[:, None, None, :].bool()
                scores = scores.masked_fill(~valid, 0.0)
            result.append(scores)
        return result


@dataclass
class LossWeights:
    """Weights of the three terms; SparseBERT adds them with equal weights."""

    attention: float = 1.0
    hidden: float = 1.0
    prediction: float = 1.0

    @classmethod
    def parse(cls, text: str | list | tuple | dict | LossWeights | None) -> LossWeights:
        """Accept ``"1,1,1"``, ``[1, 1, 1]`` or ``{"attention": 1, ...}``."""
        if text is None:
            return cls()
        if isinstance(text, LossWeights):
            return text
        if isinstance(text, dict):
            return cls(**{k: float(v) for k, v in text.items()})
        parts = text.split(",") if isinstance(text, str) else list(text)
        if len(parts) != 3:
            raise SparseBertError(f"loss weights must be three numbers attention,hidden,prediction; got {text!r}")
        try:
            return cls(*(float(p) for p in parts))
        except ValueError as exc:
            raise SparseBertError(f"loss weights must be numbers, got {text!r}") from exc


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

    def attention_loss(self, student_scores: list[torch.Tensor], teacher_scores: list[torch.Tensor]) -> torch.Tensor:
        pairs = zip(student_scores, self.layer_map, strict=True)
        return sum(F.mse_loss(s.float(), teacher_scores[t].float()) for s, t in pairs)

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
