"""Sweeps over subspace sizes and sites: each setting's report is the fit and evaluation done by
hand, every setting reads through one memo, and bad settings are refused with a message."""

from __future__ import annotations

import pytest
import torch

from masalign import ActivationMemo, ModelAlignment, TorchModuleAdapter, TransformerLensAdapter, evaluate, fit, iia_by_site, iia_by_subspace_dim
from masalign.models import RecurrentConfig, RecurrentLM
from masalign.tasks import VOCAB

from transformer_fixtures import tiny_tl_transformer

OPTIONS = {"steps": 4, "batch_size": 16, "lr": 1e-2, "eval_every": 2, "progress": False, "seed": 0}
BLOCKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def pairs(small_task):
    return small_task.counterfactual_pairs(96, seed=0), small_task.counterfactual_pairs(32, seed=1), small_task.counterfactual_pairs(64, seed=2)


@pytest.fixture(scope="module")
def transformers(small_task) -> dict[str, TransformerLensAdapter]:
    return {name: TransformerLensAdapter(tiny_tl_transformer(len(VOCAB), seed=seed, d_model=32).eval(), name=name) for name, seed in (("A", 0), ("B", 1))}


def by_hand(alignment: ModelAlignment, pairs) -> dict:
    train, valid, test = pairs
    fit(alignment, train, valid, **OPTIONS)
    return evaluate(alignment, test).iia


def test_a_layer_sweep_gives_each_layer_the_fit_and_evaluation_done_by_hand(transformers, pairs) -> None:
    model = {"A": transformers["A"]}
    seen = []
    reports = iia_by_site(lambda site: ModelAlignment(model, site, 4, seed=0), BLOCKS, *pairs, fit_options=OPTIONS,
                          progress=lambda site, report: seen.append(site))  # fmt: skip
    assert list(reports) == BLOCKS == seen
    for site, report in reports.items():
        assert report.extra["sites"] == {"A": site} and report.extra["fit"]["steps"] == OPTIONS["steps"]
        assert report.iia["A"]["A"] == pytest.approx(by_hand(ModelAlignment(model, site, 4, seed=0), pairs)["A"]["A"], abs=1e-6)


def test_a_grid_of_layer_pairs_reads_each_model_and_layer_once(transformers, pairs) -> None:
    grid = [{"A": a, "B": b} for a in BLOCKS for b in BLOCKS]
    memo = ActivationMemo()
    reports = iia_by_site(lambda sites: ModelAlignment(transformers, sites, 4, seed=0), grid, *pairs, fit_options=OPTIONS, memo=memo)
    assert list(reports) == [tuple(sites.items()) for sites in grid]
    # Each (model, layer) takes part in two cells: read (each kind of read on each dataset) in the
    # first, reused in the second.
    assert memo.misses == len(memo) > 0 and memo.hits == memo.misses
    cell = grid[1]
    expected = by_hand(ModelAlignment(transformers, cell, 4, seed=0), pairs)
    for source in "AB":
        for target in "AB":
            assert reports[tuple(cell.items())].iia[source][target] == pytest.approx(expected[source][target], abs=1e-6)


def test_a_subspace_sweep_through_its_memo_equals_fits_done_by_hand(pairs) -> None:
    torch.manual_seed(0)
    config = RecurrentConfig(hidden_size=16, embedding_size=8)
    models = {name: TorchModuleAdapter(RecurrentLM(config), name=name) for name in "AB"}
    memo = ActivationMemo()
    reports = iia_by_subspace_dim(lambda k: ModelAlignment(models, "rnn.h_l0", k, seed=0), [2, 4], *pairs, fit_options=OPTIONS, memo=memo)
    assert memo.hits > 0
    for k, report in reports.items():
        expected = by_hand(ModelAlignment(models, "rnn.h_l0", k, seed=0), pairs)
        for source in "AB":
            for target in "AB":
                assert report.iia[source][target] == pytest.approx(expected[source][target], abs=1e-6)


@pytest.mark.parametrize(
    ("sites", "message"),
    [
        ([], "sites is empty"),
        ([BLOCKS[0], BLOCKS[0]], "more than once: 'blocks.0.hook_resid_post'"),
        ([{}], "non-empty mapping of model name to site name; got {}"),
        ([3], "site name or a non-empty mapping"),
    ],
)
def test_bad_sites_are_refused(transformers, pairs, sites, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        iia_by_site(lambda site: ModelAlignment({"A": transformers["A"]}, site, 4), sites, *pairs, fit_options=OPTIONS)


@pytest.mark.parametrize("name", ["directions", "memo"])
def test_directions_and_memo_inside_fit_options_are_refused(transformers, pairs, name: str) -> None:
    with pytest.raises(ValueError, match=f"pass {name} as the {name} argument"):
        iia_by_site(lambda site: ModelAlignment({"A": transformers["A"]}, site, 4), BLOCKS, *pairs, fit_options={**OPTIONS, name: None})


def test_the_sweeps_own_memo_forgets_reads_of_models_it_will_not_see_again(pairs, monkeypatch: pytest.MonkeyPatch) -> None:
    import masalign.sweep

    memos: list[ActivationMemo] = []
    sizes: list[int] = []

    class Counted(ActivationMemo):
        def __init__(self) -> None:
            super().__init__()
            memos.append(self)

        def clear(self) -> None:
            sizes.append(len(self))
            super().clear()

    monkeypatch.setattr(masalign.sweep, "ActivationMemo", Counted)
    config = RecurrentConfig(hidden_size=16, embedding_size=8)

    def fresh_models(k: int) -> ModelAlignment:  # new model objects for every k: nothing to reuse
        torch.manual_seed(0)
        return ModelAlignment({"A": TorchModuleAdapter(RecurrentLM(config), name="A")}, "rnn.h_l0", k, seed=0)

    iia_by_subspace_dim(fresh_models, [2, 3, 4], *pairs, fit_options=OPTIONS)
    assert len(memos) == 1 and memos[0].hits == 0
    assert len(sizes) == 2 and all(size > 0 for size in sizes)  # cleared before k = 3 and k = 4


@pytest.fixture(scope="module")
def gru() -> dict[str, TorchModuleAdapter]:
    torch.manual_seed(0)
    return {"A": TorchModuleAdapter(RecurrentLM(RecurrentConfig(hidden_size=16, embedding_size=8)), name="A")}


def test_a_size_given_twice_is_refused(gru, pairs) -> None:
    with pytest.raises(ValueError, match="subspace_dims lists a size more than once: 2"):
        iia_by_subspace_dim(lambda k: ModelAlignment(gru, "rnn.h_l0", k), [2, 4, 2], *pairs, fit_options=OPTIONS)


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        (lambda gru, pairs: iia_by_subspace_dim(lambda k: ModelAlignment(gru, "rnn.h_l0", 3), [2], *pairs, fit_options=OPTIONS),
         r"build\(2\) returned an alignment with subspace_dim \{'count': 3\}"),
        (lambda gru, pairs: iia_by_subspace_dim(lambda k: None, [2], *pairs, fit_options=OPTIONS),
         "build.2. returned NoneType; it must return a ModelAlignment"),
    ],
    ids=["ignores-k", "returns-nothing"],
)
def test_a_build_that_does_not_make_the_setting_is_refused(gru, pairs, sweep, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        sweep(gru, pairs)


def test_a_site_sweep_whose_build_ignores_the_site_is_refused(transformers, pairs) -> None:
    with pytest.raises(ValueError, match=r"build\('blocks.1.hook_resid_post'\) returned an alignment at sites \{'A': 'blocks.0"):
        iia_by_site(lambda site: ModelAlignment({"A": transformers["A"]}, BLOCKS[0], 4), BLOCKS, *pairs, fit_options=OPTIONS)
    with pytest.raises(ValueError, match=r"build\(\{'A': 'blocks.1.hook_resid_post'\}\) returned"):
        iia_by_site(lambda sites: ModelAlignment(transformers, BLOCKS[0], 4), [{"A": BLOCKS[1]}], *pairs, fit_options=OPTIONS)


def test_a_site_swept_in_one_model_against_a_fixed_site_in_the_other(transformers, pairs) -> None:
    build = lambda site: ModelAlignment(transformers, {"A": site, "B": BLOCKS[0]}, 4, seed=0)  # noqa: E731
    reports = iia_by_site(build, BLOCKS, *pairs, fit_options={**OPTIONS, "steps": 1})
    assert [r.extra["sites"] for r in reports.values()] == [{"A": b, "B": BLOCKS[0]} for b in BLOCKS]
