"""TransformerLensAdapter on TransformerLens 4's bridge and on a plain HookedRootModule."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from transformer_fixtures import (
    TinyHookedTransformer,
    freeze,
    gpt2_from_folder,
    gpt2_through_transformer_lens,
    save_tiny_gpt2,
    tiny_tl_transformer,
)

from masalign.adapters import ModelAdapter, SiteError
from masalign.adapters.transformer_lens import TransformerLensAdapter

D_VOCAB = 12


@pytest.fixture(scope="module")
def bridge():
    return freeze(tiny_tl_transformer(d_vocab=D_VOCAB, seed=0))


@pytest.fixture(scope="module")
def adapter(bridge):
    return TransformerLensAdapter(bridge)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, D_VOCAB, (4, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hooked():
    model = freeze(TinyHookedTransformer(d_vocab=D_VOCAB, seed=0))
    return model, TransformerLensAdapter(model)


def identity(hidden, example_index, slot_index):
    return hidden


def no_hooks_left(model) -> bool:
    return all(not hook_point.fwd_hooks and not hook_point._forward_hooks for hook_point in model.hook_dict.values())


def test_importing_masalign_and_the_adapters_does_not_import_transformer_lens():
    code = (
        "import sys, masalign, masalign.adapters.transformer_lens; "
        "from masalign.adapters import TransformerLensAdapter; "
        "assert 'transformer_lens' not in sys.modules, 'transformer_lens was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_is_a_model_adapter(adapter, bridge):
    assert isinstance(adapter, ModelAdapter)
    assert adapter.model is bridge
    assert adapter.device == torch.device("cpu")


def test_sites_are_hook_names_with_widths(adapter):
    sites = adapter.sites()
    assert sites["blocks.1.hook_resid_post"] == 128
    assert sites["blocks.1.hook_out"] == 128  # the bridge's canonical name for the same hook
    assert sites["hook_embed"] == 128
    assert sites["blocks.0.mlp.hook_post"] == 512
    assert sites["blocks.0.attn.hook_z"] == 128  # (batch, seq, 1 head, 128) flattened
    assert "blocks.0.attn.hook_pattern" not in sites
    assert "blocks.0.hook_mlp_in" not in sites  # behind cfg.use_hook_mlp_in
    assert "embed.hook_in" not in sites  # token ids, not an activation


@pytest.mark.parametrize(
    "site", ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"]
)
def test_activations_are_the_cached_activations_at_per_example_positions(adapter, bridge, tokens, site):
    positions = torch.tensor([[0, 3], [5, 1], [8, 2], [4, 7]])
    hidden = adapter.activations(tokens, site, positions)
    _, cache = bridge.run_with_cache(tokens)
    expected = cache[site].reshape(tokens.shape[0], tokens.shape[1], -1)
    assert hidden.shape == (4, 2, adapter.sites()[site])
    for b in range(4):
        for j in range(2):
            torch.testing.assert_close(hidden[b, j], expected[b, positions[b, j]], atol=1e-6, rtol=0)


def test_activations_stop_the_forward_pass_at_the_site(adapter, bridge, tokens):
    later_block_calls = []
    handle = bridge.blocks[1].register_forward_hook(lambda *args: later_block_calls.append(1))
    try:
        adapter.activations(tokens, "blocks.0.hook_resid_post", torch.zeros(4, 1, dtype=torch.long))
        assert later_block_calls == []
        adapter.logits(tokens)
        assert later_block_calls == [1]
    finally:
        handle.remove()
    assert no_hooks_left(bridge)


@pytest.mark.parametrize(
    "site",
    ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post", "ln_final.hook_normalized"],
)
def test_writing_back_the_activation_leaves_the_logits_unchanged(adapter, tokens, site):
    positions = torch.tensor([[0, 3], [5, 1], [8, 2], [4, 7]])
    torch.testing.assert_close(
        adapter.run_with_replacement(tokens, site, positions, identity), adapter.logits(tokens), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("site", ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.attn.hook_z"])
def test_a_replacement_changes_logits_at_its_position_and_not_before(adapter, tokens, site):
    positions = torch.tensor([[2], [5], [0], [8]])
    shift = torch.randn(adapter.sites()[site], generator=torch.Generator().manual_seed(0))
    changed = adapter.run_with_replacement(tokens, site, positions, lambda hidden, e, s: hidden + shift)
    plain = adapter.logits(tokens)
    for b, position in enumerate(positions[:, 0].tolist()):
        torch.testing.assert_close(changed[b, :position], plain[b, :position], atol=1e-6, rtol=0)
        assert (changed[b, position] - plain[b, position]).abs().max() > 1e-4


def test_gradients_reach_the_replacement_parameters_and_not_the_frozen_model(adapter, bridge, tokens):
    scale = nn.Parameter(torch.ones(128))
    logits = adapter.run_with_replacement(
        tokens, "blocks.0.hook_resid_post", torch.tensor([[1], [2], [3], [4]]), lambda hidden, e, s: hidden * scale
    )
    logits.logsumexp(-1).sum().backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0
    assert all(p.grad is None for p in bridge.parameters())


def test_replacement_receives_example_and_slot_indices(adapter, tokens):
    seen = {}

    def record(hidden, example_index, slot_index):
        seen["example"], seen["slot"] = example_index.tolist(), slot_index.tolist()
        return hidden

    adapter.run_with_replacement(tokens, "hook_embed", torch.tensor([[0, 3], [5, 1], [8, 2], [4, 7]]), record)
    assert seen == {"example": [0, 0, 1, 1, 2, 2, 3, 3], "slot": [0, 1, 0, 1, 0, 1, 0, 1]}


def padded(rows: list[torch.Tensor], side: str, pad: int = 0) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[b, span], mask[b, span] = row, 1
    return {"input": ids, "attention_mask": mask}


@pytest.mark.parametrize("side", ["left", "right"])
def test_per_example_positions_in_a_padded_batch_match_unpadded_runs(adapter, side):
    rows = [torch.randint(0, D_VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 7)]
    batch = padded(rows, side)
    offsets = [batch["input"].shape[1] - len(r) if side == "left" else 0 for r in rows]
    own_positions = [[1, 4], [8, 0], [6, 3]]
    positions = torch.tensor([[p + offset for p in own] for own, offset in zip(own_positions, offsets)])
    shift = torch.randn(128, generator=torch.Generator().manual_seed(0))

    hidden = adapter.activations(batch, "blocks.1.hook_resid_post", positions)
    logits = adapter.run_with_replacement(batch, "blocks.0.hook_resid_post", positions, lambda h, e, s: h + shift)
    for b, (row, offset) in enumerate(zip(rows, offsets)):
        alone = row[None]
        own = torch.tensor([own_positions[b]])
        alone_hidden = adapter.activations(alone, "blocks.1.hook_resid_post", own)[0]
        torch.testing.assert_close(hidden[b], alone_hidden, atol=1e-5, rtol=0)
        expected = adapter.run_with_replacement(alone, "blocks.0.hook_resid_post", own, lambda h, e, s: h + shift)[0]
        torch.testing.assert_close(logits[b, offset : offset + len(row)], expected, atol=1e-5, rtol=0)


def test_positions_on_padding_or_past_the_end_are_refused(adapter):
    rows = [torch.arange(3), torch.arange(6)]
    with pytest.raises(IndexError, match=r"position 1 .* example 0 is padding.*positions 3\.\.5"):
        adapter.activations(padded(rows, "left"), "hook_embed", torch.tensor([[1], [2]]))
    with pytest.raises(IndexError, match=r"position 4 .* example 0 is padding.*positions 0\.\.2"):
        adapter.run_with_replacement(padded(rows, "right"), "hook_embed", torch.tensor([[4], [2]]), identity)
    with pytest.raises(IndexError, match="outside its sequence of length 6"):
        adapter.activations(padded(rows, "right"), "hook_embed", torch.tensor([[0], [6]]))
    with pytest.raises(ValueError, match="repeats a position"):
        adapter.activations(torch.zeros(2, 6, dtype=torch.long), "hook_embed", torch.tensor([[1, 1], [2, 3]]))


def test_an_unknown_site_names_close_matches(adapter, tokens):
    with pytest.raises(SiteError, match=r"no site 'blocks\.0\.hook_resid_pots'.*Did you mean 'blocks\.0\.hook_resid_post'"):
        adapter.activations(tokens, "blocks.0.hook_resid_pots", torch.zeros(4, 1, dtype=torch.long))


def test_a_flag_gated_site_names_its_flag_until_the_flag_is_on(tokens):
    bridge = freeze(tiny_tl_transformer(d_vocab=D_VOCAB, seed=0))
    adapter = TransformerLensAdapter(bridge)
    positions = torch.zeros(4, 1, dtype=torch.long)
    with pytest.raises(SiteError, match=r"cfg\.use_hook_mlp_in.*set_use_hook_mlp_in\(True\)"):
        adapter.run_with_replacement(tokens, "blocks.0.hook_mlp_in", positions, identity)
    bridge.set_use_hook_mlp_in(True)
    assert adapter.sites()["blocks.0.hook_mlp_in"] == 128
    logits = adapter.run_with_replacement(tokens, "blocks.0.hook_mlp_in", positions, identity)
    torch.testing.assert_close(logits, adapter.logits(tokens), atol=1e-6, rtol=0)


def test_a_hook_that_never_fires_is_a_clear_error(adapter, tokens):
    # The native model applies rotary inside its attention, not through hook_rot_q.
    with pytest.raises(SiteError, match="did not fire"):
        adapter.activations(tokens, "blocks.0.attn.hook_rot_q", torch.zeros(4, 1, dtype=torch.long))


def test_attention_patterns_are_not_sites(adapter, tokens):
    with pytest.raises(SiteError, match="not indexed by position"):
        adapter.activations(tokens, "blocks.0.attn.hook_pattern", torch.zeros(4, 1, dtype=torch.long))


def test_a_replacement_of_the_wrong_shape_is_refused_and_no_hook_is_left_behind(adapter, bridge, tokens):
    positions = torch.zeros(4, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"shape \(n_rows, width\) = \(4, 128\)"):
        adapter.run_with_replacement(tokens, "blocks.0.hook_resid_post", positions, lambda h, e, s: h[:, :3])
    assert no_hooks_left(bridge)


def test_only_transformer_lens_models_are_accepted():
    with pytest.raises(TypeError, match="TorchModuleAdapter"):
        TransformerLensAdapter(nn.Linear(3, 3))


def test_evaluation_under_inference_mode_gives_the_same_logits(adapter, tokens):
    positions = torch.tensor([[1], [2], [3], [4]])
    shift = torch.randn(128, generator=torch.Generator().manual_seed(3))
    expected = adapter.run_with_replacement(tokens, "blocks.0.hook_resid_post", positions, lambda h, e, s: h + shift)
    with torch.inference_mode():
        logits = adapter.run_with_replacement(tokens, "blocks.0.hook_resid_post", positions, lambda h, e, s: h + shift)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)


def test_training_through_a_model_loaded_under_inference_mode_is_a_clear_error(tokens):
    with torch.inference_mode():
        bridge = tiny_tl_transformer(d_vocab=D_VOCAB, seed=0)
    adapter = TransformerLensAdapter(freeze(bridge))
    scale = nn.Parameter(torch.ones(128))
    with pytest.raises(RuntimeError, match="inference tensors"):
        adapter.run_with_replacement(tokens, "hook_embed", torch.zeros(4, 1, dtype=torch.long), lambda h, e, s: h * scale)


# -- a HookedRootModule written like HookedTransformer: the duck-typed path -------------------


def test_a_hooked_root_module_has_its_hook_names_as_sites(hooked):
    model, adapter = hooked
    sites = adapter.sites()
    assert sites["hook_embed"] == 32
    assert sites["blocks.1.hook_resid_post"] == 32
    assert sites["blocks.0.attn.hook_z"] == 32  # 2 heads of 16
    assert "blocks.0.attn.hook_pattern" not in sites and "hook_unused" not in sites


def test_a_hooked_root_module_replacement_is_exact_and_causal(hooked):
    model, adapter = hooked
    tokens = torch.randint(0, D_VOCAB, (3, 8), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([[1], [4], [6]])
    plain = adapter.logits(tokens)
    written_back = adapter.run_with_replacement(tokens, "blocks.0.attn.hook_z", positions, identity)
    torch.testing.assert_close(written_back, plain, atol=1e-6, rtol=0)
    shift = torch.randn(32, generator=torch.Generator().manual_seed(0))
    changed = adapter.run_with_replacement(tokens, "blocks.0.attn.hook_z", positions, lambda h, e, s: h + shift)
    for b, position in enumerate(positions[:, 0].tolist()):
        torch.testing.assert_close(changed[b, :position], plain[b, :position], atol=1e-6, rtol=0)
        assert (changed[b, position] - plain[b, position]).abs().max() > 1e-4
    _, cache = model.run_with_cache(tokens)
    hidden = adapter.activations(tokens, "blocks.0.attn.hook_z", positions)
    torch.testing.assert_close(hidden[:, 0], cache["blocks.0.attn.hook_z"][torch.arange(3), positions[:, 0]].reshape(3, 32))


def test_a_hooked_root_module_left_padded_batch_matches_unpadded_runs(hooked):
    _, adapter = hooked
    rows = [torch.randint(0, D_VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 7)]
    batch = padded(rows, "left")
    hidden = adapter.activations(batch, "blocks.1.hook_resid_post", torch.tensor([[3 + 2], [5]]))
    for b, own_position in enumerate([2, 5]):
        alone = adapter.activations(rows[b][None], "blocks.1.hook_resid_post", torch.tensor([[own_position]]))
        torch.testing.assert_close(hidden[b], alone[0], atol=1e-5, rtol=0)


def test_a_hooked_root_module_gated_and_silent_hooks_are_clear_errors(hooked):
    model, adapter = hooked
    tokens = torch.zeros(2, 5, dtype=torch.long)
    positions = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(SiteError, match=r"use_hook_mlp_in"):
        adapter.activations(tokens, "blocks.0.hook_mlp_in", positions)
    with pytest.raises(SiteError, match="did not fire"):
        adapter.activations(tokens, "hook_unused", positions)
    model.set_use_hook_mlp_in(True)
    try:
        assert adapter.activations(tokens, "blocks.0.hook_mlp_in", positions).shape == (2, 1, 32)
    finally:
        model.set_use_hook_mlp_in(False)


# -- a local Hugging Face folder ---------------------------------------------------------------


def test_a_local_gpt2_folder_loads_through_the_bridge_with_the_same_logits(tmp_path):
    folder = save_tiny_gpt2(tmp_path / "gpt2")
    tokens = torch.randint(4, 48, (2, 10), generator=torch.Generator().manual_seed(0))
    adapter = TransformerLensAdapter(freeze(gpt2_through_transformer_lens(folder)))
    with torch.no_grad():
        expected = gpt2_from_folder(folder)(tokens).logits
    torch.testing.assert_close(adapter.logits(tokens), expected, atol=1e-5, rtol=0)
    assert adapter.sites()["blocks.1.hook_resid_post"] == 64
    assert adapter.sites()["blocks.0.attn.hook_z"] == 64  # 2 heads of 32


def test_the_unembedding_without_copies_lays_out_w_u_and_puts_it_back() -> None:
    # Exercised on a real HookedTransformer in hooked_transformer_checks.py; here its bookkeeping.
    from masalign.adapters.transformer_lens import unembedding_without_copies

    model = nn.Module()
    model.unembed = nn.Module()
    model.unembed.W_U = nn.Parameter(torch.randn(4, 6))
    weight = model.unembed.W_U
    values, storage = weight.detach().clone(), weight.data_ptr()
    with unembedding_without_copies(model):
        assert model.unembed.W_U is weight and weight.T.is_contiguous() and torch.equal(weight, values)
        with unembedding_without_copies(model):  # already laid out: left as it is
            assert weight.T.is_contiguous()
    assert weight.data_ptr() == storage and weight.is_contiguous() and torch.equal(weight, values)
    with unembedding_without_copies(nn.Linear(2, 3)):  # no unembed.W_U: nothing to do
        pass
