"""Correlational measures beside MAS, through the adapters."""

from __future__ import annotations

import pytest
import torch

from masalign import TorchModuleAdapter
from masalign.compare import Comparison, paired_activations, side_by_side
from masalign.evaluate import IIAReport
from masalign.similarity import DSA, linear_cka


def test_side_by_side_reads_paired_activations_and_adds_iia(trained_grus, small_task) -> None:
    a = TorchModuleAdapter(trained_grus["A"], name="A")
    b = TorchModuleAdapter(trained_grus["B"], name="B")
    data = small_task.sample(120, seed=7, split="all")
    positions = torch.tensor([[1, 2]] * 120)  # two demo positions: counts 1 and 2
    x = paired_activations(a, "rnn.h_l0", data.inputs, positions)
    assert x.shape == (240, 48)
    expected = trained_grus["A"].rnn(trained_grus["A"].embedding(data.inputs))[0][:, 1:3].reshape(-1, 48)
    assert torch.allclose(x, expected, atol=1e-6)

    report = IIAReport(["A", "B"], {"A": "rnn.h_l0", "B": "rnn.h_l0"}, {"count": 8}, "count", 10,
                       iia={"A": {"A": 0.9, "B": 0.8}, "B": {"A": 0.7, "B": 0.95}}, iia_token={"A": {}, "B": {}})
    trajectories = small_task.sample(20, seed=8, split=[8])
    comparison = side_by_side(
        a, "rnn.h_l0", b, "rnn.h_l0", data.inputs, positions, iia=report,
        dsa=DSA(n_delays=3, rank=6, iters=100, n_restarts=1), trajectory_inputs=trajectories.inputs,
        trajectory_positions=torch.arange(18).repeat(20, 1),
    )
    y = paired_activations(b, "rnn.h_l0", data.inputs, positions)
    assert comparison.measures["cka_linear"] == pytest.approx(linear_cka(x.double(), y.double()), abs=1e-9)
    assert comparison.measures["dsa_angular"] >= 0
    row = comparison.row()
    assert row["mas_cross_iia_mean"] == pytest.approx(0.75)
    assert row["iia A->B"] == 0.8 and comparison.n_samples == 240
    without_mas = Comparison(("A", "B"), ("rnn.h_l0", "rnn.h_l0"), 240, comparison.measures).row()
    assert "mas_cross_iia_mean" not in without_mas  # no NaN standing in for a missing report


def test_dsa_needs_trajectories(trained_grus, small_task) -> None:
    a = TorchModuleAdapter(trained_grus["A"])
    data = small_task.sample(10, seed=7)
    with pytest.raises(ValueError, match="trajectory_inputs"):
        side_by_side(a, "rnn.h_l0", a, "rnn.h_l0", data.inputs, torch.ones(10, 1, dtype=torch.long), dsa=DSA())
