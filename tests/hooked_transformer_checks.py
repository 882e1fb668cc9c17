"""TransformerLensAdapter on a real ``HookedTransformer`` (TransformerLens 2.x/3.x).

TransformerLens 4 has no ``HookedTransformer``, and one process imports one
``transformer_lens``, so these checks run in their own process under
TransformerLens 3.9 (``tests/test_transformer_lens_3.py`` starts it, with the copy
``scripts/setup.sh`` puts in ``.venv/transformer-lens-3``). Run by hand:
``PYTHONPATH=.venv/transformer-lens-3 .venv/bin/python -m pytest tests/hooked_transformer_checks.py``.

Two tiny models built from a ``HookedTransformerConfig`` (nothing downloaded): a
GPT-2-like one (learned positions, LayerNorm) and a Llama-like one (rotary, RMSNorm,
gated MLP, grouped keys and values). Batches are left-padded with an attention mask.
Runs resume at block outputs from the states there and, skipping the positions before
the first written one, from the later blocks' cached keys and values.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

transformer_lens = pytest.importorskip("transformer_lens")
try:
    transformer_lens.HookedTransformer  # noqa: B018  (4.x raises ImportError here)
except (AttributeError, ImportError):
    pytest.skip("this TransformerLens has no HookedTransformer (4.x): run under 2.x/3.x", allow_module_level=True)

from masalign import CounterfactualPairs, LogitDifference, ModelAlignment, activation_patching, evaluate, fit  # noqa: E402
from masalign.adapters import SiteError, TransformerLensAdapter  # noqa: E402
from padded_pairs import POSITIONS, SEQ, VOCAB, padded_inputs, pairs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")

TOLERANCE = 1e-5


def _model(kind: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    shared = dict(n_layers=3, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_vocab=VOCAB, seed=0)
    if kind == "gpt2":
        cfg = HookedTransformerConfig(**shared, act_fn="gelu_new", normalization_type="LN")
    else:
        cfg = HookedTransformerConfig(
            **shared, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
            rotary_dim=8, gated_mlp=True, d_mlp=64, n_key_value_heads=2, final_rms=True,
        )
    model = HookedTransformer(cfg).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return _model(request.param)


@pytest.fixture(scope="module")
def adapter(model):
    return TransformerLensAdapter(model)


def _padded() -> dict[str, Tensor]:
    return padded_inputs("input")


def _no_hooks_left(model) -> bool:
    return all(not point.fwd_hooks and not point._forward_hooks for point in model.hook_dict.values())


def test_sites_are_hook_names_with_widths(adapter, model):
    sites = adapter.sites()
    assert sites["blocks.1.hook_resid_post"] == 32
    assert sites["hook_embed"] == 32
    assert sites["blocks.0.attn.hook_z"] == 32  # 4 heads x 8, flattened
    assert "blocks.0.attn.hook_pattern" not in sites
    assert "blocks.0.hook_mlp_in" not in sites
    with pytest.raises(SiteError, match="use_hook_mlp_in"):
        adapter.activations(_padded(), "blocks.0.hook_mlp_in", POSITIONS)
    with pytest.raises(SiteError, match="blocks.1.hook_resid_post"):
        adapter.activations(_padded(), "blocks.1.hook_resid_pots", POSITIONS)


def test_a_flagged_hook_is_a_site_once_its_flag_is_on():
    model = _model("gpt2")
    adapter = TransformerLensAdapter(model)
    assert "blocks.0.hook_mlp_in" not in adapter.sites()
    model.set_use_hook_mlp_in(True)
    assert adapter.sites()["blocks.0.hook_mlp_in"] == 32
    inputs = _padded()
    _, cache = model.run_with_cache(inputs["input"], attention_mask=inputs["attention_mask"])
    rows = adapter.activations(inputs, "blocks.0.hook_mlp_in", POSITIONS)
    torch.testing.assert_close(rows, cache["blocks.0.hook_mlp_in"][torch.arange(3)[:, None], POSITIONS])


@pytest.mark.parametrize("site", ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.2.mlp.hook_post"])
def test_activations_are_the_cached_activations(adapter, model, site):
    inputs = _padded()
    _, cache = model.run_with_cache(inputs["input"], attention_mask=inputs["attention_mask"])
    expected = cache[site].reshape(3, SEQ, -1)[torch.arange(3)[:, None], POSITIONS]
    torch.testing.assert_close(adapter.activations(inputs, site, POSITIONS), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("site", ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "ln_final.hook_normalized"])
def test_writing_back_the_activation_leaves_the_logits_unchanged(adapter, site):
    inputs = _padded()
    logits = adapter.run_with_replacement(inputs, site, POSITIONS, lambda hidden, example, slot: hidden)
    torch.testing.assert_close(logits, adapter.logits(inputs), atol=1e-6, rtol=0)


def test_a_replacement_changes_the_logits_from_its_position_on(adapter):
    inputs = _padded()
    positions = torch.tensor([[5], [5], [7]])
    clean = adapter.logits(inputs)
    patched = adapter.run_with_replacement(inputs, "blocks.1.hook_resid_post", positions, lambda h, e, s: h + torch.linspace(-3, 3, 32))
    for row, position in enumerate(positions[:, 0].tolist()):
        assert (patched[row, :position] - clean[row, :position]).abs().max() < 1e-6
        assert (patched[row, position:] - clean[row, position:]).abs().amax(-1).min() > 1e-3


def test_a_left_padded_row_gives_what_it_gives_alone(adapter):
    inputs = _padded()
    batched = adapter.logits(inputs)
    patched = adapter.run_with_replacement(inputs, "blocks.0.hook_resid_post", POSITIONS, lambda h, e, s: h * 0.5)
    for row, pad in enumerate((0, 2, 5)):
        alone = inputs["input"][row : row + 1, pad:]
        torch.testing.assert_close(batched[row, pad:], adapter.logits(alone)[0], atol=1e-5, rtol=0)
        own = adapter.run_with_replacement(alone, "blocks.0.hook_resid_post", POSITIONS[row : row + 1] - pad, lambda h, e, s: h * 0.5)
        torch.testing.assert_close(patched[row, pad:], own[0], atol=1e-5, rtol=0)


def test_positions_on_padding_are_refused(adapter):
    with pytest.raises(IndexError, match="padding"):
        adapter.activations(_padded(), "blocks.0.hook_resid_post", torch.tensor([[3], [1], [6]]))


def _logits_and_gradient(run, start: int = 0) -> tuple[Tensor, Tensor]:
    """``run(replace)``'s logits from position ``start`` on, and the gradient reaching ``replace``'s
    parameter (a scale of a fixed direction, per slot) from their log-partition."""
    scale = torch.tensor(0.7, requires_grad=True)
    direction = torch.linspace(-1, 1, 32)

    def replace(hidden, example_index, slot_index):
        return hidden + scale * direction * (1 + slot_index[:, None])

    logits = run(replace)[:, start:]
    logits.logsumexp(-1).sum().backward()
    return logits.detach(), scale.grad


def _assert_alike(full: tuple[Tensor, Tensor], other: tuple[Tensor, Tensor], real: Tensor, what: object) -> None:
    (full_logits, full_grad), (logits, grad) = full, other
    assert (full_logits - logits)[real].abs().max() < TOLERANCE, what
    assert (full_grad - grad).abs() < TOLERANCE * max(1.0, float(full_grad.abs())), what


def test_runs_resumed_at_a_block_output_equal_full_runs_with_gradients(adapter):
    inputs = _padded()
    for layer in range(3):
        site = f"blocks.{layer}.hook_resid_post"
        assert adapter.supports_prefix(site)
        full = _logits_and_gradient(lambda replace: adapter.run_with_replacement(inputs, site, POSITIONS, replace))
        prefix = adapter.prefix(inputs, site)
        resumed = _logits_and_gradient(lambda replace: adapter.run_from_prefix(inputs, site, prefix, POSITIONS, replace))
        _assert_alike(full, resumed, inputs["attention_mask"].bool(), site)
    assert not adapter.supports_prefix("blocks.1.hook_resid_pre")


@pytest.mark.parametrize("masked", [True, False])
def test_runs_from_cached_keys_and_values_equal_full_runs_with_gradients(adapter, masked):
    inputs = _padded() if masked else {"input": _padded()["input"][:, 5:]}
    seq = inputs["input"].shape[1]
    positions = torch.tensor([[seq - 1, seq - 2]] * 3)
    for layer in range(3):
        site = f"blocks.{layer}.hook_resid_post"
        assert adapter.supports_key_values(site)
        for start in (1, seq - 2):
            prefix = adapter.key_value_prefix(inputs, site, start)
            assert prefix.first_block == layer + 1 and len(prefix.keys) == 2 - layer
            assert all(keys.shape[2] == start for keys in prefix.keys)
            full = _logits_and_gradient(lambda replace: adapter.run_with_replacement(inputs, site, positions, replace), start)
            cached = _logits_and_gradient(lambda replace: adapter.run_from_prefix(inputs, site, prefix, positions, replace), start)
            real = inputs["attention_mask"][:, start:].bool() if masked else torch.ones(full[0].shape[:2], dtype=torch.bool)
            _assert_alike(full, cached, real, (site, start))


def test_a_key_value_prefix_refuses_writes_before_its_start(adapter):
    inputs = _padded()
    prefix = adapter.key_value_prefix(inputs, "blocks.0.hook_resid_post", 9)
    with pytest.raises(ValueError, match="up to position 9"):
        adapter.run_from_prefix(inputs, "blocks.0.hook_resid_post", prefix, POSITIONS, lambda h, e, s: h)


def test_an_adapter_with_its_own_logits_fn_runs_from_states_only(model):
    adapter = TransformerLensAdapter(model, logits_fn=lambda output: output)
    assert adapter.supports_prefix("blocks.0.hook_resid_post")
    assert not adapter.supports_key_values("blocks.0.hook_resid_post")
    with pytest.raises(SiteError, match="logits_fn"):
        adapter.key_value_prefix(_padded(), "blocks.0.hook_resid_post", 3)


def test_no_hook_is_left_after_an_error(adapter, model):
    def fail(hidden, example_index, slot_index):
        raise RuntimeError("replace failed")

    with pytest.raises(RuntimeError, match="replace failed"):
        adapter.run_with_replacement(_padded(), "blocks.1.hook_resid_post", POSITIONS, fail)
    assert _no_hooks_left(model)


def _pairs(n: int, seed: int) -> CounterfactualPairs:
    return pairs(n, seed, key="input")


def test_mas_between_two_hooked_transformers_fits_alike_with_and_without_cached_prefixes():
    models = {"gpt2": TransformerLensAdapter(_model("gpt2"), name="gpt2"), "llama": TransformerLensAdapter(_model("llama"), name="llama")}
    train, valid, test = _pairs(16, 0), _pairs(8, 1), _pairs(8, 2)
    key_value_reads = []
    for adapter in models.values():
        read = adapter.key_value_prefix
        adapter.key_value_prefix = lambda *args, read=read, **kwargs: key_value_reads.append(1) or read(*args, **kwargs)
    fitted = []
    for prefix_cache in (False, True):
        alignment = ModelAlignment(models, "blocks.1.hook_resid_post", subspace_dim=4, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback from the cached keys and values
            result = fit(alignment, train, valid, steps=4, batch_size=4, eval_every=2, progress=False, prefix_cache=prefix_cache)
            report = evaluate(alignment, test, prefix_cache=prefix_cache)
        assert bool(key_value_reads) == prefix_cache  # the steps ran positions 8.. only
        fitted.append(([entry["valid_loss"] for entry in result.history], report.iia))
    (losses, iia), (cached_losses, cached_iia) = fitted
    assert losses == pytest.approx(cached_losses, abs=1e-5)
    assert iia == cached_iia


def test_patching_from_cached_runs_equals_whole_runs(adapter):
    clean = _padded()
    corrupted = {**clean, "input": torch.where(clean["attention_mask"].bool(), (clean["input"] + 7) % VOCAB, 0)}
    metric = LogitDifference(answer=3, wrong=5)
    sites = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post", "blocks.1.attn.hook_z"]
    positions = list(range(5, SEQ))  # real tokens in every row
    whole = activation_patching(adapter, clean, corrupted, sites, metric, positions, prefix_cache=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the keys and values nor the states fall back
        cached = activation_patching(adapter, clean, corrupted, sites, metric, positions, prefix_cache=True)
    assert (whole.values - cached.values).abs().max() < TOLERANCE


def test_the_unembedding_without_copies_gives_the_same_logits_and_is_put_back(adapter, model):
    from masalign.adapters.transformer_lens import unembedding_without_copies

    inputs = _padded()
    weight = model.unembed.W_U
    original, plain = weight.detach().clone(), adapter.logits(inputs)
    storage, strides = weight.data_ptr(), weight.stride()
    copies = []
    with unembedding_without_copies(model):
        assert model.unembed.W_U is weight and weight.T.is_contiguous() and torch.equal(weight, original)
        contiguous = torch.Tensor.contiguous

        def spy(self, *args, **kwargs):
            result = contiguous(self, *args, **kwargs)
            if result.data_ptr() != self.data_ptr():
                copies.append(tuple(self.shape))
            return result

        torch.Tensor.contiguous = spy
        try:
            laid_out = adapter.logits(inputs)
        finally:
            torch.Tensor.contiguous = contiguous
    assert torch.equal(laid_out, plain)
    assert (VOCAB, 32) not in copies  # W_U.T was not copied
    assert (weight.data_ptr(), weight.stride()) == (storage, strides) and torch.equal(weight, original)
    with pytest.raises(RuntimeError, match="inside"):
        with unembedding_without_copies(model):
            raise RuntimeError("inside")
    assert (weight.data_ptr(), weight.stride()) == (storage, strides)


def test_fit_evaluate_and_patching_run_with_the_unembedding_laid_out_and_put_it_back():
    model = _model("gpt2")
    adapter = TransformerLensAdapter(model)
    weight = model.unembed.W_U
    storage, strides = weight.data_ptr(), weight.stride()
    laid_out = []
    handle = model.unembed.register_forward_pre_hook(lambda module, args: laid_out.append(module.W_U.T.is_contiguous()))
    try:
        alignment = ModelAlignment({"A": adapter}, "blocks.1.hook_resid_post", subspace_dim=4, seed=0)
        laid_out.clear()  # the adapter's probe of the sites, before any of them
        fit(alignment, _pairs(8, 0), _pairs(4, 1), steps=2, batch_size=4, eval_every=2, progress=False)
        evaluate(alignment, _pairs(4, 2))
        clean = _padded()
        corrupted = {**clean, "input": torch.where(clean["attention_mask"].bool(), (clean["input"] + 7) % VOCAB, 0)}
        activation_patching(adapter, clean, corrupted, ["blocks.0.hook_resid_post"], LogitDifference(3, 5), [9, 10])
        assert laid_out and all(laid_out)
        laid_out.clear()
        adapter.logits(clean)  # outside them: the model as it was
        assert laid_out == [False]
    finally:
        handle.remove()
    assert (weight.data_ptr(), weight.stride()) == (storage, strides)
