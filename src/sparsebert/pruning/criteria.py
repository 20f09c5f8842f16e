"""What ranks the weights for pruning: one class per criterion, in one registry (``CRITERIA``).

A criterion scores every weight of a matrix (higher: keep), may read each backward pass's gradient
through a hook on the weight (``observe``), and may move the surviving weights when a mask grows
(``after_masks``: the second-order criterion compensates the weights it removes). The ``Pruner`` asks
it for scores at each mask update and owns everything else (schedule, masks, blocks, patterns).

- ``magnitude``: |w| (the paper).
- ``taylor``: |w * dL/dw|, averaged over recent steps: the first-order loss change of zeroing a weight
  (Molchanov et al. 2019; Intel Neural Compressor's ``snip_momentum``).
- ``obs``: second order, Optimal Brain Surgeon as oBERT applies it (Kurtic et al. 2022): the loss change
  of zeroing a weight is w² / (2 [F⁻¹]ᵢᵢ) under an empirical Fisher F of recent gradients, kept in blocks
  of consecutive input weights of a row; when weights are removed, the survivors of their block take the
  exact OBS update that minimises the loss change, δw = -F⁻¹ E_Q (E_Qᵀ F⁻¹ E_Q)⁻¹ w_Q.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sparsebert.errors import SparseBertError
from sparsebert.layers import PrunableLinear

# Weight of the past in the running average of |w * grad| (INC's snip_momentum uses 0.9): long enough
# to smooth one batch's noise, short enough to follow the weights between two mask updates.
TAYLOR_MOMENTUM = 0.9


class Criterion:
    """Scores by magnitude; the base of the criteria that read gradients."""

    needs_gradients = False
    sums_blocks = False  # a block's score: the L2 norm of its weights, or (loss-change criteria) the sum of theirs

    def __init__(self, targets: list[PrunableLinear], **options) -> None:
        self.targets = targets
        self.observed = 0  # gradients folded in (one per matrix and backward pass)

    def scores(self, target: PrunableLinear) -> torch.Tensor:
        """One fp32 score per weight of ``target`` (higher: keep); shape of the weight."""
        return target.module.weight.detach().float().abs()

    def block_scores(self, target: PrunableLinear, block: int) -> torch.Tensor:
        """One score per block of ``block`` consecutive input weights, shape (out, in / block): the L2 norm of
        the block's weights for magnitude, the sum of its weights' scores for the loss-change criteria."""
        scores = self.scores(target).reshape(target.module.weight.shape[0], -1, block)
        return scores.sum(dim=-1) if self.sums_blocks else scores.norm(dim=-1)

    def observe(self, name: str, weight: nn.Parameter) -> None:
        """Fold one backward pass's gradient of the matrix ``name`` into the criterion's state."""

    def after_masks(self, target: PrunableLinear, old: torch.Tensor, new: torch.Tensor) -> None:
        """Called when the mask of ``target`` grew from ``old`` to ``new`` (before the masks are applied)."""

    def sync(self) -> None:
        """Average the gradient statistics over data-parallel processes (each saw only its shard)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for tensor in self.state_tensors().values():
            dist.all_reduce(tensor)
            tensor.div_(dist.get_world_size())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def nbytes(self) -> int:
        """Memory the criterion keeps beside the model (reported in the log)."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    def state_dict(self) -> dict:
        return {"scores": {n: t.cpu() for n, t in self.state_tensors().items()}, "observed": self.observed}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_tensors()
        for name, tensor in state.get("scores", {}).items():
            mine[name].copy_(tensor)
        self.observed = int(state.get("observed", 0))


class Taylor(Criterion):
    """|w * grad|, an exponential average over the backward passes (``TAYLOR_MOMENTUM``)."""

    needs_gradients = sums_blocks = True

    def __init__(self, targets: list[PrunableLinear], **options) -> None:
        super().__init__(targets)
        self.running = {t.name: torch.zeros_like(t.module.weight, dtype=torch.float32) for t in targets}

    @torch.no_grad()
    def observe(self, name: str, weight: nn.Parameter) -> None:
        change = (weight.detach().float() * weight.grad.float()).abs_()  # first-order loss change of zeroing
        self.running[name].mul_(TAYLOR_MOMENTUM).add_(change, alpha=1.0 - TAYLOR_MOMENTUM)
        self.observed += 1

    def scores(self, target: PrunableLinear) -> torch.Tensor:
        return self.running[target.name].to(target.module.weight.device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.running


class OBS(Criterion):
    """Second order (oBERT): a block-diagonal empirical Fisher of recent gradients, scores w² / (2 [F⁻¹]ᵢᵢ),
    and the OBS update of the survivors when weights are removed.

    ``fisher_block`` consecutive input weights of a row share a block (its F is fisher_block² floats per
    fisher_block weights: 4 * fisher_block bytes per weight); ``fisher_gradients`` is how many recent
    gradients the estimate averages (an exponential average with that window: the CPU budgets here give a
    few gradients between two mask updates, where oBERT collects 1,024); ``fisher_damp`` is added to F's
    diagonal as a fraction of its mean (F is singular with fewer gradients than block entries).
    """

    needs_gradients = sums_blocks = True

    def __init__(self, targets: list[PrunableLinear], fisher_block: int = 32, fisher_gradients: int = 64,
                 fisher_damp: float = 0.01, **options) -> None:  # fmt: skip
        super().__init__(targets)
        if fisher_block < 1 or fisher_gradients < 1 or not fisher_damp > 0:
            raise SparseBertError("obs needs fisher_block >= 1, fisher_gradients >= 1 and fisher_damp > 0")
        uneven = [t.name for t in targets if t.module.weight.shape[1] % fisher_block]
        if uneven:
            raise SparseBertError(f"--fisher-block {fisher_block} does not divide the input features of {uneven[0]}")
        self.block, self.damp = fisher_block, fisher_damp
        self.momentum = 1.0 - 1.0 / fisher_gradients
        self.fisher = {
            t.name: torch.zeros(t.module.weight.numel() // fisher_block, fisher_block, fisher_block) for t in targets
        }
        self.inverses: dict[str, torch.Tensor] = {}  # of the current F, from a mask update's scores to its moves

    @torch.no_grad()
    def observe(self, name: str, weight: nn.Parameter) -> None:
        g = weight.grad.detach().float().reshape(-1, self.block)  # (blocks, B)
        fisher = self.fisher[name]
        if fisher.device != g.device:
            fisher = self.fisher[name] = fisher.to(g.device)
        # F <- m F + (1 - m) g gᵀ, block by block; the first gradient is the whole estimate, not 1 - m of it
        keep = self.momentum if self.observed >= len(self.targets) else 0.0
        torch.baddbmm(fisher, g.unsqueeze(2), g.unsqueeze(1), beta=keep, alpha=1.0 - keep, out=fisher)
        self.inverses.pop(name, None)
        self.observed += 1

    def inverse(self, name: str) -> torch.Tensor:
        """(F + damp * mean(diag F) * I)⁻¹ per block, by Cholesky (fp64: F is near singular)."""
        if name in self.inverses:
            return self.inverses[name]
        fisher = self.fisher[name].double()
        diag = fisher.diagonal(dim1=1, dim2=2)
        scale = self.damp * diag.mean(dim=1).clamp_min(1e-20)
        damped = fisher + torch.diag_embed(scale.unsqueeze(1).expand_as(diag))
        self.inverses[name] = torch.cholesky_inverse(torch.linalg.cholesky(damped))
        return self.inverses[name]

    def scores(self, target: PrunableLinear) -> torch.Tensor:
        weight = target.module.weight.detach()
        inverse_diag = self.inverse(target.name).diagonal(dim1=1, dim2=2).reshape(weight.shape)
        return (weight.double().square() / (2 * inverse_diag.to(weight.device))).float()

    @torch.no_grad()
    def after_masks(self, target: PrunableLinear, old: torch.Tensor, new: torch.Tensor) -> None:
        """The exact OBS update of each block whose mask grew: the survivors move so that the loss change
        (to second order) of zeroing the block's pruned weights is the least. Weights pruned earlier are
        zero and stay in the constraint, so they stay zero."""
        weight = target.module.weight
        inverse = self.inverse(target.name)
        self.inverses.pop(target.name)  # the update's last use: the fp64 inverses are twice the Fisher's size
        grew = (old & ~new).reshape(-1, self.block).any(dim=1).cpu()
        if not bool(grew.any()):
            return
        w = weight.detach().double().reshape(-1, self.block)[grew.to(weight.device)].cpu()
        pruned = ~new.reshape(-1, self.block)[grew.to(new.device)].cpu()
        f_inv = inverse[grew]
        delta = obs_update(w, pruned, f_inv)
        flat = weight.detach().reshape(-1, self.block)
        flat[grew.to(weight.device)] += delta.to(weight.device, weight.dtype)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.fisher

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.inverses.clear()


def obs_update(w: torch.Tensor, pruned: torch.Tensor, f_inv: torch.Tensor) -> torch.Tensor:
    """δw that zeroes ``w[pruned]`` at the least second-order loss change, per block (rows of ``w``):
    δw = -F⁻¹ E_Q (E_Qᵀ F⁻¹ E_Q)⁻¹ w_Q, solved for every block at once by putting the identity where a
    block keeps a weight (those rows and columns drop out of the system)."""
    q = pruned.to(f_inv.dtype)
    restricted = f_inv * q.unsqueeze(2) * q.unsqueeze(1) + torch.diag_embed(1 - q)
    x = torch.linalg.solve(restricted, (w * q).unsqueeze(2)).squeeze(2)  # zero outside Q
    return -(f_inv @ x.unsqueeze(2)).squeeze(2)


CRITERIA: dict[str, type[Criterion]] = {"magnitude": Criterion, "taylor": Taylor, "obs": OBS}
PRUNE_CRITERIA = tuple(CRITERIA)
