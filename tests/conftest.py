"""Shared fixtures: small numeric-task models trained once per test session."""

from __future__ import annotations

import os

import pytest
import torch

from masalign.models import RecurrentConfig, train_lm
from masalign.tasks import D0, D1, D2, NumericTask

# A shorter version of Multi-Object (counts 1..8) so that CI trains models in seconds.
SMALL_TASK = NumericTask("multi_object_small", (D0, D1, D2), max_count=8, held_out_counts=(3, 6))


@pytest.fixture(scope="session")
def small_task() -> NumericTask:
    return SMALL_TASK


@pytest.fixture(scope="session")
def trained_grus() -> dict[str, torch.nn.Module]:
    """Two GRUs (seeds 0 and 1, width 48) trained to >= 0.98 held-out accuracy."""
    # Two threads on the 2-core CI machine; fewer when OMP_NUM_THREADS says so, because two
    # processes with two threads each on two cores slow small torch ops by 10-1000x.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    models = {}
    for name, seed in (("A", 0), ("B", 1)):
        model, summary = train_lm(
            SMALL_TASK, RecurrentConfig("gru", hidden_size=48, embedding_size=32), seed=seed, steps=1500, lr=5e-3, check_every=50
        )
        assert summary.check_trial_accuracy >= 0.98, summary
        models[name] = model
    return models
