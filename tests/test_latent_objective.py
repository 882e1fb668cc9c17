"""The CL loss inside fit: one-sided alignment on small GRUs."""

from __future__ import annotations

import pytest
import torch

from masalign import ModelAlignment, TorchModuleAdapter, evaluate, fit
from masalign.latents import token_fingerprint
from masalign.train import LatentObjective


@pytest.fixture(scope="module")
def setting(trained_grus, small_task):
    models = {name: TorchModuleAdapter(model, name=name) for name, model in trained_grus.items()}
    train = small_task.counterfactual_pairs(2000, seed=11)
    valid = small_task.counterfactual_pairs(200, seed=12)
    test = small_task.counterfactual_pairs(500, seed=13)
    return models, train, valid, test, small_task.latent_targets(train, seed=0)


def test_cl_loss_alone_aligns_a_model_that_is_only_recorded(setting) -> None:
    """B is never run with an intervention: the behavioural loss is on A->A only, and
    B's map learns only from the CL loss on (A->B, B->B). A->B IIA must rise well above
    the same fit without the CL loss, where B's map stays at its random start."""
    models, train, valid, test, targets = setting
    iia, floor = {}, None
    for with_cl in (False, True):
        alignment = ModelAlignment(models, "rnn.h_l0", 8, seed=0)
        objective = LatentObjective([("A", "B"), ("B", "B")], targets, train.source_inputs) if with_cl else None
        result = fit(alignment, train, valid, directions=[("A", "A")], steps=150, lr=1e-2,
                     target_accuracy=1.01, latent_objective=objective, progress=False)
        report = evaluate(alignment, test, directions=[("A", "B")])
        iia[with_cl], floor = report.iia["A"]["B"], report.floor["A"]["B"]
        if with_cl:
            assert result.latent_pairs_masked == targets.n_missing
            diag = result.latent_diagnostics["A"]["B"]
            assert diag["symmetric_kl"] >= 0 and diag["range_excess_max"] >= 0 and diag["cl_loss"] > 0
    assert iia[True] >= floor + 0.25, (iia, floor)
    assert iia[True] >= iia[False] + 0.15, (iia, floor)


def test_cl_targets_must_cover_the_train_pairs(setting) -> None:
    models, train, valid, _, targets = setting
    objective = LatentObjective([("A", "B")], targets, train.source_inputs)
    with pytest.raises(ValueError, match="cover 2000 pairs but the train data has 100"):
        fit(ModelAlignment(models, "rnn.h_l0", 4), train.subset(slice(0, 100)), valid, latent_objective=objective, steps=1, progress=False)


def test_cl_targets_with_too_few_latents_are_refused_before_training(setting) -> None:
    import dataclasses

    models, train, valid, _, targets = setting
    found = torch.zeros_like(targets.found)
    found[7] = True
    objective = LatentObjective([("A", "B")], dataclasses.replace(targets, found=found), train.source_inputs)
    with pytest.raises(ValueError, match="at least 2 train pairs, but 1 of 2000 have one.*larger pool"):
        fit(ModelAlignment(models, "rnn.h_l0", 4), train, valid, latent_objective=objective, steps=1, progress=False)


def test_cl_targets_found_in_another_pool_are_refused(setting) -> None:
    """Rows of another pool of the same size would be read as the latents without any error."""
    models, train, valid, _, targets = setting
    assert targets.pool_tokens is not None and len(train.base_inputs) == len(train.source_inputs)
    objective = LatentObjective([("A", "B")], targets, train.base_inputs)
    with pytest.raises(ValueError, match="found in another pool than LatentObjective.pool_inputs"):
        fit(ModelAlignment(models, "rnn.h_l0", 4), train, valid, latent_objective=objective, steps=1, progress=False)
    per_model = LatentObjective([("A", "B")], targets, {"A": train.base_inputs, "B": train.source_inputs})
    fit(ModelAlignment(models, "rnn.h_l0", 4), train, valid, latent_objective=per_model, steps=1, progress=False)
    assert token_fingerprint({"input_ids": train.source_inputs, "attention_mask": None}) == targets.pool_tokens


def test_cl_gradients_need_no_target_run(setting, monkeypatch) -> None:
    """With only CL directions on B, B is never run with an intervention (it is only recorded)."""
    models, train, valid, _, targets = setting
    calls = []
    original = models["B"].run_with_replacement
    monkeypatch.setattr(models["B"], "run_with_replacement", lambda *a, **k: calls.append(1) or original(*a, **k))
    alignment = ModelAlignment(models, "rnn.h_l0", 4)
    before = alignment.alignments["B"].basis.detach().clone()
    fit(alignment, train, valid, directions=[("A", "A")], steps=3, eval_every=3, lr=1e-2,
        latent_objective=LatentObjective([("A", "B")], targets, train.source_inputs), progress=False)
    assert not calls
    assert not torch.equal(before, alignment.alignments["B"].basis.detach())


def test_a_shared_pool_may_be_a_mapping_of_input_names() -> None:
    from masalign.train import _pool_of

    shared = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    assert _pool_of(shared, "A", ["A", "B"]) is shared  # not taken for a per-model mapping
    own = {"A": torch.zeros(2, 3, dtype=torch.long), "B": torch.ones(2, 4, dtype=torch.long)}
    assert _pool_of(own, "B", ["A", "B"]) is own["B"]
    with pytest.raises(ValueError, match=r"names some models but not \['B'\]"):
        _pool_of({"A": own["A"]}, "A", ["A", "B"])
