"""One conformance suite for every adapter and kind of site.

Each check runs on the six cases of ``adapter_cases``: a fused GRU and a fused
LSTM (split recurrence), a per-step GRUCell loop, a ``(batch, seq, width)``
module (all through ``TorchModuleAdapter``), a TransformerLens
``TransformerBridge`` and an nnsight-wrapped GPT-2 built from a config. Every
model is built fresh for each test, in train mode with every parameter requiring
grad (dropout off), so that an adapter that switched a flag and left it would be
caught.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from adapter_cases import (
    CASES,
    POSITIONS,
    TOKENS,
    VOCAB,
    Case,
    identity,
    make_case,
    make_misbehaving_case,
)
from torch import Tensor, nn

from masalign.adapters import SiteError


@pytest.fixture(params=CASES)
def case(request) -> Case:
    return make_case(request.param)


def assert_close(actual: Tensor, expected: Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# -- exactness ---------------------------------------------------------------------------------


def test_writing_back_the_activation_leaves_the_logits_unchanged(case):
    with torch.no_grad():
        plain = case.adapter.logits(TOKENS)
        written_back = case.adapter.run_with_replacement(TOKENS, case.site, POSITIONS, identity)
    assert_close(written_back, plain)


def test_empty_slots_read_as_zeros_and_are_left_alone(case):
    positions = POSITIONS.clone()
    positions[0, 1] = positions[2, 0] = -1  # EMPTY_SLOT
    width = case.adapter.sites()[case.site]
    with torch.no_grad():
        hidden = case.adapter.activations(TOKENS, case.site, positions)
        full = case.adapter.activations(TOKENS, case.site, POSITIONS)
        nothing = case.adapter.activations(TOKENS, case.site, torch.full_like(POSITIONS, -1))
        assert (hidden[0, 1] == 0).all() and (hidden[2, 0] == 0).all()
        filled = torch.ones(3, 2, dtype=torch.bool)
        filled[0, 1] = filled[2, 0] = False
        assert_close(hidden[filled], full[filled])
        assert nothing.shape == (3, 2, width) and (nothing == 0).all()
        assert_close(case.adapter.run_with_replacement(TOKENS, case.site, torch.full_like(POSITIONS, -1), identity), case.adapter.logits(TOKENS))


def test_activations_are_the_rows_that_replace_receives(case):
    received = {}

    def record(hidden, example_index, slot_index):
        for row, b, j in zip(hidden, example_index.tolist(), slot_index.tolist()):
            received[b, j] = row.detach().clone()
        return hidden

    width = case.adapter.sites()[case.site]
    read = case.adapter.activations(TOKENS, case.site, POSITIONS)
    assert read.shape == (3, 2, width)
    case.adapter.run_with_replacement(TOKENS, case.site, POSITIONS, record)
    assert sorted(received) == [(b, j) for b in range(3) for j in range(2)]
    for (b, j), row in received.items():
        assert_close(read[b, j], row)


def test_a_replacement_changes_the_logits_from_its_position_on_and_not_before(case):
    positions = torch.tensor([[2], [6], [0]])
    width = case.adapter.sites()[case.site]
    shift = torch.randn(width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = case.adapter.logits(TOKENS)
        changed = case.adapter.run_with_replacement(TOKENS, case.site, positions, lambda h, e, s: h + shift)
    for b, position in enumerate(positions[:, 0].tolist()):
        assert_close(changed[b, :position], plain[b, :position])
        assert (changed[b, position] - plain[b, position]).abs().max() > 1e-4


def padded(rows: list[Tensor], side: str) -> tuple[Tensor, Tensor]:
    """(tokens, attention_mask) of ``rows`` padded with token 0 on ``side``."""
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        tokens[b, span], mask[b, span] = row, 1
    return tokens, mask


def test_a_padded_batch_gives_what_each_row_gives_alone(case):
    rows = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 8, 3)]
    own_positions = [[1, 4], [7, 0], [2, 1]]
    shift = torch.randn(case.adapter.sites()[case.site], generator=torch.Generator().manual_seed(2))

    def add_shift(h, e, s):
        return h + shift

    for side in case.padding_sides:
        tokens, mask = padded(rows, side)
        offsets = [tokens.shape[1] - len(r) if side == "left" else 0 for r in rows]
        positions = torch.tensor([[p + o for p in own] for own, o in zip(own_positions, offsets)])
        inputs = case.inputs(tokens, mask)
        with torch.no_grad():
            hidden = case.adapter.activations(inputs, case.site, positions)
            logits = case.adapter.run_with_replacement(inputs, case.site, positions, add_shift)
            for b, (row, offset) in enumerate(zip(rows, offsets)):
                own = torch.tensor([own_positions[b]])
                assert_close(hidden[b], case.adapter.activations(row[None], case.site, own)[0])
                alone = case.adapter.run_with_replacement(row[None], case.site, own, add_shift)[0]
                assert_close(logits[b, offset : offset + len(row)], alone)


def test_gradients_reach_the_alignment_through_the_model(case):
    width = case.adapter.sites()[case.site]
    rotation = nn.Parameter(torch.eye(width) + 0.1 * torch.randn(width, width, generator=torch.Generator().manual_seed(3)))
    logits = case.adapter.run_with_replacement(TOKENS, case.site, POSITIONS, lambda h, e, s: h @ rotation)
    assert logits.requires_grad
    logits.logsumexp(-1).sum().backward()
    assert rotation.grad is not None and bool(torch.isfinite(rotation.grad).all())
    assert rotation.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["gru", "lstm", "cell"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_work_at_recurrent_sites(name, dtype):
    reference = make_case(name)
    case = make_case(name)
    case.model.to(dtype)
    values = torch.randn(3, 2, case.adapter.sites()[case.site], generator=torch.Generator().manual_seed(4))

    def put_values(hidden, example_index, slot_index):  # float32 rows into a half model: cast, not refused
        return values[example_index, slot_index]

    with torch.no_grad():
        plain = case.adapter.logits(TOKENS)
        assert plain.dtype == dtype
        assert case.adapter.activations(TOKENS, case.site, POSITIONS).dtype == dtype
        assert_close(case.adapter.run_with_replacement(TOKENS, case.site, POSITIONS, identity).float(), plain.float(), atol=2e-2)
        expected = reference.adapter.run_with_replacement(TOKENS, reference.site, POSITIONS, put_values)
        assert_close(case.adapter.run_with_replacement(TOKENS, case.site, POSITIONS, put_values).float(), expected, atol=5e-2)


# -- errors ------------------------------------------------------------------------------------


def test_an_unknown_site_names_the_closest_sites(case):
    typo = case.site[:-1] + "X"
    with pytest.raises(SiteError, match=rf"no site '{typo}'.*Did you mean .*'{case.site}'"):
        case.adapter.activations(TOKENS, typo, POSITIONS)
    with pytest.raises(SiteError, match="Valid sites: "):
        case.adapter.run_with_replacement(TOKENS, "no.such.site", POSITIONS, identity)


BAD_POSITIONS = [
    (torch.tensor([1, 2, 3]), ValueError, r"positions must be \(batch, n_slots\).*positions\[:, None\]"),
    (torch.tensor([[1], [2]]), ValueError, r"must have shape \(batch=3, n_slots\); got \(2, 1\)"),
    (torch.tensor([[1.0], [2.0], [3.0]]), TypeError, "must be integer indices"),
    (torch.tensor([[1], [-2], [3]]), IndexError, "position -2 of example 1 is negative"),
    (torch.tensor([[1], [2], [8]]), IndexError, r"position 8 \(slot 0\) of example 2 is outside .* valid positions are 0\.\.7"),
    (torch.tensor([[1, 2], [3, 3], [4, 5]]), ValueError, r"example 1 repeats a position in \[3, 3\]"),
]


@pytest.mark.parametrize(("positions", "error", "message"), BAD_POSITIONS)
def test_bad_positions_are_refused_before_the_model_runs(case, positions, error, message):
    calls = []
    with pytest.raises(error, match=message):
        case.adapter.run_with_replacement(TOKENS, case.site, positions, lambda h, e, s: calls.append(1) or h)
    with pytest.raises(error, match=message):
        case.adapter.activations(TOKENS, case.site, positions)
    assert calls == []


def test_bad_masks_are_refused(case):
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 6:] = 0  # row 1 is right-padded
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 9\) but the tokens have shape \(3, 8\).*one entry per token"):
        case.adapter.run_with_replacement(case.inputs(TOKENS, torch.ones(3, 9, dtype=torch.long)), case.site, POSITIONS, identity)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(8,\)"):
        case.adapter.activations(case.inputs(TOKENS, torch.ones(8, dtype=torch.long)), case.site, POSITIONS)
    with pytest.raises(IndexError, match=r"position 7 \(slot 0\) of example 1 is padding.*positions 0\.\.5"):
        case.adapter.activations(case.inputs(TOKENS, mask), case.site, POSITIONS)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("how", ["too_few", "too_many"])
def test_a_site_that_runs_too_few_or_too_many_times_is_an_error(name, how):
    adapter, model, site = make_misbehaving_case(name)
    assert site in adapter.sites()  # probed while the model behaves
    model.misbehave = how
    calls = []

    def count(hidden, example_index, slot_index):
        calls.append(1)
        return hidden

    pattern = r"did not run|ran \d+ times|more than|a second time"
    with pytest.raises(SiteError, match=pattern):
        adapter.run_with_replacement(TOKENS, site, POSITIONS, count)
    if how == "too_few":  # too many cannot be seen by a read that stops at the site
        with pytest.raises(SiteError, match=pattern):
            adapter.activations(TOKENS, site, POSITIONS)
        assert calls == [] or name == "cell"  # the cell ran for the early positions


@pytest.mark.parametrize("name", ["cell", "sequence", "transformer_lens", "nnsight"])
def test_a_module_that_runs_too_often_is_not_a_site(name):
    adapter, model, site = make_misbehaving_case(name)
    model.misbehave = "too_many"
    assert site not in adapter.sites()
    with pytest.raises(SiteError, match=r"runs \d+ times|fires \d+ times"):
        adapter.activations(TOKENS, site, POSITIONS)


# -- nothing left behind -----------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything an adapter could leave changed on a model: hooks, forward overrides, flags."""
    modules = {
        name: (
            module.training,
            tuple(module._forward_hooks),
            tuple(module._forward_pre_hooks),
            tuple(module._backward_hooks),
            id(module.__dict__.get("forward")),
            len(getattr(module, "fwd_hooks", ())),  # TransformerLens hook points
        )
        for name, module in model.named_modules()
    }
    parameters = {name: (p.requires_grad, p.grad is None) for name, p in model.named_parameters()}
    global_hooks = tuple(torch.nn.modules.module._global_forward_hooks)
    return {"modules": modules, "parameters": parameters, "global": global_hooks, "grad": torch.is_grad_enabled()}


def raise_value_error(hidden, example_index, slot_index):
    raise ValueError("replace failed")


def raise_keyboard_interrupt(hidden, example_index, slot_index):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("replace", "raised"), [(identity, None), (raise_value_error, ValueError), (raise_keyboard_interrupt, KeyboardInterrupt)]
)
def test_nothing_is_left_on_the_model_after_success_an_error_or_ctrl_c(case, replace, raised):
    def all_flags_on() -> bool:
        return all(m.training for m in case.model.modules()) and all(p.requires_grad for p in case.model.parameters())

    assert all_flags_on()
    case.adapter.sites()  # wrappers that the backend installs once (nnsight) belong to the baseline
    assert all_flags_on()  # the probing run switched to eval mode and back
    before = snapshot(case.model)
    case.adapter.activations(TOKENS, case.site, POSITIONS)
    if raised is None:
        case.adapter.run_with_replacement(TOKENS, case.site, POSITIONS, replace)
    else:
        with pytest.raises(raised):
            case.adapter.run_with_replacement(TOKENS, case.site, POSITIONS, replace)
    assert snapshot(case.model) == before
    # and the adapter still works
    with torch.no_grad():
        assert_close(case.adapter.run_with_replacement(TOKENS, case.site, POSITIONS, identity), case.adapter.logits(TOKENS))
    assert snapshot(case.model) == before and all_flags_on()
