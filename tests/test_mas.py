"""MAS end to end on small trained GRUs, save/load, determinism, Ctrl-C, and the errors users hit."""

from __future__ import annotations

import json

import pytest
import torch

from masalign import CounterfactualPairs, ModelAlignment, TorchModuleAdapter, evaluate, fit
from masalign.adapters import SiteError
from masalign.models import RecurrentConfig, RecurrentLM


@pytest.fixture(scope="module")
def adapters(trained_grus):
    return {name: TorchModuleAdapter(model, name=name) for name, model in trained_grus.items()}


@pytest.fixture(scope="module")
def pairs(small_task):
    return {
        "train": small_task.counterfactual_pairs(3000, seed=1),
        "valid": small_task.counterfactual_pairs(300, seed=2),
        "test": small_task.counterfactual_pairs(600, seed=3),
    }


@pytest.fixture(scope="module")
def fitted(adapters, pairs, small_task):
    alignment = ModelAlignment(adapters, "rnn.h_l0", 8, seed=0)
    result = fit(alignment, pairs["train"], pairs["valid"], steps=300, lr=1e-2, eval_every=50, progress=False)
    report = evaluate(alignment, pairs["test"], ceiling_data=small_task.sample(500, seed=4, split="held_out"))
    return alignment, result, report


def test_mas_transfers_count_between_gru_seeds(fitted) -> None:
    alignment, result, report = fitted
    for source in "AB":
        for target in "AB":
            assert report.iia[source][target] >= report.floor[source][target] + 0.4, report.table()
            assert report.iia[source][target] >= 0.6, report.table()
            assert report.iia_token[source][target] >= report.iia[source][target]
    assert report.ceiling["A"] >= 0.98 and report.ceiling["B"] >= 0.98
    # orthonormal columns after training
    for a in alignment.alignments.values():
        q = a.basis.detach()
        assert torch.allclose(q.T @ q, torch.eye(q.shape[1]), atol=1e-5)
    assert result.best_valid_accuracy and result.history[0]["step"] == 0


def test_save_and_load_round_trip_exactly(fitted, adapters, pairs, tmp_path) -> None:
    alignment, _, _ = fitted
    alignment.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "alignment.json").read_text())
    assert meta["sites"] == {"A": "rnn.h_l0", "B": "rnn.h_l0"} and meta["widths"] == {"A": 48, "B": 48}
    loaded = ModelAlignment.load(tmp_path / "saved", adapters)
    for name in "AB":
        assert torch.equal(loaded.alignments[name].basis, alignment.alignments[name].basis)
    test = pairs["test"].subset(slice(0, 64))
    hidden = alignment.source_activations("A", test.source_inputs, test.source_positions)
    with torch.no_grad():
        before = alignment.intervened_logits("A", "B", hidden, test.base_inputs, test.base_positions)
        after = loaded.intervened_logits("A", "B", hidden, test.base_inputs, test.base_positions)
    assert torch.equal(before, after)


def test_loading_onto_models_of_other_widths_is_an_error(fitted, tmp_path) -> None:
    alignment, _, _ = fitted
    alignment.save(tmp_path / "saved")
    other = {name: TorchModuleAdapter(RecurrentLM(RecurrentConfig(hidden_size=32))) for name in "AB"}
    with pytest.raises(ValueError, match="width 32 .* saved for width 48"):
        ModelAlignment.load(tmp_path / "saved", other)


def test_same_seed_gives_the_same_alignment(adapters, pairs) -> None:
    states = []
    for _ in range(2):
        alignment = ModelAlignment(adapters, "rnn.h_l0", 4, seed=3)
        fit(alignment, pairs["train"], pairs["valid"].subset(slice(0, 64)), steps=6, eval_every=3, seed=5, progress=False)
        states.append({k: v.clone() for k, v in alignment.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_ctrl_c_keeps_the_best_state(adapters, pairs, monkeypatch) -> None:
    alignment = ModelAlignment(adapters, "rnn.h_l0", 4, seed=0)
    calls = {"n": 0}
    original = torch.optim.Adam.step

    def step_then_interrupt(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step_then_interrupt)
    result = fit(alignment, pairs["train"], pairs["valid"].subset(slice(0, 64)), steps=50, eval_every=2, lr=1e-2, progress=False)
    assert result.stop_reason == "interrupted"
    assert result.steps == 4  # the steps completed, not the one interrupted
    def mean_accuracy(entry):
        values = [v for row in entry["valid_accuracy"]["count"].values() for v in row.values()]
        return sum(values) / len(values)

    best = max(result.history, key=lambda h: (mean_accuracy(h), -h["valid_loss"]))
    assert result.best_step == best["step"]
    from masalign.evaluate import interchange_scores

    scores = interchange_scores(alignment, pairs["valid"].subset(slice(0, 64)))
    restored = {s: {t: v.trial_accuracy for (s2, t), v in scores.items() if s2 == s} for s in "AB"}
    assert restored == best["valid_accuracy"]["count"] == result.best_valid_accuracy["count"]


def test_frozen_models_get_no_gradients_and_are_restored(adapters, pairs) -> None:
    # Start from what fit must change (train mode, trainable weights), so that restoring is tested.
    modes = {}
    for name, adapter in adapters.items():
        adapter.model.train()
        modes[name] = {p: p.requires_grad for p in adapter.model.parameters()}
    first = next(iter(adapters["A"].model.parameters()))
    first.requires_grad_(False)  # one frozen parameter must stay frozen
    modes["A"][first] = False
    seen_during_fit = []
    original = ModelAlignment.intervened_logits

    def spy(self, *args, **kwargs):
        seen_during_fit.append([(a.model.training, any(p.requires_grad for p in a.model.parameters())) for a in adapters.values()])
        return original(self, *args, **kwargs)

    alignment = ModelAlignment(adapters, "rnn.h_l0", 4)
    try:
        ModelAlignment.intervened_logits = spy
        fit(alignment, pairs["train"], pairs["valid"].subset(slice(0, 32)), steps=2, eval_every=1, progress=False)
    finally:
        ModelAlignment.intervened_logits = original
        for adapter in adapters.values():
            adapter.model.eval()
    assert seen_during_fit and all(state == [(False, False), (False, False)] for state in seen_during_fit)
    for name, adapter in adapters.items():
        assert all(p.grad is None for p in adapter.model.parameters())
        assert {p: p.requires_grad for p in adapter.model.parameters()} == modes[name]
    first.requires_grad_(True)


# -- bad input ------------------------------------------------------------------------------


def test_unknown_site_lists_the_valid_ones(adapters) -> None:
    with pytest.raises(SiteError, match=r"no site 'rnn.h_l1'.*Valid sites: rnn.h_l0"):
        ModelAlignment(adapters, "rnn.h_l1", 4)


def test_subspace_larger_than_a_width(adapters) -> None:
    with pytest.raises(ValueError, match="subspace size 49 exceeds the width 48"):
        ModelAlignment(adapters, "rnn.h_l0", 49)


def test_a_model_without_weights_is_refused(trained_grus) -> None:
    """Models may sit on different devices, but one on the meta device holds no values to align."""
    meta_model = RecurrentLM(RecurrentConfig(hidden_size=48, embedding_size=32)).to("meta")
    models = {"A": TorchModuleAdapter(trained_grus["A"]), "B": TorchModuleAdapter(meta_model)}
    with pytest.raises(ValueError, match="model 'B' has parameters on the meta device.*load its weights"):
        ModelAlignment(models, "rnn.h_l0", 4)


def test_empty_dataset() -> None:
    empty = torch.zeros(0, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="empty"):
        CounterfactualPairs(empty, empty, torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long), empty)


def test_labels_outside_the_vocabulary(adapters, pairs) -> None:
    bad = pairs["valid"].subset(slice(0, 16))
    bad.labels = torch.where(bad.labels >= 0, torch.full_like(bad.labels, 99), bad.labels)
    with pytest.raises(ValueError, match="token 99.*only 8 logits"):
        fit(ModelAlignment(adapters, "rnn.h_l0", 4), bad, bad, steps=1, progress=False)


def test_position_outside_the_sequence(adapters, pairs) -> None:
    bad = pairs["valid"].subset(slice(0, 16))
    bad.source_positions = bad.source_positions + 100
    with pytest.raises(IndexError, match="outside its sequence"):
        fit(ModelAlignment(adapters, "rnn.h_l0", 4), bad, bad, steps=1, progress=False)


def test_nan_activations(trained_grus, pairs) -> None:
    broken = RecurrentLM(RecurrentConfig(hidden_size=48, embedding_size=32))
    broken.load_state_dict(trained_grus["A"].state_dict())
    with torch.no_grad():
        broken.embedding.weight[5] = float("nan")
    models = {"A": TorchModuleAdapter(trained_grus["A"]), "B": TorchModuleAdapter(broken)}
    with pytest.raises(FloatingPointError, match="model 'B'.*NaN or inf"):
        fit(ModelAlignment(models, "rnn.h_l0", 4), pairs["valid"], pairs["valid"], steps=1, progress=False)


def test_fit_inside_no_grad(adapters, pairs) -> None:
    with torch.no_grad(), pytest.raises(RuntimeError, match="needs gradients"):
        fit(ModelAlignment(adapters, "rnn.h_l0", 4), pairs["valid"], pairs["valid"], steps=1, progress=False)


def test_several_variables_and_a_null_block(adapters, small_task) -> None:
    count = small_task.counterfactual_pairs(600, seed=31)
    null = small_task.counterfactual_pairs(600, seed=31, variable="null")
    # a null pair's base is a natural sequence: the interchange must leave its continuation as it is
    for i in range(20):
        base = [t for t in null.base_inputs[i].tolist() if t != 0]
        p = int(null.base_positions[i, 0])
        assert small_task.continuation(base, p, small_task.states(base)[p].count) == base
        assert small_task.states(base)[-2] is not None and small_task.states(base)[-2].count == 0
    alignment = ModelAlignment(adapters, "rnn.h_l0", {"count": 4, "null": 40})
    assert alignment.blocks == {"count": slice(0, 4), "null": slice(4, 44)}
    result = fit(alignment, [count, null], [count.subset(slice(0, 64)), null.subset(slice(0, 64))], steps=30, eval_every=10, lr=1e-2, progress=False)
    last = result.history[-1]["valid_accuracy"]
    assert set(last) == {"count", "null"}
    assert all(set(last[v]) == {"A", "B"} and all(set(row) == {"A", "B"} for row in last[v].values()) for v in last)
    null_scores = [value for row in last["null"].values() for value in row.values()]
    assert min(null_scores) >= 0.8  # swapping an inert block changes little


def test_source_activations_of_the_wrong_width(fitted, pairs) -> None:
    alignment, _, _ = fitted
    test = pairs["test"].subset(slice(0, 4))
    with pytest.raises(ValueError, match="width 32 but model 'A' has width 48"):
        alignment.intervened_logits("A", "B", torch.zeros(4, 1, 32), test.base_inputs, test.base_positions)


def test_the_loss_is_the_mean_over_label_tokens_whatever_the_batches(fitted, pairs) -> None:
    """Pairs have different numbers of label tokens: a mean per batch weighted by rows changed
    with batch_size (and fit's validation reads this loss for early stopping)."""
    from masalign.evaluate import interchange_scores

    alignment, _, _ = fitted
    test = pairs["test"].subset(slice(0, 40))
    counts = (test.labels != -100).sum(1)
    assert len(set(counts.tolist())) > 1
    whole = interchange_scores(alignment, test, batch_size=40)
    for batch_size in (1, 7):
        split = interchange_scores(alignment, test, batch_size=batch_size)
        for direction, scores in whole.items():
            assert split[direction].loss == pytest.approx(scores.loss, rel=1e-5), (batch_size, direction)
