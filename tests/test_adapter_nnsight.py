"""NNsightAdapter on nnsight's TransformersModel and NNsight(module), and its parity with TransformerLens."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from transformer_fixtures import (
    freeze,
    gpt2_from_folder,
    gpt2_through_nnsight,
    gpt2_through_transformer_lens,
    save_tiny_gpt2,
)

from masalign.adapters import ModelAdapter, SiteError
from masalign.adapters.nnsight import NNsightAdapter
from masalign.adapters.transformer_lens import TransformerLensAdapter

VOCAB = 48
WIDTH = 64


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), vocab_size=VOCAB, n_embd=WIDTH)


@pytest.fixture(scope="module")
def hf_gpt2(gpt2_folder):
    return freeze(gpt2_from_folder(gpt2_folder))


@pytest.fixture(scope="module")
def language_model(gpt2_folder):
    """The folder through nnsight's TransformersModel."""
    adapter = NNsightAdapter(gpt2_through_nnsight(gpt2_folder))
    freeze(adapter.model)
    return adapter


@pytest.fixture(scope="module")
def wrapped_module(gpt2_folder):
    """The same checkpoint as a transformers module wrapped by NNsight(module)."""
    return NNsightAdapter(freeze(gpt2_from_folder(gpt2_folder)))


@pytest.fixture(scope="module")
def transformer_lens(gpt2_folder):
    return TransformerLensAdapter(freeze(gpt2_through_transformer_lens(gpt2_folder)))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(4, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))


def identity(hidden, example_index, slot_index):
    return hidden


def padded(rows: list[torch.Tensor], side: str, pad: int = 0) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[b, span], mask[b, span] = row, 1
    return {"input_ids": ids, "attention_mask": mask}


class TupleBlockModel(nn.Module):
    """Embedding -> a block returning ``(hidden, aux)`` -> readout of both; no mixing across positions."""

    class Block(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.mix = nn.Linear(width, width)
            self.aux = nn.Linear(width, 3)

        def forward(self, hidden):
            hidden = torch.tanh(self.mix(hidden))
            return hidden, self.aux(hidden)

    def __init__(self, vocab: int = 10, width: int = 16, readout_without_grad: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.block = self.Block(width)
        self.readout = nn.Linear(width, vocab)
        self.aux_readout = nn.Linear(3, vocab)
        self.readout_without_grad = readout_without_grad

    def forward(self, tokens):
        hidden, aux = self.block(self.embed(tokens))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.readout_without_grad):
            return self.readout(hidden) + self.aux_readout(aux)


def test_importing_masalign_and_the_adapter_does_not_import_nnsight():
    code = (
        "import sys, masalign, masalign.adapters.nnsight; "
        "from masalign.adapters import NNsightAdapter; "
        "assert 'nnsight' not in sys.modules, 'nnsight was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_local_folder_through_nnsight_gives_the_transformers_logits(language_model, wrapped_module, hf_gpt2, tokens):
    with torch.no_grad():
        expected = hf_gpt2(tokens).logits
    torch.testing.assert_close(language_model.logits(tokens), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(wrapped_module.logits({"input_ids": tokens}), expected, atol=1e-5, rtol=0)


def test_is_a_model_adapter_over_the_real_module(language_model):
    assert isinstance(language_model, ModelAdapter)
    assert type(language_model.model).__name__ == "GPT2LMHeadModel"
    assert language_model.device == torch.device("cpu")


def test_sites_are_module_paths_with_output_or_input(language_model):
    sites = language_model.sites()
    assert sites["transformer.h.1.output"] == WIDTH
    assert sites["transformer.h.0.mlp.input"] == WIDTH
    assert sites["transformer.h.0.mlp.c_fc.output"] == 4 * WIDTH
    assert sites["transformer.h.0.attn.output"] == WIDTH  # element 0 of the attention's tuple
    assert sites["transformer.wte.output"] == WIDTH
    assert sites["lm_head.output"] == VOCAB
    assert "transformer.wte.input" not in sites  # token ids, not an activation
    assert "transformer.h.0" not in sites


def test_activations_are_the_hidden_states_at_per_example_positions(language_model, hf_gpt2, tokens):
    positions = torch.tensor([[0, 4], [9, 2], [5, 6]])
    with torch.no_grad():
        hidden_states = hf_gpt2(tokens, output_hidden_states=True).hidden_states
    for site, expected in [("transformer.h.0.output", hidden_states[1]), ("transformer.h.1.input", hidden_states[1])]:
        hidden = language_model.activations(tokens, site, positions)
        assert hidden.shape == (3, 2, WIDTH)
        for b in range(3):
            torch.testing.assert_close(hidden[b], expected[b, positions[b]], atol=1e-6, rtol=0)


def test_activations_equal_what_an_nnsight_trace_reads_at_every_site(language_model, tokens):
    """The adapter reads with a plain hook; nnsight's own ``.output`` / ``.input`` must agree everywhere."""
    import nnsight

    positions = torch.tensor([[0, 4], [9, 2], [5, 6]])
    for site in language_model.sites():
        path, slot = site.rsplit(".", 1)
        element = None
        if slot.endswith("]"):
            slot, element = slot[:-1].split("[")
            element = int(element)
        envoy = language_model.envoy.get(path)
        with torch.no_grad(), language_model.envoy.trace(tokens) as tracer:
            value = envoy.output if slot == "output" else envoy.input
            value = nnsight.save(value)
            tracer.stop()
        if element is not None or isinstance(value, (tuple, list)) or hasattr(value, "keys"):
            value = list(value.values())[element or 0] if hasattr(value, "keys") else value[element or 0]
        expected = value[torch.arange(3)[:, None], positions]
        torch.testing.assert_close(language_model.activations(tokens, site, positions), expected, atol=0, rtol=0, msg=site)


def test_output_zero_names_the_first_element_of_a_tuple_output(language_model, tokens):
    positions = torch.tensor([[1], [2], [3]])
    torch.testing.assert_close(
        language_model.activations(tokens, "transformer.h.1.attn.output[0]", positions),
        language_model.activations(tokens, "transformer.h.1.attn.output", positions),
    )


def test_activations_stop_the_forward_pass_at_the_site(language_model, tokens):
    later_block_calls = []
    handle = language_model.model.transformer.h[1].register_forward_hook(lambda *args: later_block_calls.append(1))
    try:
        language_model.activations(tokens, "transformer.h.0.output", torch.zeros(3, 1, dtype=torch.long))
        assert later_block_calls == []
        language_model.logits(tokens)
        assert later_block_calls == [1]
    finally:
        handle.remove()


@pytest.mark.parametrize("which", ["language_model", "wrapped_module"])
@pytest.mark.parametrize(
    "site",
    [
        "transformer.wte.output",
        "transformer.h.0.output",
        "transformer.h.1.input",
        "transformer.h.1.attn.output",
        "transformer.h.0.mlp.c_fc.output",
        "lm_head.input",
    ],
)
def test_writing_back_the_activation_leaves_the_logits_unchanged(request, which, site, tokens):
    adapter = request.getfixturevalue(which)
    positions = torch.tensor([[0, 4], [9, 2], [5, 6]])
    torch.testing.assert_close(
        adapter.run_with_replacement(tokens, site, positions, identity), adapter.logits(tokens), atol=1e-6, rtol=0
    )


def test_a_replacement_changes_logits_only_from_its_position_on(language_model, tokens):
    positions = torch.tensor([[2], [9], [0]])
    shift = torch.randn(WIDTH, generator=torch.Generator().manual_seed(0))
    changed = language_model.run_with_replacement(tokens, "transformer.h.0.output", positions, lambda h, e, s: h + shift)
    plain = language_model.logits(tokens)
    for b, position in enumerate(positions[:, 0].tolist()):
        torch.testing.assert_close(changed[b, :position], plain[b, :position], atol=1e-6, rtol=0)
        assert (changed[b, position:] - plain[b, position:]).abs().amax(-1).min() > 1e-4


def test_gradients_reach_the_replacement_parameters_and_not_the_frozen_model(language_model, tokens):
    scale = nn.Parameter(torch.ones(WIDTH))
    logits = language_model.run_with_replacement(
        tokens, "transformer.h.0.output", torch.tensor([[1], [2], [3]]), lambda hidden, e, s: hidden * scale
    )
    logits.logsumexp(-1).sum().backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0
    assert all(p.grad is None for p in language_model.model.parameters())


@pytest.mark.parametrize("which", ["language_model", "wrapped_module"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_per_example_positions_in_a_padded_batch_match_unpadded_runs(request, which, side):
    adapter = request.getfixturevalue(which)
    rows = [torch.randint(4, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 7)]
    batch = padded(rows, side)
    offsets = [batch["input_ids"].shape[1] - len(r) if side == "left" else 0 for r in rows]
    own_positions = [[1, 4], [8, 0], [6, 3]]
    positions = torch.tensor([[p + offset for p in own] for own, offset in zip(own_positions, offsets)])
    shift = torch.randn(WIDTH, generator=torch.Generator().manual_seed(0))

    hidden = adapter.activations(batch, "transformer.h.1.output", positions)
    logits = adapter.run_with_replacement(batch, "transformer.h.0.output", positions, lambda h, e, s: h + shift)
    for b, (row, offset) in enumerate(zip(rows, offsets)):
        alone = row[None]
        own = torch.tensor([own_positions[b]])
        alone_hidden = adapter.activations(alone, "transformer.h.1.output", own)[0]
        torch.testing.assert_close(hidden[b], alone_hidden, atol=1e-5, rtol=0)
        expected = adapter.run_with_replacement(alone, "transformer.h.0.output", own, lambda h, e, s: h + shift)[0]
        torch.testing.assert_close(logits[b, offset : offset + len(row)], expected, atol=1e-5, rtol=0)


def test_positions_on_padding_or_past_the_end_are_refused(language_model):
    rows = [torch.arange(4, 7), torch.arange(4, 10)]
    with pytest.raises(IndexError, match=r"position 1 .* example 0 is padding.*positions 3\.\.5"):
        language_model.activations(padded(rows, "left"), "transformer.h.0.output", torch.tensor([[1], [2]]))
    with pytest.raises(IndexError, match=r"position 4 .* example 0 is padding.*positions 0\.\.2"):
        language_model.run_with_replacement(
            padded(rows, "right"), "transformer.h.0.output", torch.tensor([[4], [2]]), identity
        )
    with pytest.raises(IndexError, match="outside its sequence of length 6"):
        language_model.activations(padded(rows, "right"), "transformer.h.0.output", torch.tensor([[0], [6]]))
    with pytest.raises(ValueError, match="repeats a position"):
        language_model.activations(padded(rows, "right"), "transformer.h.0.output", torch.tensor([[1, 1], [2, 3]]))


def test_unknown_and_unusable_sites_are_clear_errors(language_model, tokens):
    positions = torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(SiteError, match=r"no site 'transformer\.h\.0\.outptu'.*Did you mean 'transformer\.h\.0\.output'"):
        language_model.activations(tokens, "transformer.h.0.outptu", positions)
    with pytest.raises(SiteError, match=r"is a module, not a site.*'transformer\.h\.0\.output'"):
        language_model.activations(tokens, "transformer.h.0", positions)
    with pytest.raises(SiteError, match=r"has no site 'transformer\.h\.0\.output\[1\]'"):
        language_model.activations(tokens, "transformer.h.0.output[1]", positions)
    with pytest.raises(SiteError, match="non-float tensor"):
        language_model.activations(tokens, "transformer.wte.input", positions)


def test_a_replacement_of_the_wrong_shape_is_refused(language_model, tokens):
    positions = torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"shape \(n_rows, width\) = \(3, 64\)"):
        language_model.run_with_replacement(tokens, "transformer.h.0.output", positions, lambda h, e, s: h[:, :5])
    # The failed trace leaves the model usable.
    torch.testing.assert_close(
        language_model.run_with_replacement(tokens, "transformer.h.0.output", positions, identity),
        language_model.logits(tokens),
    )


def test_only_nnsight_models_and_modules_are_accepted():
    with pytest.raises(TypeError, match="nnsight model"):
        NNsightAdapter("openai-community/gpt2")


def test_a_plain_module_with_a_tuple_output_has_one_site_per_element():
    adapter = NNsightAdapter(freeze(TupleBlockModel()), example_inputs=torch.zeros(2, 5, dtype=torch.long))
    sites = adapter.sites()
    assert sites["block.output"] == 16 and sites["block.output[1]"] == 3 and sites["block.aux.output"] == 3
    tokens = torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[1], [4]])
    plain = adapter.logits(tokens)
    torch.testing.assert_close(adapter.run_with_replacement(tokens, "block.output[1]", positions, identity), plain)
    changed = adapter.run_with_replacement(tokens, "block.output[1]", positions, lambda h, e, s: h + 1.0)
    moved = (changed - plain).abs().amax(-1) > 1e-4
    assert moved.tolist() == [[p == 1 for p in range(6)], [p == 4 for p in range(6)]]


def test_a_module_that_runs_twice_per_forward_pass_is_not_a_site():
    class TwiceModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.layer, self.readout = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10)

        def forward(self, tokens):
            return self.readout(self.layer(self.layer(self.embed(tokens))))

    adapter = NNsightAdapter(TwiceModel(), example_inputs=torch.zeros(2, 5, dtype=torch.long))
    assert "layer.output" not in adapter.sites()
    with pytest.raises(SiteError, match="runs 2 times per forward pass"):
        adapter.activations(torch.zeros(2, 5, dtype=torch.long), "layer.output", torch.zeros(2, 1, dtype=torch.long))


def test_evaluation_under_inference_mode_gives_the_same_logits(language_model, tokens):
    positions = torch.tensor([[1], [2], [3]])
    shift = torch.randn(WIDTH, generator=torch.Generator().manual_seed(3))
    expected = language_model.run_with_replacement(tokens, "transformer.h.0.output", positions, lambda h, e, s: h + shift)
    with torch.inference_mode():
        logits = language_model.run_with_replacement(tokens, "transformer.h.0.output", positions, lambda h, e, s: h + shift)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)


def test_training_through_a_model_loaded_under_inference_mode_is_a_clear_error():
    with torch.inference_mode():
        model = TupleBlockModel()
    tokens, positions = torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)
    adapter = NNsightAdapter(freeze(model), example_inputs=tokens)
    scale = nn.Parameter(torch.ones(16))
    with pytest.raises(RuntimeError, match="inference tensors"):
        adapter.run_with_replacement(tokens, "embed.output", positions, lambda h, e, s: h * scale)


def test_a_forward_that_switches_autograd_off_after_the_site_is_a_clear_error():
    tokens, positions = torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)
    adapter = NNsightAdapter(freeze(TupleBlockModel(readout_without_grad=True)), example_inputs=tokens)
    scale = nn.Parameter(torch.ones(16))
    with pytest.raises(RuntimeError, match="switches autograd off"):
        adapter.run_with_replacement(tokens, "block.output", positions, lambda h, e, s: h * scale)


# -- the same checkpoint through TransformerLens and through nnsight -------------------------------

CORRESPONDING_SITES = [
    ("hook_embed", "transformer.wte.output"),
    ("blocks.0.hook_resid_pre", "transformer.h.0.input"),
    ("blocks.0.hook_resid_post", "transformer.h.0.output"),
    ("blocks.0.mlp.hook_pre", "transformer.h.0.mlp.c_fc.output"),
    ("blocks.1.hook_attn_out", "transformer.h.1.attn.output"),
    ("blocks.1.hook_mlp_out", "transformer.h.1.mlp.output"),
    ("ln_final.hook_out", "transformer.ln_f.output"),
]


@pytest.fixture(scope="module")
def left_padded_batch():
    """``(nnsight inputs, TransformerLens inputs, positions)`` for three left-padded rows."""
    rows = [torch.randint(4, VOCAB, (n,), generator=torch.Generator().manual_seed(10 + n)) for n in (6, 10, 8)]
    batch = padded(rows, "left")
    tl_batch = {"input": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return batch, tl_batch, torch.tensor([[4 + 1, 4 + 5], [0, 9], [2 + 7, 2 + 3]])


@pytest.mark.parametrize(("tl_site", "nnsight_site"), CORRESPONDING_SITES)
def test_both_backends_read_the_same_activations(transformer_lens, language_model, left_padded_batch, tl_site, nnsight_site):
    batch, tl_batch, positions = left_padded_batch
    assert transformer_lens.sites()[tl_site] == language_model.sites()[nnsight_site]
    torch.testing.assert_close(
        transformer_lens.activations(tl_batch, tl_site, positions),
        language_model.activations(batch, nnsight_site, positions),
        atol=1e-5,
        rtol=0,
    )


def test_both_backends_give_the_same_logits_under_the_same_interventions(
    transformer_lens, language_model, left_padded_batch
):
    batch, tl_batch, positions = left_padded_batch
    real = batch["attention_mask"].bool()
    plain = transformer_lens.logits(tl_batch)[real], language_model.logits(batch)[real]
    torch.testing.assert_close(*plain, atol=1e-5, rtol=0)

    fixed = torch.randn(WIDTH, generator=torch.Generator().manual_seed(1))

    def set_to_fixed(hidden, example_index, slot_index):
        return fixed.expand_as(hidden)

    residual_sites = [
        ("blocks.0.hook_resid_post", "transformer.h.0.output"),
        ("blocks.1.hook_attn_out", "transformer.h.1.attn.output"),
        ("blocks.1.hook_mlp_out", "transformer.h.1.mlp.output"),
    ]
    for tl_site, nnsight_site in residual_sites:
        torch.testing.assert_close(
            transformer_lens.run_with_replacement(tl_batch, tl_site, positions, set_to_fixed)[real],
            language_model.run_with_replacement(batch, nnsight_site, positions, set_to_fixed)[real],
            atol=1e-5,
            rtol=0,
        )

    def per_slot(hidden, example_index, slot_index):
        return hidden * (1.0 + slot_index[:, None]) - 0.5 * example_index[:, None]

    torch.testing.assert_close(
        transformer_lens.run_with_replacement(tl_batch, "blocks.0.hook_resid_post", positions, per_slot)[real],
        language_model.run_with_replacement(batch, "transformer.h.0.output", positions, per_slot)[real],
        atol=1e-5,
        rtol=0,
    )


def test_both_backends_give_the_same_gradients(transformer_lens, language_model, left_padded_batch):
    batch, tl_batch, positions = left_padded_batch
    gradients = []
    for adapter, site, inputs in [
        (transformer_lens, "blocks.0.hook_resid_post", tl_batch),
        (language_model, "transformer.h.0.output", batch),
    ]:
        scale = nn.Parameter(torch.ones(WIDTH))
        logits = adapter.run_with_replacement(inputs, site, positions, lambda h, e, s: h * scale)
        logits[batch["attention_mask"].bool()].logsumexp(-1).sum().backward()
        gradients.append(scale.grad)
    torch.testing.assert_close(gradients[0], gradients[1], atol=1e-4, rtol=1e-4)
