"""Gradual sparsity schedule (Zhu & Gupta 2017), the pruning analogue of an LR scheduler.

s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3 for t0 <= t <= t1; s_i before t0, s_f after t1.
Masks are not recomputed every step: SparseBERT's reference updates them about 100 times over the run,
which keeps the bookkeeping cheap and gives the weights time to adapt between pruning events.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sparsebert.errors import SparseBertError


def resolve_step(value: float, n_steps: int) -> int:
    """A step given as a fraction of the run when <= 1 (0.7 = 70%), else as an absolute step."""
    return round(value * n_steps) if value <= 1 else int(value)


@dataclass
class CubicSparsitySchedule:
    """Target sparsity as a function of the optimizer step.

    ``start_step``/``end_step`` bound the pruning window; ``num_updates`` mask updates are spread
    evenly over it, the last one exactly at ``end_step`` so the final sparsity is reached there.
    """

    final_sparsity: float
    start_step: int
    end_step: int
    num_updates: int = 100
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.initial_sparsity <= self.final_sparsity < 1.0:
            raise SparseBertError(
                f"sparsity must satisfy 0 <= initial ({self.initial_sparsity}) <= final ({self.final_sparsity}) < 1"
            )
        if self.start_step < 0 or self.end_step < self.start_step:
            raise SparseBertError(
                f"pruning window must satisfy 0 <= start ({self.start_step}) <= end ({self.end_step})"
            )
        if self.num_updates < 1:
            raise SparseBertError(f"num_updates must be >= 1, got {self.num_updates}")

    @property
    def interval(self) -> int:
        """Steps between two mask updates."""
        return max(1, (self.end_step - self.start_step) // self.num_updates)

    def sparsity(self, step: int) -> float:
        """Target sparsity after ``step`` optimizer steps."""
        if step <= self.start_step:
            return self.initial_sparsity if step < self.end_step else self.final_sparsity
        if step >= self.end_step:
            return self.final_sparsity
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3

    def is_update_step(self, step: int) -> bool:
        """Whether the masks should be recomputed after ``step`` optimizer steps."""
        if step == self.end_step:
            return True
        if step <= self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.interval == 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
