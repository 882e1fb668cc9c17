"""Pairs across tasks: the count of Multi-Object against the cumulative value of Arithmetic."""

from __future__ import annotations

import pytest
import torch

from masalign import ModelAlignment, TorchModuleAdapter, evaluate, fit
from masalign.arithmetic import ArithmeticTask
from masalign.cross_task import cross_task_pairs, source_values
from masalign.models import RecurrentConfig, RecurrentLM
from masalign.tasks import VOCAB_SIZE, get_task

TASKS = {"counter": get_task("multi_object"), "adder": ArithmeticTask()}


def test_views_agree_on_the_transplanted_value_pair_by_pair() -> None:
    views = cross_task_pairs(TASKS, 300, seed=5)
    assert {view.variable for view in views.values()} == {"count=value"} and all(len(v) == 300 for v in views.values())
    counts, values = source_values(TASKS["counter"], views["counter"]), source_values(TASKS["adder"], views["adder"])
    assert counts == values and len(set(counts)) > 10
    # each view keeps its own task's labels: the counter's response has as many R tokens as the written count implies
    again = cross_task_pairs(TASKS, 300, seed=5)
    assert torch.equal(again["adder"].labels, views["adder"].labels)
    assert not torch.equal(cross_task_pairs(TASKS, 300, seed=6)["adder"].labels[:, :10], views["adder"].labels[:, :10])


def test_a_cross_task_alignment_trains_and_evaluates() -> None:
    torch.manual_seed(0)
    models = {
        "counter": TorchModuleAdapter(RecurrentLM(RecurrentConfig("gru", 16, 8, vocab_size=VOCAB_SIZE)).eval(), name="counter"),
        "adder": TorchModuleAdapter(RecurrentLM(RecurrentConfig("gru", 16, 8, vocab_size=ArithmeticTask().vocab_size)).eval(), name="adder"),
    }
    train, test = cross_task_pairs(TASKS, 64, seed=1), cross_task_pairs(TASKS, 32, seed=2)
    alignment = ModelAlignment(models, "rnn.h_l0", {"count=value": 4}, seed=0)
    result = fit(alignment, train, test, steps=2, batch_size=16, eval_every=1, progress=False)
    report = evaluate(alignment, test)
    assert result.steps == 2 and set(report.iia) == {"counter", "adder"}


def test_cross_task_pairs_explain_what_they_cannot_do() -> None:
    with pytest.raises(ValueError, match="at least two"):
        cross_task_pairs({"counter": TASKS["counter"]}, 10)
    with pytest.raises(ValueError, match="could match only"):
        cross_task_pairs(TASKS, 5000, max_draws=1)
    for max_draws in (0, -1):
        with pytest.raises(ValueError, match=f"max_draws must be a positive integer .*got {max_draws}"):
            cross_task_pairs(TASKS, 10, max_draws=max_draws)
