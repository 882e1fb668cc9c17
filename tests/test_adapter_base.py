"""The checks and row operations that every adapter shares (adapters/base.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from masalign.adapters import NNsightAdapter, SiteError, TorchModuleAdapter, TransformerLensAdapter
from masalign.adapters.base import (
    RowReplacementHook,
    check_positions,
    check_positions_for,
    gather_rows,
    logits_from_output,
    replace_rows,
)

ACTIVATION = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
POSITIONS = torch.tensor([[4, 1], [0, 2]])


def test_every_adapter_is_exported_from_the_package():
    import masalign.adapters as adapters
    from masalign.adapters import nnsight, torch_module, transformer_lens

    assert {"TorchModuleAdapter", "TransformerLensAdapter", "NNsightAdapter"} <= set(adapters.__all__)
    assert TorchModuleAdapter is torch_module.TorchModuleAdapter
    assert TransformerLensAdapter is transformer_lens.TransformerLensAdapter
    assert NNsightAdapter is nnsight.NNsightAdapter


def test_positions_are_checked_for_shape_range_and_repeats():
    assert check_positions(torch.tensor([[1], [2]], dtype=torch.int32), 2, 5).dtype == torch.long
    with pytest.raises(ValueError, match=r"positions\[:, None\]"):
        check_positions(torch.tensor([1, 2]), 2, 5)
    with pytest.raises(TypeError, match="integer indices"):
        check_positions(torch.tensor([[1.0], [2.0]]), 2, 5)
    with pytest.raises(IndexError, match="is negative"):
        check_positions(torch.tensor([[1], [-2]]), 2, 5)
    # -1 is an empty slot (EMPTY_SLOT): accepted, and never a repeat or padding.
    assert check_positions(torch.tensor([[1, -1, -1], [2, 3, -1]]), 2, 5, attention_mask=torch.tensor([[1] * 5, [1] * 4 + [0]])).shape == (2, 3)
    with pytest.raises(IndexError, match=r"position 5 \(slot 0\) of example 1 is outside its sequence of length 5"):
        check_positions(torch.tensor([[1], [5]]), 2, 5)
    with pytest.raises(IndexError, match="outside its sequence of length 3"):
        check_positions(torch.tensor([[1], [3]]), 2, 5, lengths=torch.tensor([5, 3]))
    with pytest.raises(ValueError, match=r"example 1 repeats a position in \[3, 3\]"):
        check_positions(torch.tensor([[1, 2], [3, 3]]), 2, 5)


def test_positions_on_padding_name_the_real_tokens_on_either_side():
    left_padded = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    check_positions(torch.tensor([[2], [0]]), 2, 5, attention_mask=left_padded)
    with pytest.raises(IndexError, match=r"position 1 \(slot 0\) of example 0 is padding.*positions 2\.\.4"):
        check_positions(torch.tensor([[1], [0]]), 2, 5, attention_mask=left_padded)
    right_padded = left_padded.flip(1)
    with pytest.raises(IndexError, match=r"position 3 \(slot 1\) of example 0 is padding.*positions 0\.\.2"):
        check_positions(torch.tensor([[0, 3], [0, 4]]), 2, 5, attention_mask=right_padded)


def test_positions_for_inputs_take_the_inputs_shape():
    tokens = torch.zeros(2, 4, dtype=torch.long)
    assert check_positions_for(tokens, [[3], [0]]).tolist() == [[3], [0]]
    with pytest.raises(IndexError, match="length 4"):
        check_positions_for(tokens, [[4], [0]])


def test_gather_rows_reads_each_slot_and_flattens_features():
    rows = gather_rows(ACTIVATION, POSITIONS, "site")
    assert rows.shape == (2, 2, 3)
    assert torch.equal(rows[0, 0], ACTIVATION[0, 4]) and torch.equal(rows[1, 1], ACTIVATION[1, 2])
    per_head = ACTIVATION.reshape(2, 5, 3, 1)
    assert torch.equal(gather_rows(per_head, POSITIONS, "site"), rows)
    with pytest.raises(SiteError, match=r"site 'x' gave an activation of shape \(2, 5\) for 2 examples"):
        gather_rows(ACTIVATION[..., 0], POSITIONS, "x")


def test_replace_rows_is_out_of_place_and_writes_only_the_chosen_rows():
    original = ACTIVATION.clone()
    seen = {}

    def negate(rows, example_index, slot_index):
        seen["example"], seen["slot"] = example_index.tolist(), slot_index.tolist()
        return -rows

    new = replace_rows(ACTIVATION, POSITIONS, negate, "site")
    assert torch.equal(ACTIVATION, original)
    assert seen == {"example": [0, 0, 1, 1], "slot": [0, 1, 0, 1]}
    changed = (new != ACTIVATION).any(-1)
    assert changed.tolist() == [[False, True, False, False, True], [True, False, True, False, False]]
    assert torch.equal(new[0, 4], -ACTIVATION[0, 4])


def test_replace_rows_refuses_a_result_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"shape \(n_rows, width\) = \(4, 3\) at 'site', got \(4, 2\)"):
        replace_rows(ACTIVATION, POSITIONS, lambda h, e, s: h[:, :2], "site")
    with pytest.raises(ValueError, match="got list"):
        replace_rows(ACTIVATION, POSITIONS, lambda h, e, s: [0.0], "site")


def test_gradients_flow_through_replace_rows_to_the_replacement():
    shift = nn.Parameter(torch.zeros(3))
    replace_rows(ACTIVATION, POSITIONS, lambda h, e, s: h + shift, "site").sum().backward()
    assert shift.grad.tolist() == [4.0, 4.0, 4.0]


def test_a_row_replacement_hook_fires_once_and_checks_that_gradients_reach_the_logits():
    model = nn.Linear(3, 3)
    scale = nn.Parameter(torch.ones(3))
    hook = RowReplacementHook(POSITIONS, lambda h, e, s: h * scale, "site", model, "model A")
    new = hook(ACTIVATION)
    assert hook.rows_require_grad and new.requires_grad
    hook.check_gradient_reached(new)
    with pytest.raises(RuntimeError, match="model A: the replacement at 'site' requires grad but the logits do not"):
        hook.check_gradient_reached(new.detach())
    with pytest.raises(SiteError, match="reached a second time"):
        hook(ACTIVATION)


def test_a_row_replacement_hook_refuses_inference_weights_only_when_training():
    with torch.inference_mode():
        model = nn.Linear(3, 3)
    scale = nn.Parameter(torch.ones(3))
    RowReplacementHook(POSITIONS, lambda h, e, s: h * 2.0, "site", model, "m")(ACTIVATION)
    with pytest.raises(RuntimeError, match="m: its weights are inference tensors"):
        RowReplacementHook(POSITIONS, lambda h, e, s: h * scale, "site", model, "m")(ACTIVATION)


def test_logits_are_found_in_common_output_types():
    logits = torch.zeros(1, 2, 3)
    assert logits_from_output(logits, "A") is logits
    assert logits_from_output((logits, None), "A") is logits
    assert logits_from_output(type("Output", (), {"logits": logits})(), "A") is logits
    with pytest.raises(TypeError, match="pass logits_fn=... to SomeAdapter"):
        logits_from_output({"x": 1}, "SomeAdapter")
