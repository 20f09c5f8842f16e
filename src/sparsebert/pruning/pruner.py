"""Magnitude pruner: keeps one mask per prunable matrix and enforces it, like an optimizer step.

Usage inside any training loop (plain PyTorch, Accelerate or an HF Trainer callback)::

    pruner = MagnitudePruner(model, CubicSparsitySchedule(0.9, start_step=0, end_step=1000))
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()  # maybe update masks, then zero the pruned weights again

The pruner never touches gradients or optimizer state (SparseBERT's reference does not either); it
re-applies the masks after every optimizer step, so Adam's momentum cannot revive a pruned weight.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from sparsebert.errors import SparseBertError
from sparsebert.pruning.layers import PrunableLinear, find_prunable_linears
from sparsebert.pruning.schedule import CubicSparsitySchedule

SCOPES = ("per_matrix", "global")


class MagnitudePruner:
    """Magnitude pruning of the encoder's linear projections.

    ``scope="per_matrix"`` (the paper's default) gives every matrix its own threshold, so every matrix
    reaches the same sparsity; ``scope="global"`` ranks all prunable weights together. ``block=1`` prunes
    single weights (unstructured, the paper); ``block=4`` keeps or prunes groups of 4 consecutive input
    weights of a row together, ranked by their L2 norm — the 1x4 pattern that int8 dot-product
    instructions (VNNI: 4 bytes per lane) need to skip work on CPUs.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: CubicSparsitySchedule,
        scope: str = "per_matrix",
        targets: list[PrunableLinear] | None = None,
        block: int = 1,
    ) -> None:
        if scope not in SCOPES:
            raise SparseBertError(f"unknown pruning scope {scope!r}; choose one of {', '.join(SCOPES)}")
        self.model = model
        self.schedule = schedule
        self.scope = scope
        self.targets = targets if targets is not None else find_prunable_linears(model)
        self.block = block
        uneven = [t.name for t in self.targets if block < 1 or t.module.weight.shape[1] % block]
        if uneven:
            raise SparseBertError(f"pruning block {block} does not divide the input features of {uneven[0]}")
        self.masks: dict[str, torch.Tensor] = {
            t.name: torch.ones_like(t.module.weight, dtype=torch.bool) for t in self.targets
        }
        self.last_step = 0

    @classmethod
    def one_shot(cls, model: nn.Module, sparsity: float, scope: str = "per_matrix", block: int = 1) -> MagnitudePruner:
        """Prune ``model`` to ``sparsity`` at once; the returned pruner keeps those masks fixed."""
        pruner = cls(model, CubicSparsitySchedule(sparsity, 0, 0, 1), scope, block=block)
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
        if self.scope == "per_matrix":
            for t in self.targets:
                keep = _magnitude_mask(self._survivor_magnitudes(t), sparsity)
                self.masks[t.name] = keep.repeat_interleave(self.block, dim=1) & self.masks[t.name]
            return
        survivors = [self._survivor_magnitudes(t) for t in self.targets]
        magnitudes = torch.cat([m.flatten() for m in survivors])
        n_prune = round(sparsity * magnitudes.numel())
        threshold = -1.0 if n_prune == 0 else torch.kthvalue(magnitudes, n_prune).values.item()
        for t, m in zip(self.targets, survivors, strict=True):
            self.masks[t.name] = (m > threshold).repeat_interleave(self.block, dim=1) & self.masks[t.name]

    def _survivor_magnitudes(self, target: PrunableLinear) -> torch.Tensor:
        """The L2 norm in fp32 of each surviving block of weights (|w| when ``block`` is 1), -1 for pruned
        blocks (they rank first for pruning); shape (out_features, in_features / block)."""
        weight = target.module.weight.detach().float()
        magnitudes = weight.reshape(weight.shape[0], -1, self.block).norm(dim=-1)
        pruned = ~self.masks[target.name].to(weight.device)[:, :: self.block]
        return magnitudes.masked_fill(pruned, -1.0)

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
            "schedule": self.schedule.state_dict(),
            "masks": {name: mask.cpu() for name, mask in self.masks.items()},
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
        self.schedule.load_state_dict(state["schedule"])
        for name, mask in state["masks"].items():
            self.masks[name] = mask.to(self.masks[name].device, torch.bool)
        self.apply_masks()

    # -- reporting ----------------------------------------------------------------------------------
    def sparsity_report(self) -> dict:
        """Sparsity per matrix, per layer, over the pruned matrices and over the whole model.

        Counts actual zeros in the weights, so it is true whatever produced them.
        """
        return sparsity_report(self.model, self.targets)


def _magnitude_mask(magnitudes: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping the (1 - sparsity) largest of ``magnitudes`` (exact count)."""
    n_prune = round(sparsity * magnitudes.numel())
    mask = torch.ones(magnitudes.numel(), dtype=torch.bool, device=magnitudes.device)
    if n_prune > 0:
        smallest = torch.topk(magnitudes.flatten(), n_prune, largest=False, sorted=False).indices
        mask[smallest] = False
    return mask.view_as(magnitudes)


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
