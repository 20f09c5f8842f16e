"""WeightAverage: the running mean from its first step, swapped in and out, checkpointed."""

from __future__ import annotations

import torch
from torch import nn

from sparsebert.averaging import WeightAverage


def _run(model: nn.Module, average: WeightAverage, values: list[float]) -> None:
    """Step i (from 1) sets every weight to values[i - 1], as an optimizer step would move them."""
    for step, value in enumerate(values, start=1):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
        average.update(step)


def test_the_mean_starts_at_its_step_and_is_swapped_in_and_out():
    model = nn.Linear(3, 2)
    average = WeightAverage(model, start_step=3)
    _run(model, average, [1.0, 2.0])
    assert average.count == 0 and not average.copy_to()
    with average.applied():  # nothing averaged yet: the weights as they are
        assert float(model.weight[0, 0]) == 2.0
    _run(model, average, [1.0, 2.0, 4.0, 8.0, 12.0])  # steps 1..5 again: 4, 8, 12 are averaged
    assert average.count == 3
    with average.applied():
        assert torch.all(model.weight == 8.0) and torch.all(model.bias == 8.0)
    assert torch.all(model.weight == 12.0)  # restored
    assert average.copy_to() and torch.all(model.weight == 8.0)


def test_a_restored_average_goes_on_where_it_stopped():
    model = nn.Linear(2, 2)
    average = WeightAverage(model, start_step=1)
    _run(model, average, [2.0, 4.0])
    state = average.state_dict()
    other = nn.Linear(2, 2)
    restored = WeightAverage(other, start_step=99)
    restored.load_state_dict(state)
    with torch.no_grad():
        other.weight.fill_(9.0)
        other.bias.fill_(9.0)
    restored.update(3)  # (2 + 4 + 9) / 3
    assert restored.start_step == 1 and restored.count == 3
    restored.copy_to()
    assert torch.allclose(other.weight, torch.full((2, 2), 5.0))


def test_a_checkpoint_from_before_the_window_restores_and_then_averages():
    """A run stopped before --prune-end (nothing averaged yet) must resume: the GPU's 8,000-step students,
    stopped at step ~3,450 of a window starting at 5,600, failed here on resuming."""
    model = nn.Linear(2, 2)
    average = WeightAverage(model, start_step=3)
    _run(model, average, [1.0])
    restored = WeightAverage(model, start_step=3)
    restored.load_state_dict(average.state_dict())
    assert restored.count == 0 and not restored.copy_to()
    _run(model, restored, [1.0, 1.0, 2.0, 6.0])  # steps 1-4: 3 and 4 are averaged
    assert restored.count == 2 and restored.copy_to() and torch.all(model.weight == 4.0)
