"""Prefix caching: a run resumed from the cached states at a block's output equals the full run.

On tiny models of each kind the adapters resume: a TransformerBridge over its
native model, HookedRootModule, and Hugging Face Llama and Gemma-3 (sliding-window
and global layers, window shorter than the sequence) through TransformerBridge and
through nnsight. Left-padded batches with attention masks; the logits and the
gradient that reaches the replacement's parameter agree with the full run.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from masalign import ModelAlignment, fit
from masalign.prefix import base_prefixes
from masalign.adapters import NNsightAdapter, SiteError, TransformerLensAdapter
from masalign.adapters.resume import check_resume_exact

from padded_pairs import POSITIONS, SEQ, VOCAB, pairs
from padded_pairs import padded_inputs as _padded_inputs  # the name other test modules import
from transformer_fixtures import TinyHookedTransformer, save_tiny_gpt2, tiny_tl_transformer

TOLERANCE = 1e-5


def _hf_folder(tmp_path_factory: pytest.TempPathFactory, kind: str) -> str:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shared = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=64, pad_token_id=0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shared))
    else:
        # A window of 4 on 11 tokens: the sliding layers' masks differ from the global layers'.
        layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
        model = Gemma3ForCausalLM(Gemma3TextConfig(**shared, sliding_window=4, layer_types=layer_types))
    folder = tmp_path_factory.mktemp(kind)
    save_tiny_gpt2(folder, vocab_size=VOCAB)  # for its tokenizer; the model is written over it
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def hf_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    return _hf_folder(tmp_path_factory, request.param)


def _bridge(folder: str) -> TransformerLensAdapter:
    from transformer_lens import TransformerBridge

    return TransformerLensAdapter(TransformerBridge.boot_transformers(folder, device="cpu").eval())


def _nnsight(folder: str) -> NNsightAdapter:
    from transformers import AutoModelForCausalLM

    return NNsightAdapter(AutoModelForCausalLM.from_pretrained(folder).eval())


def _assert_resumes_exactly(adapter, inputs, site: str) -> None:
    """Logits and the gradient reaching the replacement agree with the full run."""
    assert adapter.supports_prefix(site)
    direction = torch.linspace(-1, 1, adapter.sites()[site])

    def run(resumed: bool) -> tuple[Tensor, Tensor]:
        scale = torch.tensor(0.7, requires_grad=True)

        def replace(hidden: Tensor, example_index: Tensor, slot_index: Tensor) -> Tensor:
            return hidden + scale * direction * (1 + slot_index[:, None])

        if resumed:
            with torch.no_grad():
                prefix = adapter.prefix(inputs, site)
            logits = adapter.run_from_prefix(inputs, site, prefix, POSITIONS, replace)
        else:
            logits = adapter.run_with_replacement(inputs, site, POSITIONS, replace)
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), scale.grad

    full, full_grad = run(resumed=False)
    resumed, resumed_grad = run(resumed=True)
    real = inputs["attention_mask"].bool()
    assert (full - resumed)[real].abs().max() < TOLERANCE
    assert (full_grad - resumed_grad).abs() < TOLERANCE * max(1.0, float(full_grad.abs()))


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_bridge_over_hf_resumes_exactly(hf_folder: str, layer: int) -> None:
    adapter = _bridge(hf_folder)
    _assert_resumes_exactly(adapter, _padded_inputs("input"), f"blocks.{layer}.hook_resid_post")


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_nnsight_over_hf_resumes_exactly(hf_folder: str, layer: int) -> None:
    adapter = _nnsight(hf_folder)
    _assert_resumes_exactly(adapter, _padded_inputs("input_ids"), f"model.layers.{layer}.output")


def test_nnsight_transformers_model_resumes_exactly(hf_folder: str) -> None:
    from nnsight import TransformersModel

    adapter = NNsightAdapter(TransformersModel(hf_folder, task="text-generation", dispatch=True))
    _assert_resumes_exactly(adapter, _padded_inputs("input_ids"), "model.layers.1.output")


def test_native_bridge_and_hooked_root_module_resume_exactly() -> None:
    bridge = TransformerLensAdapter(tiny_tl_transformer(VOCAB, n_layers=3, d_model=32).eval())
    inputs = {"input": _padded_inputs("input")["input"]}
    for layer in (0, 1):
        check_resume_exact(bridge, inputs, f"blocks.{layer}.hook_resid_post", POSITIONS, lambda h, e, s: h * 0.5)
    hooked = TransformerLensAdapter(TinyHookedTransformer(d_vocab=VOCAB, n_layers=3, n_ctx=SEQ).eval())
    _assert_resumes_exactly(hooked, _padded_inputs("input"), "blocks.1.hook_resid_post")


def test_other_sites_do_not_resume(hf_folder: str) -> None:
    bridge, nnsight_adapter = _bridge(hf_folder), _nnsight(hf_folder)
    assert not bridge.supports_prefix("blocks.1.hook_resid_pre")
    assert not bridge.supports_prefix("blocks.1.attn.hook_out")
    assert not nnsight_adapter.supports_prefix("model.layers.1.mlp.output")
    assert not nnsight_adapter.supports_prefix("model.layers.1.input")
    inputs = _padded_inputs("input_ids")
    with pytest.raises(SiteError, match="resume only"):
        nnsight_adapter.prefix(inputs, "model.layers.1.mlp.output")
    with pytest.raises(ValueError, match="prefix"):
        nnsight_adapter.run_from_prefix(inputs, "model.layers.1.output", torch.zeros(3, SEQ, 5), POSITIONS, lambda h, e, s: h)


def test_blocks_are_restored_after_an_error(hf_folder: str) -> None:
    adapter = _nnsight(hf_folder)
    inputs = _padded_inputs("input_ids")
    site = "model.layers.2.output"
    prefix = adapter.prefix(inputs, site)
    layers = adapter.model.model.layers
    forwards = [vars(layer).get("forward") for layer in layers]  # nnsight sets its own

    def fail(module: nn.Module, args: object, output: object) -> None:
        raise RuntimeError("a later block failed")

    handle = layers[3].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="later block"):
            adapter.run_from_prefix(inputs, site, prefix, POSITIONS, lambda h, e, s: h)
    finally:
        handle.remove()
    assert [vars(layer).get("forward") for layer in layers] == forwards
    full = adapter.run_with_replacement(inputs, site, POSITIONS, lambda h, e, s: h)
    assert (full - adapter.run_from_prefix(inputs, site, prefix, POSITIONS, lambda h, e, s: h)).abs().max() < TOLERANCE


def test_fit_with_prefix_cache_trains_as_without(hf_folder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = _nnsight(hf_folder)
    resumed_runs = []
    resume = adapter.run_from_prefix
    monkeypatch.setattr(adapter, "run_from_prefix", lambda *args: resumed_runs.append(1) or resume(*args))
    train, valid = pairs(12, 0), pairs(6, 1)
    fitted = []
    for prefix_cache in (False, True):
        alignment = ModelAlignment({"A": adapter}, "model.layers.1.output", subspace_dim=4)
        result = fit(alignment, train, valid, steps=4, batch_size=4, eval_every=2, progress=False, prefix_cache=prefix_cache)
        fitted.append(([entry["valid_loss"] for entry in result.history], alignment.state_dict()))
        assert bool(resumed_runs) == prefix_cache
    (losses, state), (cached_losses, cached_state) = fitted
    assert losses == pytest.approx(cached_losses, abs=1e-5)
    assert_same_subspaces(state, cached_state)


def assert_same_subspaces(state: dict[str, Tensor], other: dict[str, Tensor], tolerance: float = 1e-4) -> None:
    """The trained subspaces agree: the projector onto each model's aligned columns.

    Not the raw parameters: the Householder parameters that rotate within the aligned
    block do not change the interchange, so their gradient is zero up to rounding, which
    Adam scales up to steps of size lr; they differ between two exact computations.
    """
    from masalign.alignment import _householder_columns

    for key, value in state.items():
        if key.endswith("generator_columns"):
            rotation = state[key.replace("generator_columns", "initial_rotation")]
            ours = rotation @ _householder_columns(value)
            theirs = other[key.replace("generator_columns", "initial_rotation")] @ _householder_columns(other[key])
            assert (ours @ ours.T - theirs @ theirs.T).abs().max() < tolerance, key
        elif not key.endswith("initial_rotation"):
            assert (value - other[key]).abs().max() < tolerance, key


def test_prefixes_are_skipped_over_the_memory_budget(hf_folder: str) -> None:
    adapter = _nnsight(hf_folder)
    data = pairs(4, 0)
    site = "model.layers.1.output"
    cached = base_prefixes(adapter, site, data.base_inputs, data.base_positions, 32)
    assert cached.shape == (4, SEQ, 32) and cached.device.type == "cpu"
    with pytest.warns(UserWarning, match="MiB"):
        assert base_prefixes(adapter, site, data.base_inputs, data.base_positions, 32, max_bytes=1000) is None
    assert base_prefixes(adapter, "model.layers.1.mlp.output", data.base_inputs, data.base_positions, 32) is None
