"""The orders of work that make a small model, in one table (the paper's knowledge analysis).

``sparsebert prune --strategy`` and ``sparsebert compare`` read what a strategy does from here alone:
where its student starts, whether it learns from the teacher or from the labels, and how it is pruned.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    name: str
    student_from: str  # "pretrained" | "teacher" (the fine-tuned weights) | "pretrained-cut" (a small dense copy)
    distills: bool  # trained on the teacher's attention, hidden states and logits; else on the labels
    pruning: str  # "gradual" (cubic schedule while training) | "one-shot" (by magnitude, then fixed) | "none"


TABLE: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("sparsebert", student_from="pretrained", distills=True, pruning="gradual"),
        Strategy("finetune-then-prune", student_from="teacher", distills=False, pruning="gradual"),
        # Not in the paper: (c) with the teacher as the signal instead of the labels, which is how
        # SparseML, nn_pruning and oBERT prune; it separates "where the student starts" from "what it learns from".
        Strategy("finetune-then-prune-kd", student_from="teacher", distills=True, pruning="gradual"),
        Strategy("prune-then-finetune", student_from="pretrained", distills=False, pruning="one-shot"),
        Strategy("distill-dense", student_from="pretrained-cut", distills=True, pruning="none"),
    )
}
