"""Activation patching and ablation (masalign.patching) on every adapter kind.

Against ``transformer_lens.patching`` on the same inputs (1e-5); against plain
PyTorch forward hooks for nnsight; step-wise exact on a fused GRU (a state patched
at or after the last differing token restores the clean run completely); the
ablations against their definitions; the bad inputs the issue names; and cells run
from cached states (and keys and values) equal to whole runs, with a fallback where
they would not be.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from masalign.adapters import NNsightAdapter, SiteError, TorchModuleAdapter, TransformerLensAdapter
from masalign.models import RecurrentConfig, RecurrentLM
from masalign.patching import AnswerAccuracy, AnswerProbability, LogitDifference, PatchingResult, ablation, activation_patching

from transformer_fixtures import tiny_tl_transformer

VOCAB, SEQ, BATCH = 24, 6, 4


def _tokens(seed: int) -> Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bridge():
    return tiny_tl_transformer(VOCAB, n_ctx=16, d_model=32, n_layers=2).eval()


def test_denoising_equals_transformer_lens_patching(bridge) -> None:
    from transformer_lens import patching as tl_patching

    clean, corrupted = _tokens(0), _tokens(1)
    metric = LogitDifference(answer=torch.tensor([3, 4, 5, 6]), wrong=torch.tensor([7, 8, 9, 10]))
    _, clean_cache = bridge.run_with_cache(clean)
    expected = tl_patching.get_act_patch_resid_pre(bridge, corrupted, clean_cache, metric)
    sites = [f"blocks.{layer}.hook_resid_pre" for layer in range(2)]
    result = activation_patching(TransformerLensAdapter(bridge), clean, corrupted, sites, metric, normalize=False)
    assert result.raw.shape == expected.shape == (2, SEQ)
    assert (result.raw - expected.cpu()).abs().max() < 1e-5
    assert torch.equal(result.values, result.raw) and not result.normalized

    expected_mlp = tl_patching.get_act_patch_mlp_out(bridge, corrupted, clean_cache, metric)
    mlp = activation_patching(TransformerLensAdapter(bridge), clean, corrupted, ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"], metric, normalize=False)
    assert (mlp.raw - expected_mlp.cpu()).abs().max() < 1e-5


def test_normalised_values_run_from_corrupted_to_clean(bridge) -> None:
    clean, corrupted = _tokens(0), _tokens(1)
    metric = LogitDifference(answer=3, wrong=7)
    adapter = TransformerLensAdapter(bridge)
    result = activation_patching(adapter, clean, corrupted, ["blocks.1.hook_resid_post", "blocks.0.hook_resid_pre"], metric)
    assert result.values.shape == (2, SEQ)
    assert torch.allclose(result.values, (result.raw - result.corrupted) / (result.clean - result.corrupted))
    # The last block's output at the last position is everything the last logits see: fully restored.
    assert result.values[0, -1] == pytest.approx(1.0, abs=1e-5)
    # Noising the same cell destroys the clean answer completely.
    noised = activation_patching(adapter, clean, corrupted, ["blocks.1.hook_resid_post"], metric, positions=[SEQ - 1], patch_into="clean")
    assert noised.kind == "noising" and noised.values[0, 0] == pytest.approx(0.0, abs=1e-5)
    frame = result.to_dataframe()
    assert len(frame) == 2 * SEQ and set(frame.columns) >= {"site", "position", "value", "raw"}
    figure = result.plot()
    assert figure.axes and "denoising" in result._repr_html_() + repr(result)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(VOCAB, 8)
        self.rnn = nn.GRU(8, 16, batch_first=True)
        self.readout = nn.Linear(16, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.readout(self.rnn(self.embedding(tokens))[0])


def test_a_fused_gru_is_patched_step_by_step_exactly() -> None:
    adapter = TorchModuleAdapter(_Recurrent().eval())
    clean = _tokens(0)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 5) % VOCAB  # the runs differ at step 2 only
    answers = adapter.logits(clean)[:, -1].argmax(-1)
    result = activation_patching(adapter, clean, corrupted, ["rnn.h_l0", "embedding"], AnswerProbability(answers))
    # The state after step t >= 2 carries everything the later steps need: the clean run, exactly.
    assert torch.allclose(result.values[0, 2:], torch.ones(SEQ - 2), atol=1e-5)
    # Before step 2 the corrupted token still comes after the patch: not restored.
    assert (result.values[0, :2] - 1).abs().min() > 1e-3
    # The embedding differs only at step 2: patching it there restores, elsewhere changes nothing.
    assert result.values[1, 2] == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(result.values[1, [0, 1, 3, 4, 5]], torch.zeros(5), atol=1e-5)


def test_nnsight_patching_equals_plain_forward_hooks() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16)).eval()
    adapter = NNsightAdapter(model)
    clean, corrupted = _tokens(0), _tokens(1)
    metric = AnswerProbability(answer=5, position=-1)
    result = activation_patching(adapter, clean, corrupted, ["transformer.h.0.output"], metric, positions=[1, 4], normalize=False)
    with torch.no_grad():
        stored = {}
        handle = model.transformer.h[0].register_forward_hook(lambda m, a, out: stored.setdefault("clean", out[0] if isinstance(out, tuple) else out))
        model(clean)
        handle.remove()
        for j, position in enumerate((1, 4)):
            def patch(module, args, output, position=position):
                hidden = output[0] if isinstance(output, tuple) else output
                hidden = hidden.clone()
                hidden[:, position] = stored["clean"][:, position]
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            handle = model.transformer.h[0].register_forward_hook(patch)
            expected = metric(model(corrupted).logits)
            handle.remove()
            assert float(result.raw[0, j]) == pytest.approx(float(expected), abs=1e-6)


def test_ablations_follow_their_definitions(bridge) -> None:
    adapter = TransformerLensAdapter(bridge)
    inputs, reference = _tokens(0), _tokens(5)
    metric = AnswerAccuracy(answer=adapter.logits(inputs)[:, -1].argmax(-1))
    site = "blocks.1.hook_resid_post"

    def run_with(rows: Tensor) -> float:
        def replace(activation: Tensor, hook=None) -> Tensor:
            activation = activation.clone()
            activation[:, -1] = rows
            return activation

        return float(metric(bridge.run_with_hooks(inputs, fwd_hooks=[(site, replace)])))

    with torch.no_grad():
        _, cache = bridge.run_with_cache(reference)
        reference_last = cache[site][:, -1]
        mean = ablation(adapter, inputs, site, metric, kind="mean", positions=[SEQ - 1], reference=reference)
        assert float(mean.raw[0, 0]) == pytest.approx(run_with(reference_last.mean(0).expand(BATCH, -1)))
        zero = ablation(adapter, inputs, site, metric, kind="zero", positions=[SEQ - 1])
        assert float(zero.raw[0, 0]) == pytest.approx(run_with(torch.zeros(BATCH, reference_last.shape[-1])))
        first = ablation(adapter, inputs, site, metric, kind="resample", positions=[SEQ - 1], reference=reference, seed=3)
        again = ablation(adapter, inputs, site, metric, kind="resample", positions=[SEQ - 1], reference=reference, seed=3)
        donors = torch.randint(0, BATCH, (BATCH,), generator=torch.Generator().manual_seed(3))
        assert float(first.raw[0, 0]) == pytest.approx(run_with(reference_last[donors])) and torch.equal(first.raw, again.raw)
    assert mean.kind == "mean ablation" and not mean.normalized and mean.clean == 1.0
    normalised = ablation(adapter, inputs, site, metric, kind="zero", corrupted=_tokens(1))
    assert normalised.normalized and normalised.values.shape == (1, SEQ)


def test_bad_inputs_are_explained(bridge) -> None:
    adapter = TransformerLensAdapter(bridge)
    clean, corrupted = _tokens(0), _tokens(1)
    metric = LogitDifference(3, 7)
    with pytest.raises(ValueError, match="same batch and length"):
        activation_patching(adapter, clean, corrupted[:, :4], "blocks.0.hook_resid_pre", metric)
    with pytest.raises(IndexError, match=r"beyond the prompts.*0\.\.5"):
        activation_patching(adapter, clean, corrupted, "blocks.0.hook_resid_pre", metric, positions=[2, 6])
    with pytest.raises(ValueError, match="outside the model's vocabulary of 24"):
        activation_patching(adapter, clean, corrupted, "blocks.0.hook_resid_pre", LogitDifference(30, 2))
    with pytest.raises(SiteError, match="Valid sites"):
        activation_patching(adapter, clean, corrupted, "blocks.0.hook_resid", metric)
    with pytest.raises(ValueError, match="normalize=False"):
        activation_patching(adapter, clean, clean, "blocks.0.hook_resid_pre", metric)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    other = mask.clone()
    other[0, 0] = 0
    with pytest.raises(ValueError, match="attention masks differ"):
        activation_patching(adapter, {"input": clean, "attention_mask": mask}, {"input": corrupted, "attention_mask": other}, "blocks.0.hook_resid_pre", metric)
    with pytest.raises(ValueError, match="patch_into"):
        activation_patching(adapter, clean, corrupted, "blocks.0.hook_resid_pre", metric, patch_into="source")
    with pytest.raises(ValueError, match="same position"):
        ablation(adapter, clean, "blocks.0.hook_resid_pre", metric, reference=_tokens(2)[:, :5])
    with pytest.raises(ValueError, match="kind"):
        ablation(adapter, clean, "blocks.0.hook_resid_pre", metric, kind="median")
    with pytest.raises(TypeError, match="token ids"):
        LogitDifference(3.0, 2)
    for position in (4.7, torch.tensor([4.9, 4.2, 3.5, 2.5]), True):  # read as 4, [4, 4, 3, 2] and 1 before
        with pytest.raises(TypeError, match="position must be whole numbers"):
            LogitDifference(3, 2, position=position)
    right_padded = mask.clone()
    right_padded[1, 4:] = 0
    for run in (
        lambda: activation_patching(adapter, {"input": clean, "attention_mask": right_padded},
                                    {"input": corrupted, "attention_mask": right_padded}, "blocks.0.hook_resid_pre", metric, positions=[0, 1]),
        lambda: ablation(adapter, {"input": clean, "attention_mask": right_padded}, "blocks.0.hook_resid_pre", metric, positions=[0, 1]),
    ):
        with pytest.raises(IndexError, match=r"reads position 5 of example 1, which is padding.*last token is at 3.*attention_mask.sum\(1\) - 1"):
            run()
    per_row = LogitDifference(3, 7, position=right_padded.sum(1) - 1)
    assert ablation(adapter, {"input": clean, "attention_mask": right_padded}, "blocks.0.hook_resid_pre", per_row, positions=[0, 1]).raw.isfinite().all()
    with pytest.raises(ValueError, match="one example needs a reference"):
        ablation(adapter, clean[:1], "blocks.0.hook_resid_pre", metric, kind="resample")
    assert isinstance(activation_patching(adapter, clean, corrupted, "blocks.0.hook_resid_pre", metric, positions=[0]), PatchingResult)


def test_resample_ablation_within_the_inputs_takes_another_examples_activation(bridge) -> None:
    adapter = TransformerLensAdapter(bridge)
    inputs, site = _tokens(0), "blocks.0.hook_resid_post"
    metric = LogitDifference(3, 7)
    taken = []
    with torch.no_grad():
        _, cache = bridge.run_with_cache(inputs)
    own = cache[site][:, 2]
    for seed in range(5):
        original = adapter.run_with_replacement

        def spy(inputs_, site_, positions, replace, original=original):
            rows = replace(own, torch.arange(BATCH), torch.zeros(BATCH, dtype=torch.long))
            taken.append(rows)
            return original(inputs_, site_, positions, replace)

        adapter.run_with_replacement = spy
        try:
            ablation(adapter, inputs, site, metric, kind="resample", positions=[2], seed=seed, prefix_cache=False)
        finally:
            del adapter.run_with_replacement
    for rows in taken:
        same = (rows[:, None] - own[None]).abs().amax(-1) < 1e-6  # (example, donor) pairs with equal rows
        assert not bool(same.diagonal().any())  # no example keeps its own activation
        assert bool(same.any(1).all())  # each took some example's


def test_a_recurrent_site_from_the_demo_model_zoo() -> None:
    model = RecurrentLM(RecurrentConfig(vocab_size=VOCAB, embedding_size=8, hidden_size=16, cell="lstm")).eval()
    adapter = TorchModuleAdapter(model)
    clean = _tokens(0)
    corrupted = clean.clone()
    corrupted[:, 1] = (clean[:, 1] + 3) % VOCAB
    answers = adapter.logits(clean)[:, -1].argmax(-1)
    result = activation_patching(adapter, clean, corrupted, ["rnn.hc_l0"], LogitDifference(answers, (answers + 1) % VOCAB))
    assert torch.allclose(result.values[0, 1:], torch.ones(SEQ - 1), atol=1e-4)


# -- cells run from cached states (and keys and values) -------------------------------------------


@pytest.fixture(scope="module", params=["gpt2, nnsight", "llama, nnsight", "llama, TransformerLens", "gemma3, TransformerLens", "native bridge"])
def patched_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, bridge):
    """``(adapter, site, clean, corrupted, positions)``: Hugging Face models through nnsight and
    TransformerLens bridges (cells from keys and values; left-padded llama and gemma3 with a
    sliding window of 4), and a native bridge (cells from the site's states only)."""
    from test_prefix_cache import VOCAB as HF_VOCAB, _bridge, _hf_folder, _padded_inputs
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    kind = request.param
    if kind == "native bridge":
        return TransformerLensAdapter(bridge), "blocks.0.hook_resid_post", _tokens(0), _tokens(1), list(range(SEQ))
    if kind == "gpt2, nnsight":
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=2, n_positions=16)).eval()
        return NNsightAdapter(model), "transformer.h.1.output", _tokens(0), _tokens(1), list(range(SEQ))
    model_kind, backend = kind.split(", ")
    folder = _hf_folder(tmp_path_factory, model_kind)
    if backend == "nnsight":
        adapter, site = NNsightAdapter(AutoModelForCausalLM.from_pretrained(folder).eval()), "model.layers.1.output"
    else:
        adapter, site = _bridge(folder), "blocks.1.hook_resid_post"
    clean = _padded_inputs("input_ids")
    corrupted = dict(clean, input_ids=torch.where(clean["attention_mask"].bool(), torch.randint(1, HF_VOCAB, clean["input_ids"].shape, generator=torch.Generator().manual_seed(5)), 0))
    return adapter, site, clean, corrupted, [5, 6, 8, 10]  # the positions every row has


def _counting_whole_runs(adapter, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    whole = adapter.run_with_replacement

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return whole(*args, **kwargs)

    monkeypatch.setattr(adapter, "run_with_replacement", counted)
    return calls


@pytest.mark.parametrize("patch_into", ["corrupted", "clean"])
def test_cells_from_cached_runs_equal_whole_runs(patched_model, patch_into: str, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter, site, clean, corrupted, positions = patched_model
    metric = LogitDifference(answer=3, wrong=7)
    whole = activation_patching(adapter, clean, corrupted, site, metric, positions=positions, patch_into=patch_into, normalize=False, prefix_cache=False)
    calls = _counting_whole_runs(adapter, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        cached = activation_patching(adapter, clean, corrupted, site, metric, positions=positions, patch_into=patch_into, normalize=False)
    assert (cached.raw - whole.raw).abs().max() < 1e-5
    # One whole run to check the first cached cell, and, where the cells run from keys and values,
    # one for position 0 (there is nothing before it to keep); every other cell from the caches.
    assert len(calls) == 1 + (adapter.supports_key_values(site) and 0 in positions)
    ablated = ablation(adapter, clean, site, metric, kind="mean", positions=positions)
    assert (ablated.raw - ablation(adapter, clean, site, metric, kind="mean", positions=positions, prefix_cache=False).raw).abs().max() < 1e-5


def test_cells_that_a_cached_run_gets_wrong_run_whole_with_a_warning(patched_model, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter, site, clean, corrupted, positions = patched_model
    metric = LogitDifference(answer=3, wrong=7)
    whole = activation_patching(adapter, clean, corrupted, site, metric, positions=positions, normalize=False, prefix_cache=False)
    resume = adapter.run_from_prefix
    monkeypatch.setattr(adapter, "run_from_prefix", lambda *args: resume(*args) + 1.0)
    with pytest.warns(UserWarning, match=f"patching {site!r} from cached .* away from the whole run's; each of its cells runs the whole model"):
        result = activation_patching(adapter, clean, corrupted, site, metric, positions=positions, normalize=False)
    assert (result.raw - whole.raw).abs().max() < 1e-6


def test_cells_whose_keys_and_values_cannot_be_read_run_from_the_states_with_a_warning(patched_model, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter, site, clean, corrupted, positions = patched_model
    if not adapter.supports_key_values(site):
        pytest.skip("this adapter keeps no keys and values")
    metric = LogitDifference(answer=3, wrong=7)
    whole = activation_patching(adapter, clean, corrupted, site, metric, positions=positions, normalize=False, prefix_cache=False)

    def refused(*args: object, **kwargs: object) -> None:
        raise ValueError("runs from cached keys and values take token ids and an attention_mask only")

    monkeypatch.setattr(adapter, "key_value_prefix", refused)
    with pytest.warns(UserWarning, match="from cached keys and values failed \\(ValueError: runs from cached keys .*\\); its cells run from the states"):
        result = activation_patching(adapter, clean, corrupted, site, metric, positions=positions, normalize=False)
    assert (result.raw - whole.raw).abs().max() < 1e-5
