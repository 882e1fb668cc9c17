"""Rows whose prompts begin alike run those positions once (masalign.adapters.shared_prefix).

The bookkeeping (groups exact even when hashes collide, counts, where to cut) on
token tensors, and the segmented reads of the nnsight adapter over Hugging Face Llama,
GPT-2 and Gemma-3 and of the TransformerLens adapter over TransformerBridges of Llama and Gemma-3 (sliding windows shorter than the prompts: read in one run;
longer: in segments): prefixes and
source reads equal the plain ones, the runs from them equal the full run, and the
blocks run fewer positions.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

from masalign import CounterfactualPairs, ModelAlignment, fit
from masalign.adapters import NNsightAdapter, TransformerLensAdapter
from masalign.adapters import shared_prefix
from masalign.adapters.key_values import KeyValueRuns
from masalign.adapters.resume import KeyValuePrefix
from masalign.adapters.shared_prefix import distinct_prefix_counts, plan_segments, prefix_columns, prefix_groups

from test_key_value_prefix import _site, _stack, saved_with_tokenizer
from test_prefix_cache import SEQ, VOCAB, _bridge, _hf_folder, assert_same_subspaces

START = 8


def _template_inputs(rows: int = 24, seed: int = 0) -> dict[str, Tensor]:
    """Rows built like templated prompts: 3 shared tokens, one of 3 words (3 tokens), one of 4
    (2 tokens), then free tokens; every fourth row left-padded by 1 (its mask differs)."""
    generator = torch.Generator().manual_seed(seed)
    words_a = torch.randint(1, VOCAB, (3, 3), generator=generator)
    words_b = torch.randint(1, VOCAB, (4, 2), generator=generator)
    tokens = torch.cat(
        [
            torch.tensor([5, 6, 7]).expand(rows, 3),
            words_a[torch.randint(0, 3, (rows,), generator=generator)],
            words_b[torch.randint(0, 4, (rows,), generator=generator)],
            torch.randint(1, VOCAB, (rows, SEQ - 8), generator=generator),
        ],
        dim=1,
    )
    mask = torch.ones(rows, SEQ, dtype=torch.long)
    mask[::4, 0] = 0
    tokens[::4, 0] = 0
    return {"input_ids": tokens, "attention_mask": mask}


# -- the bookkeeping ---------------------------------------------------------------------------


def _brute_counts(columns: Tensor) -> list[int]:
    return [len({tuple(row[:c].tolist()) for row in columns}) for c in range(columns.shape[1] + 1)]


def test_distinct_prefix_counts_are_those_of_the_rows() -> None:
    inputs = _template_inputs()
    columns = prefix_columns(inputs["input_ids"], inputs["attention_mask"])
    assert distinct_prefix_counts(columns).tolist() == _brute_counts(columns)
    assert distinct_prefix_counts(columns)[3] == 2  # the padded rows' mask makes them a prefix of their own


@pytest.mark.parametrize("collide", [False, True])
def test_groups_hold_rows_with_equal_prefixes_only(monkeypatch: pytest.MonkeyPatch, collide: bool) -> None:
    if collide:  # every prefix hashes alike: the column check must still split the groups
        monkeypatch.setattr(shared_prefix, "_prefix_hashes", lambda columns: torch.zeros(columns.shape, dtype=torch.float64))
    inputs = _template_inputs()
    columns = prefix_columns(inputs["input_ids"], inputs["attention_mask"])
    segments = prefix_groups(columns, [0, 3, 6, 8, SEQ])
    assert [(s.start, s.end) for s in segments] == [(0, 3), (3, 6), (6, 8), (8, SEQ)]
    for segment in segments:
        first = segment.first_row[segment.group_of_row]
        assert (columns[:, : segment.end] == columns[first, : segment.end]).all()
        if not collide:  # one group per distinct prefix
            assert segment.n_groups == _brute_counts(columns)[segment.end]


def test_cuts_are_planned_where_rows_share_prefixes_and_only_where_that_pays() -> None:
    inputs = _template_inputs(rows=200)
    counts = distinct_prefix_counts(prefix_columns(inputs["input_ids"], inputs["attention_mask"]))
    cuts = plan_segments(counts, SEQ, lambda a, b: 2.0, 200 * SEQ * 2.0)
    assert len(cuts) > 2 and cuts[0] == 0 and cuts[-1] == SEQ
    distinct = torch.randint(1, VOCAB, (200, SEQ), generator=torch.Generator().manual_seed(3))
    assert plan_segments(distinct_prefix_counts(prefix_columns(distinct, None)), SEQ, lambda a, b: 2.0, 200 * SEQ * 2.0) == [0, SEQ]
    # Few rows: a run's fixed cost outweighs what sharing saves.
    few = distinct_prefix_counts(prefix_columns(inputs["input_ids"][:3], inputs["attention_mask"][:3]))
    assert plan_segments(few, SEQ, lambda a, b: 2.0, 3 * SEQ * 2.0) == [0, SEQ]


# -- the adapter's segmented reads -------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma3", "gemma3 window 16", "llama, TransformerLens", "gemma3 window 16, TransformerLens"])
def adapter(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> NNsightAdapter | TransformerLensAdapter:
    # gemma3: sliding windows of 4, shorter than the prompts (read in one run); of 16, longer.
    # TransformerLens: a TransformerBridge over the same Hugging Face model.
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    kind, _, backend = request.param.partition(", ")
    if kind == "gpt2":
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=3, n_head=2, bos_token_id=None, eos_token_id=None)
        return NNsightAdapter(GPT2LMHeadModel(config).eval())
    if kind == "gemma3 window 16":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        torch.manual_seed(0)
        config = Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, max_position_embeddings=64, pad_token_id=0, sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        )  # fmt: skip
        model = Gemma3ForCausalLM(config).eval()
        if not backend:
            return NNsightAdapter(model)
        return _bridge(saved_with_tokenizer(model, tmp_path_factory.mktemp("gemma3")))
    folder = _hf_folder(tmp_path_factory, kind)
    if backend:
        return _bridge(folder)
    return NNsightAdapter(AutoModelForCausalLM.from_pretrained(folder).eval())


def _segmented(adapter: NNsightAdapter | TransformerLensAdapter) -> bool:
    """Whether this model reads in segments: not where a sliding window is shorter than the prompts."""
    return getattr(adapter._key_values.model.config, "sliding_window", None) in (None, 16)


def assert_equal_at_real_tokens(ours: KeyValuePrefix, theirs: KeyValuePrefix, mask: Tensor) -> None:
    """States, keys and values equal (1e-5) at real tokens. Padding's are never read: positions lie
    on real tokens and nothing attends to padding (a bridge's attention gives padding queries, which
    attend to nothing, other states in runs of other lengths)."""
    real = mask.bool()
    assert ours.states.shape == theirs.states.shape
    assert (ours.states[real] - theirs.states[real]).abs().max() < 1e-5
    for a, b in zip(ours.keys + ours.values, theirs.keys + theirs.values, strict=True):
        assert a.shape == b.shape
        kept = real[:, : a.shape[2]]
        assert (a.transpose(1, 2)[kept] - b.transpose(1, 2)[kept]).abs().max() < 1e-5


def _mlp_positions(adapter: NNsightAdapter | TransformerLensAdapter, read) -> tuple[object, int]:  # noqa: ANN001
    """``read()``'s value and how many positions the first block's MLP ran."""
    ran: list[int] = []
    handle = _stack(adapter)[0].mlp.register_forward_hook(lambda module, args, output: ran.append(args[0].shape[0] * args[0].shape[1]))
    try:
        return read(), sum(ran)
    finally:
        handle.remove()


@pytest.mark.parametrize("layer", [0, 1, "last"])
@pytest.mark.parametrize("cuts", [None, [0, 3, 6, 8, SEQ]], ids=["planned", "given"])
def test_a_segmented_prefix_equals_the_plain_one_and_resumes_as_the_full_run(
    adapter: NNsightAdapter | TransformerLensAdapter, layer: int | str, cuts: list[int] | None
) -> None:
    index = len(_stack(adapter)) - 1 if layer == "last" else layer
    site = _site(adapter, index)
    inputs = _template_inputs(rows=200)  # enough rows for the plan to cut (a run's fixed cost outweighs a few rows' sharing)
    with torch.no_grad():
        plain, plain_work = _mlp_positions(adapter, lambda: adapter.key_value_prefix(inputs, site, START, cuts=[0, SEQ]))
        shared, shared_work = _mlp_positions(adapter, lambda: adapter.key_value_prefix(inputs, site, START, cuts=cuts))
    assert shared.start == plain.start
    assert_equal_at_real_tokens(shared, plain, inputs["attention_mask"])
    if _segmented(adapter):
        assert shared_work < plain_work * 0.6  # the shared positions ran once
    else:
        assert shared_work == plain_work

    positions = torch.full((200, 1), SEQ - 2)
    direction = torch.linspace(-1, 1, adapter.sites()[site])

    def replace(hidden: Tensor, example_index: Tensor, slot_index: Tensor) -> Tensor:
        return hidden + direction

    with torch.no_grad():
        full = adapter.run_with_replacement(inputs, site, positions, replace)
        resumed = adapter.run_from_prefix(inputs, site, shared, positions, replace)
    assert (resumed[:, START:] - full[:, START:]).abs().max() < 1e-5


@pytest.mark.parametrize("layer", [0, 1, "last"])
@pytest.mark.parametrize("cuts", [None, [0, 3, 6, SEQ - 1]], ids=["planned", "given"])
def test_a_segmented_source_read_equals_the_full_read(adapter: NNsightAdapter | TransformerLensAdapter, layer: int | str, cuts: list[int] | None) -> None:
    index = len(_stack(adapter)) - 1 if layer == "last" else layer
    site = _site(adapter, index)
    inputs = _template_inputs(rows=200)
    # Reads at the second-to-last token, and at an earlier one (or none: an empty slot) beside it.
    positions = torch.full((200, 2), -1)
    positions[:, 0] = SEQ - 2
    positions[1::3, 1] = 8
    with torch.no_grad():
        full = adapter.activations(inputs, site, positions)
        shorter = adapter.key_value_activations(inputs, site, positions, cuts=cuts)
    assert shorter.shape == full.shape
    assert (shorter - full).abs().max() < 1e-5
    assert (shorter[positions < 0] == 0).all()


def test_cuts_that_do_not_rise_from_the_start_to_the_end_are_refused(adapter: NNsightAdapter | TransformerLensAdapter) -> None:
    if not _segmented(adapter):
        pytest.skip("sliding-window layers read in one run; cuts are not used")
    site = _site(adapter, 1)
    with pytest.raises(ValueError, match=r"cuts must rise from 0 to 11 \(the positions read\); got \[0, 5, 5, 11\]"):
        adapter.key_value_prefix(_template_inputs(), site, START, cuts=[0, 5, 5, SEQ])


def test_a_fit_over_segmented_reads_trains_as_one_over_plain_reads(adapter: NNsightAdapter | TransformerLensAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _site(adapter, 1)
    base, source = _template_inputs(256, seed=1), _template_inputs(256, seed=2)
    labels = torch.full((256, SEQ), -100)
    labels[:, -1] = torch.randint(1, VOCAB, (256,), generator=torch.Generator().manual_seed(4))
    positions = torch.full((256, 1), SEQ - 2)
    data = CounterfactualPairs(base, source, positions, positions, labels, variable="count")
    options = {"steps": 4, "batch_size": 64, "lr": 1e-2, "eval_every": 3, "progress": False, "seed": 0}

    def fitted() -> tuple[list[float], dict[str, Tensor]]:
        alignment = ModelAlignment({"A": adapter}, site, subspace_dim=4, seed=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to full runs
            result = fit(alignment, data, data, **options)
        return [entry["valid_loss"] for entry in result.history], alignment.state_dict()

    planned: list[bool] = []
    segments = KeyValueRuns._shared_prefix_segments

    def spied(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        found = segments(self, *args, **kwargs)
        planned.append(found is not None)
        return found

    monkeypatch.setattr(KeyValueRuns, "_shared_prefix_segments", spied)
    shared_losses, shared_state = fitted()
    assert any(planned) == _segmented(adapter)
    monkeypatch.setattr(KeyValueRuns, "_shared_prefix_segments", lambda self, *args, **kwargs: None)
    plain_losses, plain_state = fitted()
    assert shared_losses == pytest.approx(plain_losses, abs=1e-5)
    assert_same_subspaces(shared_state, plain_state)


def test_rows_padded_past_a_cut_read_as_in_one_run(adapter: NNsightAdapter | TransformerLensAdapter) -> None:
    # Left padding of 0, 2 and 5 tokens: the third row's first two segments are padding only.
    from test_prefix_cache import _padded_inputs

    inputs = _padded_inputs("input_ids")
    site = _site(adapter, 1)
    cuts = [0, 3, 6, SEQ]
    with torch.no_grad():
        plain = adapter.key_value_prefix(inputs, site, START, cuts=[0, SEQ])
        shared = adapter.key_value_prefix(inputs, site, START, cuts=cuts)
        assert_equal_at_real_tokens(shared, plain, inputs["attention_mask"])
        positions = torch.tensor([[9], [8], [10]])
        full = adapter.activations(inputs, site, positions)
        assert (adapter.key_value_activations(inputs, site, positions, cuts=cuts) - full).abs().max() < 1e-5
