"""The numeric tasks and the count-up-count-down causal model."""

from __future__ import annotations

import pytest

from masalign.data import IGNORE_INDEX
from masalign.tasks import BOS, D0, EOS, PAD, RESPONSE, TRIGGER, get_task


def test_sequences_have_the_task_shape() -> None:
    task = get_task("multi_object")
    data = task.sample(50, seed=0, split="held_out")
    for row, labels in zip(data.inputs.tolist(), data.labels.tolist()):
        row = [t for t in row if t != PAD]
        n = row.index(TRIGGER) - 1
        assert n in task.held_out_counts
        assert row[0] == BOS and row[-1] == EOS and row[n + 2 : -1] == [RESPONSE] * n
        kept = [x for x in labels if x != IGNORE_INDEX]
        assert kept == [RESPONSE] * n + [EOS]


def test_train_split_excludes_held_out_counts() -> None:
    task = get_task("single_object")
    data = task.sample(300, seed=1, split="train")
    counts = {int((row == D0).sum()) for row in data.inputs}
    assert counts.isdisjoint(task.held_out_counts)


def test_same_object_counts_demo_tokens_that_are_response_tokens() -> None:
    task = get_task("same_object")
    states = task.states([BOS, RESPONSE, RESPONSE, TRIGGER, RESPONSE, RESPONSE, EOS])
    assert [s.count if s else None for s in states] == [None, 1, 2, None, 1, 0, None]


def test_continuation_runs_the_causal_model_on() -> None:
    task = get_task("single_object")
    base = [BOS, D0, D0, D0, TRIGGER, RESPONSE, RESPONSE, RESPONSE, EOS]
    # demo phase: count 5 at position 1, then two more demo tokens -> 7 responses
    assert task.continuation(base, 1, 5) == [BOS, D0, D0, D0, TRIGGER] + [RESPONSE] * 7 + [EOS]
    # response phase: count set to 0 -> E next
    assert task.continuation(base, 5, 0) == [BOS, D0, D0, D0, TRIGGER, RESPONSE, EOS]
    with pytest.raises(ValueError, match="holds no count"):
        task.continuation(base, 4, 1)


def test_counterfactual_pairs_label_the_counterfactual_continuation() -> None:
    task = get_task("multi_object")
    pairs = task.counterfactual_pairs(200, seed=0)
    for i in range(len(pairs)):
        base = [t for t in pairs.base_inputs[i].tolist() if t != PAD]
        source = pairs.source_inputs[i].tolist()
        p, q = int(pairs.base_positions[i, 0]), int(pairs.source_positions[i, 0])
        count = task.states(source)[q].count
        assert task.continuation(base, p, count) == base
        labels = pairs.labels[i].tolist()
        first = max(p, base.index(TRIGGER))
        assert all(labels[j] == base[j + 1] for j in range(first, len(base) - 1))
        assert all(x == IGNORE_INDEX for j, x in enumerate(labels) if j < first or j >= len(base) - 1)


def test_bad_task_arguments() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        get_task("counting")
    with pytest.raises(ValueError, match="unknown split"):
        get_task("multi_object").sample(3, split="test")


def test_void_tokens_do_not_count() -> None:
    """The reference's "_unk" sequences: voids come anywhere before T, hold no count, and every
    count, label and counterfactual is the one the plain task gives without them."""
    import dataclasses

    from masalign.tasks import VOID

    plain = get_task("multi_object")
    task = dataclasses.replace(plain, void_p=0.2)
    data = task.sample(400, seed=3, split="train")
    assert 0.15 < float((data.inputs == VOID).sum() / ((data.inputs >= D0)).sum()) < 0.25
    for row, labels in zip(data.inputs.tolist(), data.labels.tolist()):
        row = [t for t in row if t != PAD]
        trigger = row.index(TRIGGER)
        assert VOID not in row[trigger:]
        n = sum(t != VOID for t in row[1:trigger])
        assert row[trigger + 1 : -1] == [RESPONSE] * n and [x for x in labels if x != IGNORE_INDEX] == [RESPONSE] * n + [EOS]
        states = task.states(row)
        assert [s.count for s in states[1:trigger] if s] == list(range(1, n + 1))
        assert all(states[i] is None for i in range(1, trigger) if row[i] == VOID)
    pairs = task.counterfactual_pairs(300, seed=4)
    rows = zip(pairs.base_inputs.tolist(), pairs.source_inputs.tolist(), pairs.base_positions[:, 0].tolist(), pairs.source_positions[:, 0].tolist())
    for base, source, p, q in rows:
        base = [t for t in base if t != PAD]
        trigger, written = base.index(TRIGGER), task.states(source)[q].count
        # the count written at p goes on up by the demo tokens after p, voids left out, and down by each R
        if p < trigger:
            assert len(base) - trigger - 2 == written + sum(t != VOID for t in base[p + 1 : trigger])
        else:
            assert len(base) - p - 2 == written
    # plain sequences are unchanged for a given seed by the new option
    assert dataclasses.replace(task, void_p=0.0).sample(20, seed=1).inputs.equal(plain.sample(20, seed=1).inputs)
    with pytest.raises(ValueError, match="void_p"):
        dataclasses.replace(plain, void_p=1.0)
