"""Steps that run only the positions from the first changed one, over cached keys and values.

The nnsight adapter over Hugging Face Llama, GPT-2 and Gemma-3 with sliding windows
shorter than the prompts (left-padded rows, attention masks), and the TransformerLens
adapter over TransformerBridges of the same models: the run from a
:class:`KeyValuePrefix` equals the full run at every position from its start, with
its gradient; a fit with it trains as one without any cache; a prefix that does not reproduce the full run falls back with a
warning; an interchange before the start is refused. And :class:`RowCache`,
which fills the caches as ``fit`` reads them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor

from masalign import CounterfactualPairs, ModelAlignment, fit
from masalign.adapters import NNsightAdapter, SiteError, TransformerLensAdapter
from masalign.adapters.resume import KeyValuePrefix
from masalign.prefix import dataset_prefixes, prefix_row_cache, suffix_start
from masalign.rowcache import RowCache

from test_prefix_cache import SEQ, VOCAB, _bridge, _hf_folder, _padded_inputs, assert_same_subspaces

POSITIONS = torch.tensor([[7, 10], [8, 9], [9, 8]])
START = 7


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma3", "llama, TransformerLens", "gpt2, TransformerLens", "gemma3, TransformerLens"])
def adapter(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> NNsightAdapter | TransformerLensAdapter:
    # gemma3: sliding-window layers with a window of 4, shorter than the prompts and the starts.
    # TransformerLens: a TransformerBridge over the same Hugging Face model.
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    kind, _, backend = request.param.partition(", ")
    if kind == "gpt2":
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=3, n_head=2, bos_token_id=None, eos_token_id=None)
        model = GPT2LMHeadModel(config).eval()
        if not backend:
            return NNsightAdapter(model)
        folder = saved_with_tokenizer(model, tmp_path_factory.mktemp("gpt2"))
    else:
        folder = _hf_folder(tmp_path_factory, kind)
    if backend:
        return _bridge(folder)
    return NNsightAdapter(AutoModelForCausalLM.from_pretrained(folder).eval())


def saved_with_tokenizer(model: torch.nn.Module, folder: Path) -> str:
    """``model`` written to ``folder`` beside a tokenizer, as a bridge boots from it."""
    from transformer_fixtures import save_tiny_gpt2

    save_tiny_gpt2(folder, vocab_size=VOCAB)  # for its tokenizer; the model is written over it
    model.save_pretrained(folder)
    return str(folder)


def _site(adapter: NNsightAdapter | TransformerLensAdapter, layer: int) -> str:
    if isinstance(adapter, TransformerLensAdapter):
        return f"blocks.{layer}.hook_resid_post"
    return next(site for site in adapter.sites() if site.endswith(f".{layer}.output") and "mlp" not in site and "attn" not in site)


@pytest.mark.parametrize("layer", [0, 1])
def test_the_run_from_keys_and_values_equals_the_full_run(adapter: NNsightAdapter | TransformerLensAdapter, layer: int) -> None:
    site = _site(adapter, layer)
    assert adapter.supports_key_values(site)
    inputs = _padded_inputs("input_ids")
    direction = torch.linspace(-1, 1, adapter.sites()[site], requires_grad=True)

    def replace(hidden: Tensor, example_index: Tensor, slot_index: Tensor) -> Tensor:
        return hidden + direction * (1 + slot_index[:, None])

    full = adapter.run_with_replacement(inputs, site, POSITIONS, replace)
    (full_gradient,) = torch.autograd.grad(full[:, START:].square().sum(), direction)
    prefix = adapter.key_value_prefix(inputs, site, START)
    assert isinstance(prefix, KeyValuePrefix) and prefix.start == START and prefix.states.shape == (3, SEQ, adapter.sites()[site])
    resumed = adapter.run_from_prefix(inputs, site, prefix, POSITIONS, replace)
    (resumed_gradient,) = torch.autograd.grad(resumed[:, START:].square().sum(), direction)
    assert resumed.shape == full.shape
    assert (resumed[:, START:] - full[:, START:]).abs().max() < 1e-5
    assert (resumed[:, :START] == 0).all()  # never read: no label lies before the start
    assert (resumed_gradient - full_gradient).abs().max() < 1e-4 * full_gradient.abs().max()


def _stack(adapter: NNsightAdapter | TransformerLensAdapter) -> torch.nn.ModuleList:
    if isinstance(adapter, TransformerLensAdapter):
        return adapter.model.blocks
    return next(m for name, m in adapter.model.named_modules() if isinstance(m, torch.nn.ModuleList) and name.endswith(("h", "layers")))


@pytest.mark.parametrize("layer", [0, 1, "last"])
def test_the_read_stops_once_the_last_blocks_keys_and_values_are_stored(adapter: NNsightAdapter | TransformerLensAdapter, layer: int | str) -> None:
    # The last block's attention output and MLP change nothing the prefix keeps: they must not run.
    stack = _stack(adapter)
    index = len(stack) - 1 if layer == "last" else layer
    site = _site(adapter, index)
    inputs = _padded_inputs("input_ids")
    ran: list[str] = []
    # With the site in the last block, that block must run whole, and nothing after it.
    watched = {"unembedding": adapter.output_module()} | ({} if layer == "last" else {"last MLP": stack[-1].mlp})
    handles = [m.register_forward_hook(lambda module, args, output, name=name: ran.append(name)) for name, m in watched.items()]
    try:
        prefix = adapter.key_value_prefix(inputs, site, START)
    finally:
        for handle in handles:
            handle.remove()
    assert ran == []
    assert len(prefix.keys) == len(stack) - 1 - index
    # The Hugging Face model's own runs, called as the adapter calls it (with the position ids it
    # gives left-padded rows; a bridge's attentions handed the cache).
    runs = adapter._key_values
    _, arguments = runs._call_arguments(inputs)
    with torch.no_grad():
        full = runs._forward(**arguments, use_cache=True, output_hidden_states=True)
        # The cache of a run of the positions before the start only: what a sliding-window
        # layer keeps of them is its window's last positions, not those of the whole run.
        before = runs._forward(**{name: value[:, :START] for name, value in arguments.items()}, use_cache=True)
    for j, (keys, values) in enumerate(zip(prefix.keys, prefix.values, strict=True), start=index + 1):
        assert keys.shape[2] == values.shape[2] == START
        layer_cache = (before.past_key_values if hasattr(before, 'past_key_values') else before.cache).layers[j]
        kept = layer_cache.keys.shape[2]
        # Padding's keys and values are never attended to (a bridge's attention gives padding
        # queries, which attend to nothing, other states in runs of other lengths).
        real = inputs["attention_mask"][:, START - kept : START].bool()
        assert torch.allclose(keys[:, :, -kept:].transpose(1, 2)[real], layer_cache.keys.transpose(1, 2)[real], atol=1e-6)
        assert torch.allclose(values[:, :, -kept:].transpose(1, 2)[real], layer_cache.values.transpose(1, 2)[real], atol=1e-6)
    if layer != "last":  # the last hidden state is after the final norm in Hugging Face models
        assert torch.allclose(prefix.states, full.hidden_states[index + 1], atol=1e-6)


def test_an_interchange_before_the_start_is_refused(adapter: NNsightAdapter | TransformerLensAdapter) -> None:
    site = _site(adapter, 1)
    inputs = _padded_inputs("input_ids")
    prefix = adapter.key_value_prefix(inputs, site, START + 2)
    with pytest.raises(ValueError, match="up to position 9, but the interchange writes position 7"):
        adapter.run_from_prefix(inputs, site, prefix, POSITIONS, lambda h, e, s: h)


def _pairs(n: int, seed: int) -> CounterfactualPairs:
    generator = torch.Generator().manual_seed(seed)
    base = _padded_inputs("input_ids")
    rows = torch.randint(0, 3, (n,), generator=generator)
    labels = torch.full((n, SEQ), -100)
    labels[:, -2:] = torch.randint(1, VOCAB, (n, 2), generator=generator)
    return CounterfactualPairs(
        base_inputs={key: value[rows] for key, value in base.items()},
        source_inputs={key: value[rows.flip(0)] for key, value in base.items()},
        base_positions=POSITIONS[rows][:, :1],
        source_positions=POSITIONS[rows.flip(0)][:, :1],
        labels=labels,
    )


def test_a_fit_over_keys_and_values_trains_as_one_without_any_cache(adapter: NNsightAdapter | TransformerLensAdapter) -> None:
    train, valid = _pairs(12, 0), _pairs(6, 1)
    site = _site(adapter, 1)
    assert suffix_start(train.base_positions, train.labels) == START
    fitted = []
    for prefix_cache in (False, True):
        alignment = ModelAlignment({"A": adapter}, site, subspace_dim=4)
        if prefix_cache:
            cache = dataset_prefixes(alignment, {"count": train}, ["A"])["count"]["A"]
            assert isinstance(cache[torch.arange(2)], KeyValuePrefix)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback
            result = fit(alignment, train, valid, steps=4, batch_size=4, eval_every=2, progress=False, prefix_cache=prefix_cache)
        fitted.append(([entry["valid_loss"] for entry in result.history], alignment.state_dict()))
    (losses, state), (cached_losses, cached_state) = fitted
    assert losses == pytest.approx(cached_losses, abs=1e-5)
    assert_same_subspaces(state, cached_state)


def test_keys_and_values_that_do_not_reproduce_the_full_run_fall_back(adapter: NNsightAdapter | TransformerLensAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _site(adapter, 1)
    data = _pairs(4, 0)
    build = adapter.key_value_prefix

    def wrong(*args: object) -> KeyValuePrefix:
        prefix = build(*args)
        return prefix.with_tensors([prefix.states, *(torch.zeros_like(t) for t in prefix.tensors()[1:])])

    monkeypatch.setattr(adapter, "key_value_prefix", wrong)
    with pytest.warns(UserWarning, match="cached keys and values gives logits .* away from the full run"):
        cache = prefix_row_cache(adapter, site, data.base_inputs, data.base_positions, adapter.sites()[site], start=START)
    assert isinstance(cache.full(), Tensor)  # the plain prefix: every position runs


def test_the_check_compares_real_tokens_only_so_padding_past_the_start_keeps_the_keys_and_values(
    adapter: NNsightAdapter | TransformerLensAdapter,
) -> None:
    # Rows 1 and 2 of the padded inputs (2 and 5 padding tokens) from start 3: row 2's positions 3-4
    # are padding, whose states a bridge's run from the cache gives otherwise (no query reads them).
    site = _site(adapter, 1)
    inputs = {key: value[1:] for key, value in _padded_inputs(_token_key(adapter)).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = prefix_row_cache(adapter, site, inputs, torch.tensor([[4], [6]]), adapter.sites()[site], start=3)
    assert isinstance(cache[torch.arange(2)], KeyValuePrefix)


def _token_key(adapter: NNsightAdapter | TransformerLensAdapter) -> str:
    return "input" if isinstance(adapter, TransformerLensAdapter) else "input_ids"


def test_a_row_cache_computes_each_row_once_and_returns_rows_in_order() -> None:
    asked: list[list[int]] = []

    def compute(rows: Tensor) -> Tensor:
        asked.append(rows.tolist())
        return torch.stack([rows.float(), -rows.float()], dim=1)

    cache = RowCache(10, compute, batch_size=3)
    assert cache.n_computed == 0 and not cache.complete
    assert cache[torch.tensor([4, 1, 4])].tolist() == [[4, -4], [1, -1], [4, -4]]
    assert asked == [[1, 4]]
    assert cache[torch.tensor([1, 2])].tolist() == [[1, -1], [2, -2]]
    assert asked[-1] == [2]
    full = cache.full()
    assert cache.complete and full[:, 0].tolist() == list(range(10))
    assert all(len(chunk) <= 3 for chunk in asked) and sorted(sum(asked, [])) == list(range(10))


def test_a_row_cache_reads_ahead_the_rows_it_is_told_come_next() -> None:
    asked: list[list[int]] = []

    def compute(rows: Tensor) -> Tensor:
        asked.append(rows.tolist())
        return rows.float()[:, None] * 10

    cache = RowCache(12, compute, batch_size=8)
    cache.read_ahead(torch.tensor([7, 2, 9, 4, 0, 11, 3]), rows=5)
    assert cache[torch.tensor([5, 1])].tolist() == [[50.0], [10.0]]
    assert asked == [[1, 5, 7, 2, 9]]  # the two asked for, then the next three to come, in one run
    assert cache[torch.tensor([7, 2, 9])][:, 0].tolist() == [70.0, 20.0, 90.0] and len(asked) == 1
    assert cache[torch.tensor([4, 6])][:, 0].tolist() == [40.0, 60.0]
    assert asked[-1] == [4, 6, 0, 11, 3]  # rows already read are not read again
    cache.read_ahead(torch.tensor([8, 10]), rows=100)  # at most one chunk (batch_size 8)
    assert cache[torch.tensor([8])][:, 0].tolist() == [80.0] and asked[-1] == [8, 10]
    assert cache.full()[:, 0].tolist() == [10.0 * row for row in range(12)]
    assert sorted(sum(asked, [])) == list(range(12))


def test_a_row_cache_computes_rows_with_equal_inputs_once() -> None:
    from masalign.rowcache import first_rows_alike

    tokens = torch.tensor([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4], [1, 2], [7, 8], [5, 6]])
    positions = torch.tensor([[1], [1], [1], [0], [1], [0], [1], [0]])  # row 5 differs from row 0 here
    first = first_rows_alike({"input_ids": tokens}, positions)()
    assert first.tolist() == [0, 1, 0, 3, 1, 5, 6, 3]
    floats = torch.tensor([[0.5, -0.0], [0.5, 0.0], [0.25, float("nan")], [0.5, -0.0], [0.25, float("nan")]])
    assert first_rows_alike(floats)().tolist() == [0, 1, 2, 0, 2]  # bit for bit
    asked: list[list[int]] = []

    def compute(rows: Tensor) -> Tensor:
        asked.append(rows.tolist())
        return (tokens[rows, :1] * 10 + positions[rows]).float()

    cache = RowCache(8, compute, batch_size=8, first_alike=first_rows_alike({"input_ids": tokens}, positions))
    cache.read_ahead(torch.tensor([4, 6, 7, 3]), rows=4)
    assert cache[torch.tensor([2, 0])][:, 0].tolist() == [11.0, 11.0]
    # Rows 2 and 0 are one kind: row 0 computed for both; then the read-ahead's kinds:
    # 4 is 1's, 7 is 3's (in the order they come).
    assert asked == [[0, 1, 6, 3]]
    assert cache[torch.tensor([4, 7, 6, 1])][:, 0].tolist() == [31.0, 50.0, 71.0, 31.0] and len(asked) == 1
    assert cache.full()[:, 0].tolist() == [11.0, 31.0, 11.0, 50.0, 31.0, 10.0, 71.0, 50.0]
    assert asked == [[0, 1, 6, 3], [5]]


def test_rows_whose_hashes_collide_are_not_taken_for_each_other(monkeypatch: pytest.MonkeyPatch) -> None:
    from masalign import rowcache

    rows = torch.tensor([[1, 2], [3, 4], [1, 2], [3, 4], [5, 6]])
    # Every row hashes alike: only rows equal to the group's first are repeats; the others
    # stand for themselves (a copy lost, never a wrong one).
    monkeypatch.setattr(rowcache.torch, "rand", lambda n, **options: torch.zeros(n, dtype=torch.float64))
    assert rowcache.first_rows_alike(rows)().tolist() == [0, 1, 0, 3, 4]


def test_fit_tells_its_caches_the_rows_of_the_next_batches() -> None:
    from masalign.train import _BatchSampler

    sampler = _BatchSampler({"count": 10}, 3, seed=0)
    sampler.next()
    upcoming = sampler.upcoming("count")
    assert len(upcoming) == 6  # the tenth row is reshuffled away, not read
    assert torch.equal(torch.cat([sampler.next()["count"], sampler.next()["count"]]), upcoming)
    assert len(sampler.upcoming("count")) == 0


def test_a_row_cache_keeps_key_value_prefixes() -> None:
    def compute(rows: Tensor) -> KeyValuePrefix:
        states = rows.float()[:, None, None].expand(-1, 5, 4).clone()
        return KeyValuePrefix(states, (states[:, None, :2] + 1,), (states[:, None, :2] + 2,), start=2, first_block=1, n_blocks=2)

    cache = RowCache(6, compute, batch_size=4)
    rows = cache[torch.tensor([5, 0])]
    assert isinstance(rows, KeyValuePrefix) and rows.start == 2 and rows.first_block == 1
    assert rows.states[:, 0, 0].tolist() == [5.0, 0.0] and rows.values[0][:, 0, 0, 0].tolist() == [7.0, 2.0]
    assert cache.full().keys[0].shape == (6, 1, 2, 4)


def test_plain_token_inputs_through_a_transformers_model(tmp_path) -> None:
    """Token tensors without a mask, through nnsight's TransformersModel (whose input preparation
    would give the suffix a mask of its own length): equal to the full run from the start on."""
    from transformer_fixtures import gpt2_through_nnsight, save_tiny_gpt2

    adapter = NNsightAdapter(gpt2_through_nnsight(save_tiny_gpt2(tmp_path)))
    site = "transformer.h.0.output"
    tokens = torch.randint(4, 48, (3, 12), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([[9], [10], [11]])

    def replace(hidden: Tensor, example_index: Tensor, slot_index: Tensor) -> Tensor:
        return hidden + 1.0

    full = adapter.run_with_replacement(tokens, site, positions, replace)
    resumed = adapter.run_from_prefix(tokens, site, adapter.key_value_prefix(tokens, site, 9), positions, replace)
    assert (resumed[:, 9:] - full[:, 9:]).abs().max() < 1e-5
    # The source read over cached keys and values, on the same plain tokens.
    assert (adapter.key_value_activations(tokens, site, positions) - adapter.activations(tokens, site, positions)).abs().max() < 1e-5


# -- source reads: the positions before the first read one run only to the site block's keys and values


@pytest.mark.parametrize("layer", [0, 1, "last"])
@pytest.mark.parametrize("positions", [POSITIONS, torch.tensor([[3, 10], [4, -1], [6, 8]])], ids=["from 7", "from 3, empty slot"])
def test_a_source_read_over_cached_keys_and_values_equals_the_full_read(adapter: NNsightAdapter | TransformerLensAdapter, layer: int | str, positions: Tensor) -> None:
    # From 3: the third row's five pad tokens fill the whole run before the start.
    stack = _stack(adapter)
    index = len(stack) - 1 if layer == "last" else layer
    site = _site(adapter, index)
    inputs = _padded_inputs("input_ids")
    start = int(positions[positions >= 0].min())
    mlp_lengths: list[int] = []
    watched = [stack[index].mlp.register_forward_hook(lambda module, args, output: mlp_lengths.append(args[0].shape[1]))]
    watched.append(adapter.output_module().register_forward_hook(lambda *args: mlp_lengths.append(-1)))
    try:
        shorter = adapter.key_value_activations(inputs, site, positions)
    finally:
        for handle in watched:
            handle.remove()
    full = adapter.activations(inputs, site, positions)
    assert shorter.shape == full.shape
    assert (shorter - full).abs().max() < 1e-5
    assert (shorter[positions < 0] == 0).all()
    # The site's block runs its MLP once, on the positions from the start only; nothing after it runs.
    assert mlp_lengths == [SEQ - start]


def test_fit_reads_sources_over_cached_keys_and_values_once_checked(adapter: NNsightAdapter | TransformerLensAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _site(adapter, 1)
    data = _pairs(8, 0)
    alignment = ModelAlignment({"A": adapter}, site, subspace_dim=4)
    calls: list[int] = []
    read = adapter.key_value_activations

    def counted(inputs, site, positions):  # noqa: ANN001, ANN202
        calls.append(positions.shape[0])
        return read(inputs, site, positions)

    monkeypatch.setattr(adapter, "key_value_activations", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hidden = alignment.source_activations("A", data.source_inputs, data.source_positions)
    # One read of the distinct rows (these pairs repeat three prompts), its first two checked
    # against the full read; the repeats are copies.
    distinct = len({(tuple(row.tolist()), tuple(p.tolist())) for row, p in zip(data.source_inputs["input_ids"], data.source_positions)})
    assert calls == [distinct] and distinct < 8
    expected = adapter.activations(data.source_inputs, site, data.source_positions)
    assert (hidden - expected).abs().max() < 1e-5


@pytest.mark.parametrize("failure", ["differs", "raises"])
def test_a_source_read_over_keys_and_values_that_fails_its_check_falls_back(
    adapter: NNsightAdapter | TransformerLensAdapter, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    site = _site(adapter, 1)
    data = _pairs(8, 0)
    read = adapter.key_value_activations

    def wrong(inputs, site, positions):  # noqa: ANN001, ANN202
        if failure == "raises":
            raise RuntimeError("no cache here")
        return read(inputs, site, positions) + 1e-2

    monkeypatch.setattr(adapter, "key_value_activations", wrong)
    alignment = ModelAlignment({"A": adapter}, site, subspace_dim=4)
    message = "gives activations .* away from the full run.s" if failure == "differs" else "failed \\(RuntimeError: no cache here\\)"
    with pytest.warns(UserWarning, match=f"reading {site!r} after cached keys and values {message}; reading every position"):
        hidden = alignment.source_activations("A", data.source_inputs, data.source_positions)
    # The full read (of the distinct rows: a batch of another size, so equal to float rounding).
    assert (hidden - adapter.activations(data.source_inputs, site, data.source_positions)).abs().max() < 1e-6


def test_a_bridge_with_its_own_logits_fn_resumes_from_states_alone(tmp_path_factory: pytest.TempPathFactory) -> None:
    # A user's logits_fn reads the bridge's output; the runs from cached keys and values give the
    # Hugging Face model's, so such an adapter keeps to the states (exact, no warning).
    from transformer_lens import TransformerBridge

    bridge = TransformerBridge.boot_transformers(_hf_folder(tmp_path_factory, "llama"), device="cpu").eval()
    site = "blocks.1.hook_resid_post"
    assert TransformerLensAdapter(bridge).supports_key_values(site)
    adapter = TransformerLensAdapter(bridge, logits_fn=lambda output: output * 2.0)
    assert adapter.supports_prefix(site) and not adapter.supports_key_values(site)
    data = _pairs(4, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = prefix_row_cache(adapter, site, data.base_inputs, data.base_positions, adapter.sites()[site], start=START)
    assert cache is not None and not isinstance(cache[torch.arange(2)], KeyValuePrefix)
    with pytest.raises(SiteError, match="own logits_fn, which reads the model.s output"):
        adapter.key_value_prefix(data.base_inputs, site, START)
