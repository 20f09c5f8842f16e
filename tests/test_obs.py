"""The second-order criterion (obs, oBERT's Optimal Brain Surgeon): its update against the exact answer of a
quadratic, its Fisher inverse against a dense solve, its state through a resume."""

from __future__ import annotations

import pytest
import torch

from sparsebert.errors import SparseBertError
from sparsebert.pruning import CubicSparsitySchedule, Pruner
from sparsebert.pruning.criteria import OBS, obs_update
from tests.test_pruning import _train_steps, tiny


def spd(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T + 0.5 * torch.eye(n, dtype=torch.float64)


def test_the_obs_update_is_the_exact_minimiser_on_a_quadratic():
    """L(w) = ½ (w - w0)ᵀ H (w - w0) is least at w0; zeroing the set Q costs least when the others move by
    δ_R = -H_RR⁻¹ H_RQ δ_Q (δ_Q = -w0_Q): what obs_update gives from H⁻¹, block by block."""
    blocks, n = 3, 6
    hessians = torch.stack([spd(n, seed) for seed in range(blocks)])
    w0 = torch.randn(blocks, n, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    pruned = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    delta = obs_update(w0, pruned, torch.linalg.inv(hessians))
    for b in range(blocks):
        q, r = pruned[b], ~pruned[b]
        h = hessians[b]
        expected = torch.zeros(n, dtype=torch.float64)
        expected[q] = -w0[b, q]
        expected[r] = -torch.linalg.solve(h[r][:, r], h[r][:, q] @ expected[q])
        assert torch.allclose(delta[b], expected, atol=1e-10)
        assert torch.allclose((w0[b] + delta[b])[q], torch.zeros(int(q.sum()), dtype=torch.float64), atol=1e-12)
        cost = 0.5 * delta[b] @ h @ delta[b]  # no other δ with δ_Q = -w0_Q costs less
        other = expected.clone()
        other[r] += 1e-3
        assert cost < 0.5 * other @ h @ other


def test_the_fisher_inverse_is_the_damped_average_of_the_gradients_inverted():
    model = tiny()
    obs = OBS(Pruner(model, CubicSparsitySchedule(0.5, 0, 10), criterion="magnitude").targets, fisher_block=8,
              fisher_gradients=4, fisher_damp=0.05)  # fmt: skip
    target = obs.targets[0]
    weight = target.module.weight
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(weight.shape, generator=gen) for _ in range(3)]
    for g in grads:
        weight.grad = g
        obs.observed = 0 if g is grads[0] else len(obs.targets)  # as if every matrix saw each pass
        obs.observe(target.name, weight)
    m = 1 - 1 / 4
    block = [g.reshape(-1, 8)[5].double() for g in grads]  # one block of the matrix
    fisher = torch.outer(block[0], block[0])
    for g in block[1:]:
        fisher = m * fisher + (1 - m) * torch.outer(g, g)
    damped = fisher + 0.05 * fisher.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    got, expected = obs.inverse(target.name)[5], torch.linalg.inv(damped)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()  # F is kept in fp32


def test_obs_prunes_to_the_target_and_its_state_resumes_exactly():
    def make():
        model = tiny()
        return model, Pruner(model, CubicSparsitySchedule(0.75, 0, 6, num_updates=3), criterion="obs", fisher_block=8)

    model, pruner = make()
    _train_steps(model, pruner, 3)
    state = pruner.state_dict()
    other_model, restored = make()
    other_model.load_state_dict(model.state_dict())
    restored.load_state_dict(state)
    assert all(torch.equal(restored.scorer.fisher[n], f) for n, f in pruner.scorer.fisher.items())
    for m, p in ((model, pruner), (other_model, restored)):
        torch.manual_seed(1)  # the same dropout on both sides
        _train_steps(m, p, 3, seed=1)
    assert all(torch.equal(pruner.masks[n], restored.masks[n]) for n in pruner.masks)
    assert pruner.sparsity_report()["overall"] == pytest.approx(0.75, abs=1e-3)
    assert pruner.scorer.nbytes() == sum(4 * 8 * t.module.weight.numel() for t in pruner.targets)


def test_obs_moves_the_survivors_of_a_block_it_prunes_and_leaves_the_others():
    """At a mask update the weights that stay in a block where some were removed take the OBS update; a
    block that lost nothing keeps its weights."""
    model = tiny()
    pruner = Pruner(model, CubicSparsitySchedule(0.5, 0, 1, num_updates=1), criterion="obs", fisher_block=8)
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    before = {t.name: t.module.weight.detach().clone() for t in pruner.targets}
    pruner.step()
    moved = untouched = 0
    for t in pruner.targets:
        kept = pruner.masks[t.name].reshape(-1, 8)
        changed = (t.module.weight.detach() != before[t.name]).reshape(-1, 8) & kept
        lost = (~kept).any(dim=1)
        assert not changed[~lost].any()  # blocks that lost nothing: untouched
        moved += int(changed[lost].any(dim=1).sum())
        untouched += int((~lost).sum())
    assert moved > 0 and untouched > 0  # both kinds of block were there to check


def test_obs_refuses_a_block_that_does_not_divide_the_rows():
    with pytest.raises(SparseBertError, match="--fisher-block 32 does not divide"):
        Pruner(tiny(), CubicSparsitySchedule(0.5, 0, 1), criterion="obs")  # 16 and 40 inputs


def test_a_mask_update_keeps_no_inverse_after_it():
    """The fp64 inverses (twice the Fisher's memory) live from an update's scores to its weight moves only."""
    model = tiny()
    pruner = Pruner(model, CubicSparsitySchedule(0.5, 0, 1, num_updates=1), criterion="obs", fisher_block=8)
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    pruner.step()
    assert pruner.scorer.inverses == {}
