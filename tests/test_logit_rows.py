"""Logits at the label positions only: the same numbers as the full run's, at those positions.

On tiny models of every adapter kind (TransformerBridge over its native model and
over Hugging Face Llama and Gemma-3 with logit soft-capping, nnsight over the same,
a HookedRootModule, and a recurrent model without an unembedding to restrict), the
restricted logits and the gradient reaching the replacement equal the full run's
gathered at those positions, with replacement and resumed from a cached prefix;
fit and evaluate give the same results as with full logits; a head that mixes
positions is detected and run in full.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from masalign import CounterfactualPairs, ModelAlignment, evaluate, fit
from masalign import logit_rows
from masalign.adapters import NNsightAdapter, TransformerLensAdapter
from masalign.adapters.base import logits_only_at
from masalign.data import IGNORE_INDEX
from masalign.logit_rows import label_slots, logits_at, restricts_logits

from transformer_fixtures import TinyHookedTransformer, save_tiny_gpt2, tiny_tl_transformer

VOCAB, SEQ = 40, 9
TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def hf_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shared = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=64, pad_token_id=0)
    if request.param == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shared))
    else:
        # Soft-capping at 2 bends every logit: an elementwise step after the head, kept exact.
        model = Gemma3ForCausalLM(Gemma3TextConfig(**shared, sliding_window=4, final_logit_softcapping=2.0))
    folder = tmp_path_factory.mktemp(request.param)
    save_tiny_gpt2(folder, vocab_size=VOCAB)
    model.save_pretrained(folder)
    return str(folder)


def _inputs(key: str) -> dict[str, Tensor]:
    tokens = torch.randint(1, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, -2:] = 0  # right padding in one row
    return {key: tokens, "attention_mask": mask}


SITE_POSITIONS = torch.tensor([[2], [3], [5]])
LOGIT_POSITIONS = torch.tensor([[8, 4], [6, 0], [7, 8]])


def _assert_restricted_equals_full(adapter, inputs: dict[str, Tensor], site: str, resumable: bool = True) -> None:
    assert restricts_logits(adapter, inputs)
    direction = torch.linspace(-1, 1, adapter.sites()[site])

    def run(restricted: bool, resumed: bool) -> tuple[Tensor, Tensor]:
        scale = torch.tensor(0.9, requires_grad=True)

        def replace(hidden: Tensor, example_index: Tensor, slot_index: Tensor) -> Tensor:
            return hidden + scale * direction

        def forward() -> Tensor:
            if resumed:
                with torch.no_grad():
                    prefix = adapter.prefix(inputs, site)
                return adapter.run_from_prefix(inputs, site, prefix, SITE_POSITIONS, replace)
            return adapter.run_with_replacement(inputs, site, SITE_POSITIONS, replace)

        if restricted:
            with logits_only_at(adapter.output_module(), LOGIT_POSITIONS):
                logits = forward()
        else:
            logits = forward()[torch.arange(3)[:, None], LOGIT_POSITIONS]
        assert logits.shape == (3, 2, VOCAB)
        (logits.log_softmax(-1)[..., 5]).sum().backward()
        return logits.detach(), scale.grad

    for resumed in (False, True) if resumable else (False,):
        full, full_grad = run(False, resumed)
        restricted, restricted_grad = run(True, resumed)
        assert (full - restricted).abs().max() < TOLERANCE
        assert (full_grad - restricted_grad).abs() < TOLERANCE * max(1.0, float(full_grad.abs()))


def test_label_slots_puts_each_rows_labels_first_in_order() -> None:
    labels = torch.full((3, 6), IGNORE_INDEX)
    labels[0, [2, 4]] = torch.tensor([7, 8])
    labels[1, 5] = 9
    positions, slot_labels = label_slots(labels)
    assert positions.tolist() == [[2, 4], [5, 0], [0, 0]]
    assert slot_labels.tolist() == [[7, 8], [9, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX]]


def test_bridge_over_hf(hf_folder: str) -> None:
    from transformer_lens import TransformerBridge

    adapter = TransformerLensAdapter(TransformerBridge.boot_transformers(hf_folder, device="cpu").eval())
    _assert_restricted_equals_full(adapter, {"input": _inputs("input")["input"]}, "blocks.1.hook_resid_post")


def test_nnsight_over_hf(hf_folder: str) -> None:
    from transformers import AutoModelForCausalLM

    adapter = NNsightAdapter(AutoModelForCausalLM.from_pretrained(hf_folder).eval())
    _assert_restricted_equals_full(adapter, _inputs("input_ids"), "model.layers.1.output")


def test_native_bridge_and_hooked_root_module() -> None:
    bridge = TransformerLensAdapter(tiny_tl_transformer(VOCAB, n_layers=2, d_model=32).eval())
    _assert_restricted_equals_full(bridge, {"input": _inputs("input")["input"]}, "blocks.0.hook_resid_post", resumable=False)
    hooked = TransformerLensAdapter(TinyHookedTransformer(d_vocab=VOCAB, n_layers=2, n_ctx=SEQ).eval())
    _assert_restricted_equals_full(hooked, {"input": _inputs("input")["input"]}, "blocks.1.hook_resid_post")


class _MixingHead(nn.Module):
    """A head followed by a step that mixes positions (a cumulative sum over the sequence)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.body = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, VOCAB)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.lm_head(self.body(self.embed(input_ids))).cumsum(dim=1)


def test_a_head_that_mixes_positions_runs_in_full() -> None:
    adapter = NNsightAdapter(_MixingHead(), example_inputs=_inputs("input_ids"))
    inputs = _inputs("input_ids")
    with pytest.warns(UserWarning, match="mixes positions"):
        assert not restricts_logits(adapter, inputs)
    logits = logits_at(adapter, LOGIT_POSITIONS, inputs, lambda: adapter.logits(inputs))
    full = adapter.logits(inputs)
    assert torch.equal(logits, full[torch.arange(3)[:, None], LOGIT_POSITIONS])


def test_an_adapter_without_an_unembedding_gathers_the_full_logits() -> None:
    from masalign.adapters import TorchModuleAdapter

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.gru, self.head = nn.Embedding(VOCAB, 8), nn.GRU(8, 8, batch_first=True), nn.Linear(8, VOCAB)

        def forward(self, tokens: Tensor) -> Tensor:
            return self.head(self.gru(self.embed(tokens))[0])

    adapter = TorchModuleAdapter(Recurrent())
    tokens = _inputs("x")["x"]
    assert not restricts_logits(adapter, tokens)
    logits = logits_at(adapter, LOGIT_POSITIONS, tokens, lambda: adapter.logits(tokens))
    assert torch.equal(logits, adapter.logits(tokens)[torch.arange(3)[:, None], LOGIT_POSITIONS])


def _pairs(n: int, seed: int) -> CounterfactualPairs:
    generator = torch.Generator().manual_seed(seed)
    base = _inputs("input_ids")
    rows = torch.randint(0, 3, (n,), generator=generator)
    labels = torch.full((n, SEQ), IGNORE_INDEX)
    labels[:, 5] = torch.randint(1, VOCAB, (n,), generator=generator)
    labels[::2, 6] = torch.randint(1, VOCAB, (len(labels[::2]),), generator=generator)  # 1 or 2 labels a row
    return CounterfactualPairs(
        base_inputs={key: value[rows] for key, value in base.items()},
        source_inputs={key: value[rows.flip(0)] for key, value in base.items()},
        base_positions=SITE_POSITIONS[rows],
        source_positions=SITE_POSITIONS[rows.flip(0)],
        labels=labels,
    )


def test_fit_and_evaluate_give_the_same_results_as_with_full_logits(hf_folder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    adapter = NNsightAdapter(AutoModelForCausalLM.from_pretrained(hf_folder).eval())
    unembedded_rows = []
    adapter.output_module().register_forward_hook(lambda module, args, output: unembedded_rows.append(output.shape[1]))
    train, valid = _pairs(12, 0), _pairs(6, 1)
    results = []
    for restricted in (True, False):
        logit_rows._CHECKED.clear()
        if not restricted:
            monkeypatch.setattr(adapter, "output_module", lambda: None)
        unembedded_rows.clear()
        alignment = ModelAlignment({"A": adapter}, "model.layers.1.output", subspace_dim=4)
        result = fit(alignment, train, valid, steps=4, batch_size=4, eval_every=2, progress=False)
        report = evaluate(alignment, valid)
        # Restricted: two rows (the most labels a row has) in every training and evaluation run.
        assert (unembedded_rows.count(2) >= 4) == restricted
        results.append(([entry["valid_loss"] for entry in result.history], report.iia["A"]["A"], alignment.state_dict()))
    (losses, iia, state), (full_losses, full_iia, full_state) = results
    assert losses == pytest.approx(full_losses, abs=1e-5)
    assert iia == full_iia
    for key, value in state.items():
        assert (value - full_state[key]).abs().max() < 1e-5, key
