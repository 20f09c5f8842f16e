"""N:M patterns (at most N nonzero in each group of M consecutive inputs of a row), and the 97-99% range."""

from __future__ import annotations

import logging

import pytest
import torch

from sparsebert.errors import SparseBertError
from sparsebert.pruning import CubicSparsitySchedule, Pruner
from tests.test_pruning import _train_steps, tiny


def nonzero_per_group(weight: torch.Tensor, m: int) -> torch.Tensor:
    return (weight != 0).reshape(weight.shape[0], -1, m).sum(dim=-1)


@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_two_of_four_is_reached_on_the_schedule_and_exact_at_its_end(criterion):
    model = tiny()
    pruner = Pruner(model, CubicSparsitySchedule(0.5, 0, 8, num_updates=4), criterion=criterion, pattern=(2, 4))
    seen, previous = [], None
    for step in range(12):
        _train_steps(model, pruner, 1, seed=step)
        masks = {n: m.clone() for n, m in pruner.masks.items()}
        if previous is not None:  # masks only grow
            assert all(not (masks[n] & ~previous[n]).any() for n in masks)
        previous = masks
        seen.append(pruner.sparsity_report()["overall"])
    assert seen[0] < 0.5 and seen[-1] == pytest.approx(0.5)  # gradual, then the target
    for t in pruner.targets:
        assert (nonzero_per_group(t.module.weight, 4) == 2).all()


def test_a_sparsity_beyond_the_pattern_prunes_more_among_its_survivors():
    model = tiny()
    pruner = Pruner.one_shot(model, 0.75, pattern=(4, 8))
    for t in pruner.targets:
        assert (nonzero_per_group(t.module.weight, 8) <= 4).all()
    assert pruner.sparsity_report()["overall"] == pytest.approx(0.75, abs=2e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": (2, 4), "sparsity": 0.3}, "prunes at least 50%"),
        ({"pattern": (4, 4), "sparsity": 0.5}, "N < M"),
        ({"pattern": (2, 3), "sparsity": 0.7}, "3 does not divide the input features"),
        ({"pattern": (2, 4), "sparsity": 0.5, "block": 4}, "without --prune-block"),
    ],
)
def test_a_pattern_it_cannot_keep_is_refused(kwargs, message):
    sparsity = kwargs.pop("sparsity")
    with pytest.raises(SparseBertError, match=message):
        Pruner(tiny(), CubicSparsitySchedule(sparsity, 0, 4), criterion="magnitude", **kwargs)


def test_the_pattern_travels_with_the_state():
    pruner = Pruner.one_shot(tiny(), 0.5, pattern=(2, 4))
    with pytest.raises(SparseBertError, match="has the pattern"):
        Pruner(tiny(), CubicSparsitySchedule(0.5, 0, 4), criterion="magnitude").load_state_dict(pruner.state_dict())


def test_99_percent_is_allowed_with_a_warning_and_beyond_it_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="sparsebert.pruning.pruner"):
        pruner = Pruner.one_shot(tiny(), 0.99)
    assert "keep fewer weights than they have rows" in caplog.text
    assert pruner.sparsity_report()["overall"] == pytest.approx(0.99, abs=2e-3)
    with pytest.raises(SparseBertError, match="sparsity must satisfy"):
        Pruner(tiny(), CubicSparsitySchedule(0.995, 0, 4), criterion="magnitude")
