"""ActivationMemo: fits and evaluations on the same pairs read each (model, site) once, with the same results."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from masalign import CounterfactualPairs, ModelAlignment, evaluate, fit
from masalign.adapters import NNsightAdapter
from masalign.data import IGNORE_INDEX
from masalign.memo import ActivationMemo

VOCAB, SEQ = 40, 8


@pytest.fixture(scope="module")
def adapter() -> NNsightAdapter:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    return NNsightAdapter(LlamaForCausalLM(config).eval())


def _pairs(n: int, seed: int) -> CounterfactualPairs:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.full((n, SEQ), IGNORE_INDEX)
    labels[:, -1] = torch.randint(1, VOCAB, (n,), generator=generator)
    return CounterfactualPairs(
        base_inputs={"input_ids": torch.randint(1, VOCAB, (n, SEQ), generator=generator)},
        source_inputs={"input_ids": torch.randint(1, VOCAB, (n, SEQ), generator=generator)},
        base_positions=torch.full((n, 1), SEQ - 1),
        source_positions=torch.full((n, 1), SEQ - 1),
        labels=labels,
    )


def _count_runs(adapter: NNsightAdapter) -> list[int]:
    runs: list[int] = []
    adapter.model.model.embed_tokens.register_forward_hook(lambda module, args, output: runs.append(output.shape[0]))
    return runs


def test_a_second_fit_and_evaluation_read_nothing_again(adapter: NNsightAdapter) -> None:
    train, valid, test = _pairs(16, 0), _pairs(8, 1), _pairs(8, 2)
    site = "model.layers.1.output"
    results = []
    for memo in (None, ActivationMemo()):
        alignment = ModelAlignment({"A": adapter}, site, subspace_dim=4)
        result = fit(alignment, train, valid, steps=4, batch_size=4, eval_every=2, progress=False, memo=memo)
        report = evaluate(alignment, test, memo=memo)
        results.append(([h["valid_loss"] for h in result.history], report.iia, report.floor, alignment.state_dict()))
    (losses, iia, floor, state), (memo_losses, memo_iia, memo_floor, memo_state) = results
    assert losses == pytest.approx(memo_losses, abs=1e-6) and iia == memo_iia and floor == memo_floor
    for key, value in state.items():
        assert torch.equal(value, memo_state[key]), key
    assert len(memo) == 6  # sources and prefixes of train, valid and test
    misses = memo.misses

    # A second alignment at the same site (another seed, another k): no new reads of the data.
    runs = _count_runs(adapter)
    second = ModelAlignment({"A": adapter}, site, subspace_dim=2, seed=5)
    fit(second, train, valid, steps=2, batch_size=4, eval_every=2, progress=False, memo=memo)
    evaluate(second, test, memo=memo)
    assert memo.misses == misses and memo.hits > 0
    # Only the steps' and validations' resumed runs (the embedding of the batch rows) ran, no whole-dataset read.
    assert sum(runs) < 2 * (16 + 8 + 8)

    # Another site is another entry; clear() forgets everything.
    third = ModelAlignment({"A": adapter}, "model.layers.2.output", subspace_dim=2)
    fit(third, train, valid, steps=2, batch_size=4, eval_every=2, progress=False, memo=memo)
    assert memo.misses == misses + 4
    memo.clear()
    assert len(memo) == 0 and "0 entries" in repr(memo)


def test_evaluate_resumes_from_prefixes_with_the_same_scores(adapter: NNsightAdapter) -> None:
    train, valid, test = _pairs(16, 0), _pairs(8, 1), _pairs(8, 2)
    alignment = ModelAlignment({"A": adapter}, "model.layers.1.output", subspace_dim=4)
    fit(alignment, train, valid, steps=4, batch_size=4, eval_every=2, progress=False)
    cached, full = evaluate(alignment, test), evaluate(alignment, test, prefix_cache=False)
    assert cached.iia == full.iia and cached.floor == full.floor and cached.iia_token == full.iia_token


def test_evaluate_without_the_floor_or_a_memo_runs_whole(adapter: NNsightAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its base runs would be used once: reading them first would cost more than it saves.
    alignment = ModelAlignment({"A": adapter}, "model.layers.1.output", subspace_dim=4)
    test = _pairs(8, 2)
    reads: list[str] = []
    for name in ("prefix", "key_value_prefix"):
        read = getattr(adapter, name)
        monkeypatch.setattr(adapter, name, lambda *args, read=read, name=name, **kwargs: reads.append(name) or read(*args, **kwargs))
    single = evaluate(alignment, test, floor=False)
    assert reads == []
    memo = ActivationMemo()
    assert evaluate(alignment, test, floor=False, memo=memo).iia == single.iia and reads and len(memo) == 2
    reads.clear()
    assert evaluate(alignment, test).iia == single.iia and reads


def test_a_memo_key_is_the_objects_not_their_values(adapter: NNsightAdapter) -> None:
    memo = ActivationMemo()
    inputs: dict[str, Tensor] = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    positions = torch.zeros(2, 1, dtype=torch.long)
    assert memo.get("source", adapter, "s", inputs, positions, lambda: 1) == 1
    assert memo.get("source", adapter, "s", inputs, positions, lambda: 2) == 1
    # Equal values in other tensors are other data as far as the memo knows.
    assert memo.get("source", adapter, "s", {"input_ids": inputs["input_ids"].clone()}, positions, lambda: 3) == 3
    assert memo.get("prefix", adapter, "s", inputs, positions, lambda: 4) == 4


def test_a_tensor_replaced_in_a_mapping_of_inputs_is_not_taken_for_the_old_one() -> None:
    """The memo held the mapping but not its tensors: a mask replaced in it was freed, a new mask
    could get its id, and the old mask's activations came back."""
    memo = ActivationMemo()
    inputs = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    positions = torch.zeros(2, 1, dtype=torch.long)
    seen_ids, values = set(), []
    for step in range(50):
        inputs.pop("attention_mask", None)  # the previous mask is freed here unless the memo holds it
        inputs["attention_mask"] = torch.full((2, 3), step)
        seen_ids.add(id(inputs["attention_mask"]))
        values.append(memo.get("source", None, "site", inputs, positions, lambda step=step: step))
    assert values == list(range(50)) and memo.hits == 0
    assert len(seen_ids) == 50  # every mask stayed alive, so none took an earlier one's id
