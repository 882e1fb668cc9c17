"""Counterfactual latents (docs/method.md section 5): the search for natural states,
the CL loss, and the off-manifold diagnostics."""

from __future__ import annotations

import math

import pytest
import torch

from masalign import CounterfactualPairs, TorchModuleAdapter
from masalign.latents import (
    LatentTargets,
    cl_loss,
    find_counterfactual_latents,
    natural_latents,
    range_excess,
    symmetric_kl_histogram,
)
from masalign.models import RecurrentConfig, RecurrentLM
from masalign.tasks import CausalState


def intended_state(pairs: CounterfactualPairs, task, i: int) -> CausalState:
    base = task.states(pairs.base_inputs[i].tolist())[int(pairs.base_positions[i, 0])]
    source = task.states(pairs.source_inputs[i].tolist())[int(pairs.source_positions[i, 0])]
    return CausalState(source.count, base.phase)


# -- the search ------------------------------------------------------------------------


def test_found_latents_have_the_intended_natural_state(small_task) -> None:
    pairs = small_task.counterfactual_pairs(200, seed=1)
    pool = small_task.sample(300, seed=2, split="all").inputs
    targets = small_task.latent_targets(pairs, pool, seed=0)
    assert isinstance(targets, LatentTargets) and len(targets) == 200
    assert targets.pool_row.shape == targets.pool_position.shape == targets.found.shape == (200,)
    assert targets.n_found > 150 and targets.n_found + targets.n_missing == 200
    for i in range(200):
        if targets.found[i]:
            natural = small_task.states(pool[targets.pool_row[i]].tolist())[int(targets.pool_position[i])]
            assert natural == intended_state(pairs, small_task, i)


def test_pairs_without_a_match_are_masked_and_counted(small_task) -> None:
    pairs = small_task.counterfactual_pairs(120, seed=3)
    # a pool with only n = 2 sequences holds the states (1|2, demo) and (1|0, response)
    pool = small_task.sample(20, seed=4, split=[2]).inputs
    available = {s for row in pool.tolist() for s in small_task.states(row) if s is not None}
    assert available == {CausalState(1, "demo"), CausalState(2, "demo"), CausalState(1, "response"), CausalState(0, "response")}
    targets = small_task.latent_targets(pairs, pool)
    expected = torch.tensor([intended_state(pairs, small_task, i) in available for i in range(120)])
    assert torch.equal(targets.found, expected)
    assert 0 < targets.n_missing < 120 and targets.n_missing == int((~expected).sum())
    assert torch.all(targets.pool_row[~targets.found] == 0) and torch.all(targets.pool_position[~targets.found] == 0)


def test_the_choice_among_matches_is_seeded(small_task) -> None:
    pairs = small_task.counterfactual_pairs(100, seed=5)
    pool = small_task.sample(200, seed=6, split="all").inputs
    first = small_task.latent_targets(pairs, pool, seed=7)
    again = small_task.latent_targets(pairs, pool, seed=7)
    other = small_task.latent_targets(pairs, pool, seed=8)
    assert torch.equal(first.pool_row, again.pool_row) and torch.equal(first.pool_position, again.pool_position)
    assert not torch.equal(first.pool_row, other.pool_row)
    assert torch.equal(first.found, other.found)


def test_default_pool_is_the_pairs_own_sources(small_task) -> None:
    pairs = small_task.counterfactual_pairs(80, seed=9)
    targets = small_task.latent_targets(pairs, seed=0)
    explicit = small_task.latent_targets(pairs, pairs.source_inputs, seed=0)
    assert torch.equal(targets.pool_row, explicit.pool_row) and targets.n_found > 0


def test_a_user_supplied_state_function(small_task) -> None:
    """A coarser causal variable: count mod 4 (one of the papers' variants), whatever the phase."""
    pairs = small_task.counterfactual_pairs(60, seed=10)
    pool = small_task.sample(100, seed=11, split="all").inputs

    def count_mod_4(tokens):
        return [None if s is None else s.count % 4 for s in small_task.states(tokens)]

    targets = find_counterfactual_latents(pairs, pool, count_mod_4, seed=1)
    assert targets.n_missing == 0
    for i in range(60):
        source = small_task.states(pairs.source_inputs[i].tolist())[int(pairs.source_positions[i, 0])]
        assert count_mod_4(pool[targets.pool_row[i]].tolist())[int(targets.pool_position[i])] == source.count % 4


def test_search_errors(small_task) -> None:
    pairs = small_task.counterfactual_pairs(4, seed=0)
    two_slots = CounterfactualPairs(
        pairs.base_inputs, pairs.source_inputs, pairs.base_positions.repeat(1, 2), pairs.source_positions.repeat(1, 2), pairs.labels
    )
    with pytest.raises(ValueError, match="one intervention slot per pair; these pairs have 2 slots"):
        small_task.latent_targets(two_slots)
    with pytest.raises(TypeError, match="without 'input_ids'"):
        small_task.latent_targets(pairs, {"tokens": pairs.source_inputs})
    with pytest.raises(ValueError, match=r"must be \(N, T\) integer token ids"):
        small_task.latent_targets(pairs, pairs.source_inputs.float())


def test_natural_latents_read_the_pool_activations(small_task) -> None:
    torch.manual_seed(0)
    adapter = TorchModuleAdapter(RecurrentLM(RecurrentConfig(hidden_size=16, embedding_size=8)))
    pairs = small_task.counterfactual_pairs(20, seed=12)
    pool = small_task.sample(30, seed=13, split="all").inputs
    targets = small_task.latent_targets(pairs, pool)
    latents = natural_latents(adapter, "rnn.h_l0", pool, targets, batch_size=8)
    assert latents.shape == (20, 16) and not latents.requires_grad
    expected = adapter.activations(pool[targets.pool_row], "rnn.h_l0", targets.pool_position[:, None])[:, 0]
    assert torch.allclose(latents, expected, atol=1e-6)


# -- the loss ---------------------------------------------------------------------------


def test_cl_loss_kinds_match_hand_computations() -> None:
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    c = torch.tensor([[0.0, 1.0], [3.0, 4.0], [2.0, 2.0]])
    # squared errors per row: (1 + 1), 0, (1 + 1) -> mean over 6 elements = 4 / 6
    # cosines: 0, 1, 1 -> 1 - cosine: 1, 0, 0 -> mean 1 / 3
    assert cl_loss(a, c, "mse").item() == pytest.approx(4 / 6)
    assert cl_loss(a, c, "cosine").item() == pytest.approx(1 / 3)
    assert cl_loss(a, c).item() == pytest.approx((4 / 6 + 1 / 3) / 2)
    mask = torch.tensor([True, True, False])
    assert cl_loss(a, c, "mse", mask).item() == pytest.approx(2 / 4)
    assert cl_loss(a, c, "cosine", mask).item() == pytest.approx(1 / 2)
    # leading dimensions are rows
    assert cl_loss(a[None], c[None], "mse_cosine", mask[None]).item() == pytest.approx(cl_loss(a, c, "mse_cosine", mask).item())


def test_cl_loss_with_an_empty_mask_is_zero_and_differentiable() -> None:
    a = torch.randn(4, 3, requires_grad=True)
    loss = cl_loss(a, torch.randn(4, 3), mask=torch.zeros(4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(a.grad, torch.zeros(4, 3))


def test_cl_loss_gradient_and_errors() -> None:
    a = torch.randn(5, 3, requires_grad=True)
    cl_loss(a, torch.randn(5, 3)).backward()
    assert a.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown CL loss kind 'l1'"):
        cl_loss(a, a, "l1")
    with pytest.raises(ValueError, match="same shape"):
        cl_loss(a, torch.randn(5, 4))
    with pytest.raises(ValueError, match="one flag per row"):
        cl_loss(a, a, mask=torch.ones(4, dtype=torch.bool))


# -- diagnostics -------------------------------------------------------------------------


def test_symmetric_kl_is_zero_for_identical_samples_and_positive_and_symmetric_otherwise() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g)
    y = torch.randn(500, 4, generator=g) * 2 + 1
    assert symmetric_kl_histogram(x, x.clone()) == 0.0
    assert symmetric_kl_histogram(x, x[torch.randperm(500, generator=g)]) == pytest.approx(0.0, abs=1e-12)
    d = symmetric_kl_histogram(x, y, bins=20)
    assert d > 0.5
    assert symmetric_kl_histogram(y, x, bins=20) == pytest.approx(d)
    assert symmetric_kl_histogram(torch.ones(3, 2), torch.ones(5, 2)) == 0.0


def test_symmetric_kl_matches_a_hand_computation() -> None:
    # two bins over [0, 1]: p = (3/4, 1/4), q = (1/4, 3/4); no smoothing
    p_values, q_values = torch.tensor([0.0, 0.1, 0.2, 1.0]), torch.tensor([0.0, 0.9, 0.95, 1.0])
    expected = 2 * (0.5 * math.log(3))  # (3/4 - 1/4) log 3 + (1/4 - 3/4) log(1/3)
    assert symmetric_kl_histogram(p_values, q_values, bins=2, smoothing=0.0) == pytest.approx(expected)
    with pytest.raises(ValueError, match="non-finite"):
        symmetric_kl_histogram(torch.tensor([math.inf]), q_values)


def test_range_excess_is_zero_within_range_and_counts_natural_stds_outside() -> None:
    natural = torch.tensor([[0.0, 10.0], [1.0, 10.0], [2.0, 10.0]])  # feature 0: range [0, 2], std 1; feature 1 constant
    inside = range_excess(torch.tensor([[0.5, 10.0], [2.0, 10.0]]), natural)
    assert inside.max == 0.0 and inside.mean == 0.0
    outside = range_excess(torch.tensor([[5.0, 10.0], [-1.0, 10.0]]), natural)  # 3 stds above, 1 below
    assert outside.per_feature.tolist() == [3.0, 0.0]
    assert outside.max == 3.0 and outside.mean == 1.5
    constant_exceeded = range_excess(torch.tensor([[1.0, 10.5]]), natural)
    assert constant_exceeded.per_feature[0] == 0.0 and math.isinf(constant_exceeded.max)
    with pytest.raises(ValueError, match="intervened width 3 and natural width 2"):
        range_excess(torch.zeros(2, 3), natural)
