"""The Arithmetic task: sequences, the causal model's running value, and interchange pairs."""

from __future__ import annotations

import random

import pytest
import torch

from masalign.arithmetic import A_BOS, A_EOS, COMMA, EQUALS, MINUS, PLUS, ArithmeticTask
from masalign.data import IGNORE_INDEX

TASK = ArithmeticTask()


def _values(tokens: list[int]) -> list[int]:
    """The numbers after each '=' in a sequence."""
    return [TASK.value_of(tokens[i + 1]) for i, t in enumerate(tokens) if t == EQUALS]


def test_sequences_follow_the_reference_format_and_stay_in_range() -> None:
    rng = random.Random(0)
    for _ in range(200):
        tokens = TASK.sequence(rng)
        n_ops, value = TASK.value_of(tokens[1]), TASK.value_of(tokens[2])
        assert tokens[0] == A_BOS and tokens[-1] == A_EOS and len(tokens) == 3 + 5 * n_ops
        for k in range(n_ops):
            op, operand, equals, result, end = tokens[3 + 5 * k : 8 + 5 * k]
            assert op in (PLUS, MINUS) and equals == EQUALS and end == (A_EOS if k == n_ops - 1 else COMMA)
            value = value + TASK.value_of(operand) if op == PLUS else value - TASK.value_of(operand)
            assert TASK.value_of(result) == value and 0 <= value <= 20
        states = TASK.states(tokens)
        assert states[2] == TASK.value_of(tokens[2]) and states[-1] is None
        assert [states[i] for i, t in enumerate(tokens) if t == EQUALS] == _values(tokens)


def test_labels_are_the_equals_results_and_separators() -> None:
    data = TASK.sample(8, seed=1)
    for row, labels in zip(data.inputs.tolist(), data.labels.tolist()):
        predicted = [label for label in labels if label != IGNORE_INDEX]
        assert predicted and all(t in (EQUALS, COMMA, A_EOS) or TASK.value_of(t) is not None for t in predicted)
        assert predicted.count(EQUALS) == row.count(EQUALS)


def test_an_interchange_runs_the_base_operations_on_from_the_new_value() -> None:
    n, v0 = TASK.number(2), TASK.number(5)
    base = [A_BOS, n, v0, PLUS, TASK.number(3), EQUALS, TASK.number(8), COMMA, MINUS, TASK.number(4), EQUALS, TASK.number(4), A_EOS]
    assert TASK.states(base)[2:12] == [5, 5, 5, 8, 8, 8, 8, 8, 4, 4]
    # At v0: 10 + 3 = 13, 13 - 4 = 9.
    assert _values(TASK.continuation(base, 2, 10)) == [13, 9]
    # After the first operand: the pending "+ 3" applies to the new value.
    assert _values(TASK.continuation(base, 4, 1)) == [4, 0]
    # After the first "=": the result itself is the new value.
    assert _values(TASK.continuation(base, 5, 12)) == [12, 8]
    # Out of range: 2 - 4 < 0.
    assert TASK.continuation(base, 7, 2) is None


def test_counterfactual_pairs_are_consistent_with_the_causal_model() -> None:
    pairs = TASK.counterfactual_pairs(64, seed=2)
    for i in range(64):
        base = pairs.base_inputs[i].tolist()
        base = base[: base.index(A_EOS) + 1]
        source = pairs.source_inputs[i].tolist()
        p, q = int(pairs.base_positions[i, 0]), int(pairs.source_positions[i, 0])
        value = TASK.states(source)[q]
        # The base holds the counterfactual continuation: running on from the source's value reproduces it.
        assert value is not None and TASK.continuation(base, p, value) == base
        labels = pairs.labels[i]
        assert bool((labels[:p] == IGNORE_INDEX).all()) and bool((labels != IGNORE_INDEX).any())
    null = TASK.counterfactual_pairs(8, seed=2, variable="null")
    assert null.variable == "null"
    with pytest.raises(ValueError, match="variables"):
        TASK.counterfactual_pairs(4, variable="count")


def test_a_small_model_of_the_task_fits_its_vocabulary() -> None:
    from masalign.models import RecurrentConfig, RecurrentLM

    model = RecurrentLM(RecurrentConfig(hidden_size=8, embedding_size=8, vocab_size=TASK.vocab_size))
    data = TASK.sample(4)
    assert model(data.inputs).shape == (*data.inputs.shape, TASK.vocab_size) == (*data.inputs.shape, len(TASK.vocabulary()))
    assert int(data.inputs.max()) < TASK.vocab_size
    _ = torch  # tensors above
