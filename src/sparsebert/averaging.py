"""The average of the student's weights over the end of its run (a tail average, as in SWA / Polyak).

The student's dev metric moves by one to two points between two evaluations 100 steps apart while the
masks are already fixed, so where a run happens to stop decides a part of its result. The mean of the
weights over the steps after the target sparsity is reached is one model, as sparse as each of them (the
masks no longer change there, so every averaged weight that was pruned is zero), at no training cost.
Off by default: on MRPC at 90% and 600 steps it was no better than the last weights, whose LR has
decayed to zero (BENCHMARKS.md, "The dense ceiling, the average of the recovery"); runs that use it
log both.

Used like the pruner, beside the optimizer::

    average = WeightAverage(model, start_step=420)
    for step in ...:
        ...; optimizer.step(); pruner.step()
        average.update(step + 1)
    with average.applied():
        evaluate(model)        # the averaged weights
    average.copy_to()          # keep them
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.optim.swa_utils import get_swa_multi_avg_fn


class WeightAverage:
    """Running mean of a model's trainable parameters from ``start_step`` on; checkpointable."""

    def __init__(self, model: nn.Module, start_step: int) -> None:
        self.start_step = start_step
        self.count = 0
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._averaged: list[torch.Tensor] = []
        self._update = get_swa_multi_avg_fn()

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Add the current weights to the mean if ``step`` (optimizer steps taken) is in the window."""
        if step < self.start_step:
            return
        current = [p.detach() for p in self._params]
        if self.count == 0:
            self._averaged = [t.clone() for t in current]
        else:
            self._update(self._averaged, current, self.count)
        self.count += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the duration (a no-op before the first update)."""
        if self.count == 0:
            yield
            return
        saved = [p.detach().clone() for p in self._params]
        self._copy(self._averaged)
        try:
            yield
        finally:
            self._copy(saved)

    def copy_to(self) -> bool:
        """Put the averaged weights into the model for good; False when nothing was averaged yet."""
        if self.count:
            self._copy(self._averaged)
        return bool(self.count)

    @torch.no_grad()
    def _copy(self, tensors: list[torch.Tensor]) -> None:
        torch._foreach_copy_(self._params, tensors)

    def state_dict(self) -> dict:
        return {"start_step": self.start_step, "count": self.count, "averaged": [t.cpu() for t in self._averaged]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a mean; a checkpoint from before the window (count 0) holds no tensors, only the window."""
        self.start_step, self.count = int(state["start_step"]), int(state["count"])
        if not self.count:
            self._averaged = []
            return
        self._averaged = [t.to(p.device, p.dtype) for t, p in zip(state["averaged"], self._params, strict=True)]
