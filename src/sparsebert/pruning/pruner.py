"""The pruner: keeps one mask per prunable matrix and enforces it, like an optimizer step.

Usage inside any training loop (plain PyTorch, Accelerate or an HF Trainer callback)::

    pruner = Pruner(model, CubicSparsitySchedule(0.9, start_step=0, end_step=1000))
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()  # maybe update masks, then zero the pruned weights again

The pruner never touches gradients or optimizer state (SparseBERT's reference does not either); it
re-applies the masks after every optimizer step, so Adam's momentum cannot revive a pruned weight.

What ranks the weights (``criterion``, ``sparsebert.pruning.criteria``): their magnitude (the paper),
``taylor``, the first-order estimate of the loss change when a weight is zeroed, or ``obs``, the second-order
one (oBERT), which also moves the surviving weights to make up for the removed ones. The gradient criteria
read every backward pass by a hook on the weights (so they work in any loop, an HF Trainer included, with
no extra call). They look at what the *task* needs (the distillation loss), where a pre-trained student's
magnitudes only say what pre-training needed. (Hard movement pruning, -sum w * dL/dw, was tried and is not
offered: its scores grow with |w| in both signs, so its first updates removed large pre-trained weights and
the student fell to chance at 6% sparsity; BENCHMARKS.md, "Pruning criterion".)
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from functools import partial

import torch
from torch import nn

from sparsebert.errors import SparseBertError
from sparsebert.layers import PrunableLinear, find_prunable_linears
from sparsebert.pruning.criteria import CRITERIA, PRUNE_CRITERIA
from sparsebert.pruning.schedule import CubicSparsitySchedule

SCOPES = ("per_matrix", "global")
PRUNE_BLOCKS = (1, 2, 4, 8)  # consecutive input weights pruned together (--prune-block)
MAX_SPARSITY = 0.99  # 100x: beyond it most matrices keep fewer weights than they have rows
log = logging.getLogger(__name__)
# The most a global ranking may prune of any one matrix (Intel Neural Compressor's max_sparsity_ratio_per_op):
# first-order scores add up badly over a whole matrix, and an emptied projection silently cuts its layer.
MAX_MATRIX_SPARSITY = 0.98


class Pruner:
    """Gradual pruning of the encoder's linear projections, ranked by ``criterion``.

    ``scope="per_matrix"`` (the paper's default) gives every matrix its own threshold, so every matrix
    reaches the same sparsity; ``scope="global"`` ranks all prunable weights together (no matrix beyond
    ``MAX_MATRIX_SPARSITY``, or the target when it is higher). ``block=1`` prunes
    single weights (unstructured, the paper); ``block=4`` keeps or prunes groups of 4 consecutive input
    weights of a row together, ranked by their L2 norm — the 1x4 pattern that int8 dot-product
    instructions (VNNI: 4 bytes per lane) need to skip work on CPUs. ``criterion`` is one of
    ``PRUNE_CRITERIA`` (see the module's docstring), built with ``criterion_options`` (obs: ``fisher_block``,
    ``fisher_gradients``, ``fisher_damp``); a block's taylor or obs score is the sum of its weights' scores.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: CubicSparsitySchedule,
        scope: str = "per_matrix",
        targets: list[PrunableLinear] | None = None,
        block: int = 1,
        criterion: str = "taylor",
        pattern: tuple[int, int] | None = None,
        **criterion_options,
    ) -> None:
        if scope not in SCOPES:
            raise SparseBertError(f"unknown pruning scope {scope!r}; choose one of {', '.join(SCOPES)}")
        if criterion not in PRUNE_CRITERIA:
            raise SparseBertError(f"unknown pruning criterion {criterion!r}; choose one of {', '.join(PRUNE_CRITERIA)}")
        self.model = model
        self.schedule = schedule
        self.scope = scope
        self.targets = targets if targets is not None else find_prunable_linears(model)
        self.block, self.pattern = block, pattern
        uneven = [t.name for t in self.targets if block < 1 or t.module.weight.shape[1] % block]
        if uneven:
            raise SparseBertError(f"pruning block {block} does not divide the input features of {uneven[0]}")
        final = schedule.final_sparsity
        if final > MAX_SPARSITY + 1e-9:
            raise SparseBertError(f"sparsity must satisfy 0 <= sparsity <= {MAX_SPARSITY}, got {final}")
        check_pattern(pattern, final, block, scope, self.targets)
        warn_dead_rows(final, self.targets)
        self.masks: dict[str, torch.Tensor] = {
            t.name: torch.ones_like(t.module.weight, dtype=torch.bool) for t in self.targets
        }
        self.last_step = 0
        self.criterion = criterion
        self.scorer = CRITERIA[criterion](self.targets, **criterion_options)
        self.last_update_seconds = 0.0  # the last mask update's wall time (scores, masks, weight moves)
        self._hooks: list = []
        if self.scorer.needs_gradients:
            for t in self.targets:
                hook = partial(self.observe, t.name)
                self._hooks.append(t.module.weight.register_post_accumulate_grad_hook(hook))

    @classmethod
    def one_shot(cls, model: nn.Module, sparsity: float, scope: str = "per_matrix", block: int = 1,
                 pattern: tuple[int, int] | None = None) -> Pruner:  # fmt: skip
        """Prune ``model`` to ``sparsity`` at once, by magnitude (there is no gradient yet); the returned
        pruner keeps those masks fixed."""
        schedule = CubicSparsitySchedule(sparsity, 0, 0, 1)
        pruner = cls(model, schedule, scope, block=block, criterion="magnitude", pattern=pattern)
        pruner.update_masks(sparsity)
        pruner.apply_masks()
        return pruner

    # -- the optimizer-like interface -------------------------------------------------------------
    def step(self) -> bool:
        """Advance one optimizer step; update the masks if the schedule says so; re-apply them.

        Returns True when the masks were recomputed at this step.
        """
        self.last_step += 1
        updated = self.schedule.is_update_step(self.last_step)
        if updated:
            self.update_masks(self.schedule.sparsity(self.last_step))
        self.apply_masks()
        return updated

    def observe(self, name: str, weight: nn.Parameter) -> None:
        """Fold one backward pass's gradient of matrix ``name`` into the criterion. Registered as a hook on
        each weight's gradient by the gradient criteria; public for a loop that accumulates gradients its
        own way."""
        if weight.grad is None or self.last_step >= self.schedule.end_step:
            return  # no mask update left: the scores are not needed any more
        self.scorer.observe(name, weight)

    def remove_hooks(self) -> None:
        """Stop reading gradients (the masks stay enforced by ``step()``)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def get_last_sparsity(self) -> float:
        """The target sparsity of the last ``step()`` (like ``torch.ao``'s ``get_last_sl()``)."""
        return self.schedule.sparsity(self.last_step)

    @torch.no_grad()
    def update_masks(self, sparsity: float) -> None:
        """Recompute every mask so that ``sparsity`` of the prunable weights are zero.

        The ranking happens among the survivors, as in the reference implementation: a weight pruned
        earlier ranks below every survivor, whatever value the last optimizer step gave it (Adam's
        momentum moves pruned weights between ``step()`` calls, before the masks are re-applied), so
        masks only grow.
        """
        if self.scorer.needs_gradients and not self.scorer.observed:  # all-zero scores: memory order, silently
            raise SparseBertError(
                f"the {self.criterion} criterion ranks by gradients, and no backward pass was seen: call "
                "loss.backward() before pruner.step(), or use criterion='magnitude'"
            )
        started = time.perf_counter()
        self.scorer.sync()
        survivors = [self._survivor_scores(t) for t in self.targets]
        if self.pattern is not None:  # at most N of each M (N:M), then more among the survivors if asked
            keeps = [_pattern_mask(scores, *self.pattern, sparsity) for scores in survivors]
        elif self.scope == "per_matrix":
            keeps = [_top_mask(scores, sparsity) for scores in survivors]
        else:
            keeps = _global_keep(survivors, sparsity)
        for t, keep in zip(self.targets, keeps, strict=True):
            old = self.masks[t.name]
            self.masks[t.name] = keep.repeat_interleave(self.block, dim=1) & old
            self.scorer.after_masks(t, old, self.masks[t.name])
        self.last_update_seconds = time.perf_counter() - started

    def _survivor_scores(self, target: PrunableLinear) -> torch.Tensor:
        """What ranks each block of weights, in fp32: its L2 norm (|w| when ``block`` is 1) or the sum of its
        gradient scores; -inf for pruned blocks (they rank first for pruning); shape (out, in / block)."""
        scores = self.scorer.block_scores(target, self.block)
        pruned = ~self.masks[target.name].to(scores.device)[:, :: self.block]
        return scores.masked_fill(pruned, -torch.inf)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned weights (call after every optimizer step)."""
        for t in self.targets:
            mask = self.masks[t.name]
            if mask.device != t.module.weight.device:
                mask = self.masks[t.name] = mask.to(t.module.weight.device)
            t.module.weight.mul_(mask)

    def state_dict(self) -> dict:
        return {
            "last_step": self.last_step,
            "scope": self.scope,
            "block": self.block,
            "pattern": list(self.pattern) if self.pattern else None,
            "criterion": self.criterion,
            "schedule": self.schedule.state_dict(),
            "masks": {name: mask.cpu() for name, mask in self.masks.items()},
            **self.scorer.state_dict(),  # the criterion's statistics ("scores") and gradients seen
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.masks) ^ set(state["masks"])
        if missing:
            raise SparseBertError(f"pruner state does not match the model: differing matrices {sorted(missing)}")
        self.last_step = int(state["last_step"])
        self.scope = state["scope"]
        block = int(state.get("block", 1))  # checkpoints from before blocks existed pruned single weights
        if block != self.block:
            raise SparseBertError(f"the pruner state prunes blocks of {block}, this pruner blocks of {self.block}")
        pattern = tuple(state["pattern"]) if state.get("pattern") else None
        if pattern != self.pattern:
            raise SparseBertError(f"the pruner state has the pattern {pattern}, this pruner {self.pattern}")
        criterion = state.get("criterion", "magnitude")  # states from before the criteria existed
        if criterion != self.criterion:
            raise SparseBertError(f"the pruner state ranks by {criterion}, this pruner by {self.criterion}")
        self.schedule.load_state_dict(state["schedule"])
        for name, mask in state["masks"].items():
            self.masks[name] = mask.to(self.masks[name].device, torch.bool)
        self.scorer.load_state_dict(state)
        self.apply_masks()

    # -- reporting ----------------------------------------------------------------------------------
    def sparsity_report(self) -> dict:
        """Sparsity per matrix, per layer, over the pruned matrices and over the whole model.

        Counts actual zeros in the weights, so it is true whatever produced them.
        """
        return sparsity_report(self.model, self.targets)


def _global_keep(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Keep masks for one threshold over all ``scores`` that prunes ``sparsity`` of them, except that no
    matrix is pruned beyond ``max(MAX_MATRIX_SPARSITY, sparsity)``: those keep their own top weights and
    the others share the rest of the budget under a threshold of their own (so the total stays exact)."""
    cap = max(MAX_MATRIX_SPARSITY, sparsity)
    n_prune = round(sparsity * sum(m.numel() for m in scores))
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(scores)) if i not in capped]
        budget = n_prune - sum(round(cap * scores[i].numel()) for i in capped)  # <= 0 once all are capped
        threshold = -torch.inf
        if budget > 0:
            threshold = torch.kthvalue(torch.cat([scores[i].flatten() for i in free]), budget).values.item()
        over = {i for i in free if int((scores[i] <= threshold).sum()) > round(cap * scores[i].numel())}
        if not over:
            break
        capped |= over
    return [_top_mask(m, cap) if i in capped else m > threshold for i, m in enumerate(scores)]


def check_pattern(pattern: tuple[int, int] | None, sparsity: float, block: int, scope: str,
                  targets: list[PrunableLinear]) -> None:  # fmt: skip
    """An N:M pattern: N < M, M dividing every matrix's rows, one matrix at a time, single weights, and a
    target sparsity it can reach (at least 1 - N/M: at most N of M weights kept)."""
    if pattern is None:
        return
    n, m = pattern
    check_pattern_target(pattern, sparsity)
    if block != 1 or scope != "per_matrix":
        raise SparseBertError("--prune-pattern ranks single weights per matrix: use it without --prune-block and "
                              "--prune-scope global")  # fmt: skip
    uneven = [t.name for t in targets if t.module.weight.shape[1] % m]
    if uneven:
        raise SparseBertError(f"pattern {n}:{m}: {m} does not divide the input features of {uneven[0]}")


def check_pattern_target(pattern: tuple[int, int], sparsity: float) -> None:
    """What an N:M pattern needs of its numbers alone (checked by ``prune``'s options before any model loads)."""
    n, m = pattern
    if not 0 < n < m:
        raise SparseBertError(f"a pattern N:M keeps N < M weights of M, got {n}:{m}")
    if sparsity < 1 - n / m - 1e-9:
        raise SparseBertError(f"pattern {n}:{m} prunes at least {1 - n / m:.0%}; the target {sparsity:g} is below")


def warn_dead_rows(sparsity: float, targets: list[PrunableLinear]) -> None:
    """A matrix that keeps fewer weights than its rows has output features with no weight left (dead
    features): allowed (the 97% point), said once."""
    thin = [t.name for t in targets if round((1 - sparsity) * t.module.weight.numel()) < t.module.weight.shape[0]]
    if thin:
        log.warning(
            "at sparsity %g, %d of %d matrices keep fewer weights than they have rows (e.g. %s): some of "
            "their output features will have no weight left",
            sparsity,
            len(thin),
            len(targets),
            thin[0],
        )


def _pattern_mask(scores: torch.Tensor, n: int, m: int, sparsity: float) -> torch.Tensor:
    """Keep the top weights of every group of ``m`` consecutive inputs of a row: as many as ``sparsity``
    leaves (rounded to whole weights per group, so a little under it on the way), never fewer than ``n``;
    past 1 - n/m the rest is pruned among the survivors. Exactly N:M at the target 1 - n/m."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    k = max(n, m - math.floor(sparsity * m + 1e-9))
    kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(k, dim=-1).indices, True)
    keep = kept.reshape(rows, cols)
    if k == n and sparsity > 1 - n / m + 1e-9:  # only once the pattern holds: no group falls below N on the way
        keep &= _top_mask(scores.masked_fill(~keep, -torch.inf), sparsity)
    return keep


def _top_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping the (1 - sparsity) largest of ``scores`` (exact count)."""
    n_prune = round(sparsity * scores.numel())
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_prune > 0:
        smallest = torch.topk(scores.flatten(), n_prune, largest=False, sorted=False).indices
        mask[smallest] = False
    return mask.view_as(scores)


def sparsity_report(model: nn.Module, targets: list[PrunableLinear] | None = None) -> dict:
    """Measure zeros: ``{"overall", "model", "matrices", "layers", "nonzero": {...}}``."""
    targets = targets if targets is not None else find_prunable_linears(model)
    matrices: dict[str, float] = {}
    per_layer: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    zeros_pruned = total_pruned = 0
    for t in targets:
        w = t.module.weight
        zeros = int((w == 0).sum())
        matrices[t.name] = zeros / w.numel()
        per_layer[t.layer][0] += zeros
        per_layer[t.layer][1] += w.numel()
        zeros_pruned += zeros
        total_pruned += w.numel()
    zeros_all = sum(int((p == 0).sum()) for p in model.parameters())
    total_all = sum(p.numel() for p in model.parameters())
    return {
        "overall": zeros_pruned / max(total_pruned, 1),
        "model": zeros_all / max(total_all, 1),
        "matrices": matrices,
        "layers": {str(layer): z / n for layer, (z, n) in sorted(per_layer.items())},
        "nonzero": {
            "pruned_layers": total_pruned - zeros_pruned,
            "pruned_layers_total": total_pruned,
            "model": total_all - zeros_all,
            "model_total": total_all,
        },
    }
