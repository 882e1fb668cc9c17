"""Empty slots and the stepwise (contiguous prefix) protocol, in every adapter.

A batch whose rows intervene at different numbers of positions marks the unused
slots with EMPTY_SLOT (-1). On every adapter kind, a run with empty slots equals
each row run alone at its own positions, and reads give zeros there; a fused
GRU's prefix replaced by another sequence's states continues exactly as that
sequence would; the numeric task's stepwise pairs train; and the bad inputs the
protocol invites are explained.
"""

from __future__ import annotations

import pytest
import torch
from adapter_cases import CASES, TOKENS, VOCAB, make_case
from torch import Tensor

from masalign import CounterfactualPairs, ModelAlignment, TorchModuleAdapter, fit
from masalign.adapters.base import EMPTY_SLOT
from masalign.data import IGNORE_INDEX, prefix_positions
from masalign.models import RecurrentConfig, RecurrentLM
from masalign.tasks import D0, D1, D2, EOS, TRIGGER, NumericTask

RAGGED = torch.tensor([[1, 5, EMPTY_SLOT], [7, 0, 2], [3, EMPTY_SLOT, EMPTY_SLOT]])


@pytest.mark.parametrize("name", CASES)
def test_empty_slots_are_left_alone_in_every_adapter(name: str) -> None:
    case = make_case(name)
    case.model.eval()
    inputs = case.inputs(TOKENS)
    width = case.adapter.sites()[case.site]
    direction = torch.linspace(-1, 1, width)

    def replace(hidden: Tensor, example_index: Tensor, slot_index: Tensor) -> Tensor:
        assert bool((RAGGED[example_index.cpu(), slot_index.cpu()] != EMPTY_SLOT).all())
        return hidden + direction * (1 + slot_index[:, None] + 10 * example_index[:, None])

    with torch.no_grad():
        together = case.adapter.run_with_replacement(inputs, case.site, RAGGED, replace)
        read = case.adapter.activations(inputs, case.site, RAGGED)
        for row in range(3):
            real = RAGGED[row][RAGGED[row] != EMPTY_SLOT]
            alone_inputs = case.inputs(TOKENS[row : row + 1])

            def replace_alone(hidden: Tensor, example_index: Tensor, slot_index: Tensor, row: int = row) -> Tensor:
                return hidden + direction * (1 + slot_index[:, None] + 10 * row)

            alone = case.adapter.run_with_replacement(alone_inputs, case.site, real[None], replace_alone)
            assert (together[row] - alone[0]).abs().max() < 1e-5, (name, row)
            expected = case.adapter.activations(alone_inputs, case.site, real[None])[0]
            assert (read[row, : len(real)] - expected).abs().max() < 1e-6
            assert bool((read[row, len(real) :] == 0).all())


def test_a_gru_prefix_taken_from_another_sequence_continues_as_that_sequence() -> None:
    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig(hidden_size=16, embedding_size=8, vocab_size=VOCAB)).eval()
    adapter = TorchModuleAdapter(model)
    base, source = TOKENS, TOKENS.roll(1, 0)
    ends = torch.tensor([2, 5, 0])
    positions = prefix_positions(ends)
    with torch.no_grad():
        source_states = adapter.activations(source, "rnn.h_l0", positions)
        logits = adapter.run_with_replacement(base, "rnn.h_l0", positions, lambda h, e, s: source_states[e, s])
        for row, end in enumerate(ends.tolist()):
            spliced = torch.cat([source[row, : end + 1], base[row, end + 1 :]])[None]
            assert (logits[row, end:] - model(spliced)[0, end:]).abs().max() < 1e-5


def test_stepwise_pairs_of_the_numeric_task_train() -> None:
    task = NumericTask("small", (D0, D1, D2), max_count=6, held_out_counts=(3,))
    pairs = task.counterfactual_pairs(64, seed=1, protocol="stepwise")
    ends = (pairs.base_positions != EMPTY_SLOT).sum(1) - 1
    assert torch.equal(pairs.base_positions, prefix_positions(ends, pairs.base_positions.shape[1]))
    assert torch.equal(pairs.base_positions, pairs.source_positions)
    single = task.counterfactual_pairs(64, seed=1)
    assert single.base_positions.shape[1] == 1
    torch.manual_seed(0)
    models = {name: TorchModuleAdapter(RecurrentLM(RecurrentConfig(hidden_size=16, embedding_size=8)).eval()) for name in "AB"}
    alignment = ModelAlignment(models, "rnn.h_l0", subspace_dim=4)
    result = fit(alignment, pairs, task.counterfactual_pairs(16, seed=2, protocol="stepwise"), steps=6, batch_size=16,
                 eval_every=3, standardize=True, progress=False)
    assert result.steps == 6 and all(torch.isfinite(alignment.alignments[n].mean).all() for n in "AB")
    with pytest.raises(ValueError, match="protocol"):
        task.counterfactual_pairs(4, protocol="prefix")


def _pairs(base_positions: Tensor, source_positions: Tensor, tokens: Tensor = TOKENS) -> CounterfactualPairs:
    labels = torch.full(tokens.shape, IGNORE_INDEX)
    labels[:, -1] = 1
    return CounterfactualPairs(tokens, tokens.roll(1, 0), base_positions, source_positions, labels)


def test_prefixes_that_cannot_be_paired_or_used_are_explained() -> None:
    with pytest.raises(ValueError, match="cannot be paired"):
        _pairs(prefix_positions([2, 3, 1]), prefix_positions([2, 2, 1], 4))
    with pytest.raises(ValueError, match="only empty slots"):
        _pairs(torch.tensor([[0, 1], [EMPTY_SLOT, EMPTY_SLOT], [0, EMPTY_SLOT]]), torch.tensor([[0, 1], [EMPTY_SLOT, EMPTY_SLOT], [0, EMPTY_SLOT]]))
    with pytest.raises(ValueError, match="n_slots=2 is shorter"):
        prefix_positions([4], 2)
    case = make_case("gru")
    # A prefix longer than the sequence.
    with pytest.raises(IndexError, match="outside its sequence of length 8"):
        case.adapter.run_with_replacement(TOKENS, case.site, prefix_positions([2, 8, 1]), lambda h, e, s: h)
    # A prefix that runs into padding.
    nnsight = make_case("nnsight")
    mask = torch.ones_like(TOKENS)
    mask[1, 6:] = 0
    with pytest.raises(IndexError, match="padding"):
        nnsight.adapter.run_with_replacement(nnsight.inputs(TOKENS, mask), nnsight.site, prefix_positions([2, 6, 1]), lambda h, e, s: h)
    with pytest.raises(IndexError, match="negative"):
        case.adapter.activations(TOKENS, case.site, torch.tensor([[0, -2], [1, 2], [3, 4]]))


def test_an_empty_slot_next_to_a_repeat_is_still_a_repeat() -> None:
    case = make_case("sequence")
    with pytest.raises(ValueError, match="repeats a position"):
        case.adapter.activations(TOKENS, case.site, torch.tensor([[1, 1, EMPTY_SLOT], [0, 1, 2], [3, 4, 5]]))
    # Two empty slots in one row are not a repeat.
    assert case.adapter.activations(TOKENS, case.site, torch.tensor([[1, EMPTY_SLOT, EMPTY_SLOT], [0, 1, 2], [3, 4, 5]])).shape[:2] == (3, 3)


def test_paired_activations_refuse_empty_slots() -> None:
    from masalign.compare import paired_activations

    case = make_case("sequence")
    with pytest.raises(ValueError, match="empty slots"):
        paired_activations(case.adapter, case.site, TOKENS, RAGGED)





def test_the_mod_and_round_tasks_follow_the_reference_causal_model() -> None:
    import random

    from masalign.tasks import EOS, RESPONSE, TRIGGER, get_task

    mod, rounded = get_task("multi_object_mod"), get_task("multi_object_round")
    for n in range(1, 21):
        for task, expected in ((mod, n % 4), (rounded, int(round(n / 3)) * 3)):
            sequence = task.sequence(n, random.Random(n))
            response = sequence[sequence.index(TRIGGER) + 1 :]
            assert response == [RESPONSE] * expected + [EOS], (task.name, n)
            states = task.states(sequence)
            assert [s.count for s in states[sequence.index(TRIGGER) + 1 : -1]] == list(range(expected - 1, -1, -1))
    # An interchange in the demo phase: the count goes on from the source's value, then the trigger maps it.
    base = [1, 5, 5, 5, 5, 5, TRIGGER, RESPONSE, EOS]  # n = 5: 5 mod 4 = 1
    assert mod.continuation(base, 2, 7) == [1, 5, 5, 5, 5, 5, TRIGGER] + [RESPONSE] * (10 % 4) + [EOS]
    # In the response phase a mod task's intervened count is taken mod 4, as the reference's model does.
    assert mod.continuation(base, 7, 6) == base[:8] + [RESPONSE] * 2 + [EOS]
    assert rounded.continuation([1, 5, 5, 5, 5, TRIGGER] + [RESPONSE] * 3 + [EOS], 6, 5) == [1, 5, 5, 5, 5, TRIGGER, RESPONSE] + [RESPONSE] * 5 + [EOS]
    for task in (mod, rounded):
        pairs = task.counterfactual_pairs(64, seed=3)
        assert len(pairs) == 64
    with pytest.raises(ValueError, match="not both"):
        NumericTask("x", (D0,), modulus=4, round_to=3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"demo_tokens": ()}, "demo_tokens is empty"),
        ({"demo_tokens": (D0, TRIGGER)}, r"demo token 2 is not allowed; use D0, D1, D2 or R"),
        ({"demo_tokens": (0,)}, "demo token 0 is not allowed"),
        ({"response_token": EOS}, "response token 3 is not allowed"),
        ({"max_count": 0}, "max_count must be a positive integer, got 0"),
        ({"max_count": 3, "held_out_counts": (1, 2, 3)}, r"leave no count 1..3 to train on"),
        ({"max_count": 8}, r"held_out_counts \[9, 14, 17\] are outside 1..8"),
    ],
)
def test_a_task_that_would_give_wrong_sequences_is_refused(fields, message: str) -> None:
    """A trigger among the demo tokens would end the demo phase early without an error; the others
    would fail at sampling without saying why."""
    with pytest.raises(ValueError, match=message):
        NumericTask("x", **{"demo_tokens": (D0,), **fields})


def test_a_task_without_held_out_counts_says_so_when_asked_for_them() -> None:
    task = NumericTask("x", (D0,), max_count=5, held_out_counts=())
    assert len(task.sample(4, seed=0, split="train").inputs) == 4
    with pytest.raises(ValueError, match="no held-out counts"):
        task.sample(4, seed=0, split="held_out")
