"""What the user did wrong, said by the core: datasets, alignment settings, fit, evaluate and the CLI.

Every test checks the error type and that the message names the problem and the
fix. Models are tiny untrained GRUs: an error must not depend on training.
"""

from __future__ import annotations

import math

import pytest
import torch

from masalign import CounterfactualPairs, LabelledSequences, ModelAlignment, TorchModuleAdapter, evaluate, fit
from masalign.cli import main as cli_main
from masalign.data import IGNORE_INDEX
from masalign.models import RecurrentConfig, RecurrentLM
from masalign.sweep import iia_by_subspace_dim


@pytest.fixture(scope="module")
def models() -> dict[str, TorchModuleAdapter]:
    torch.manual_seed(0)
    config = RecurrentConfig(hidden_size=16, embedding_size=8)
    return {name: TorchModuleAdapter(RecurrentLM(config), name=name) for name in "AB"}


@pytest.fixture(scope="module")
def pairs(small_task) -> CounterfactualPairs:
    return small_task.counterfactual_pairs(64, seed=0)


def alignment_of(models, k=2, **options) -> ModelAlignment:
    return ModelAlignment(models, "rnn.h_l0", k, **options)


# -- datasets ----------------------------------------------------------------------------------


def test_pairs_from_numpy_and_lists_are_turned_into_tensors(pairs) -> None:
    as_numpy = CounterfactualPairs(
        pairs.base_inputs.numpy(), pairs.source_inputs.numpy(), pairs.base_positions.numpy(),
        pairs.source_positions.numpy(), pairs.labels.numpy(),
    )
    as_lists = CounterfactualPairs(
        pairs.base_inputs.tolist(), pairs.source_inputs.tolist(), pairs.base_positions.tolist(),
        pairs.source_positions.tolist(), pairs.labels.tolist(),
    )
    for converted in (as_numpy, as_lists):
        assert torch.equal(converted.base_inputs, pairs.base_inputs)
        assert torch.equal(converted.labels, pairs.labels)
        assert converted.base_positions.dtype == torch.long


def test_ragged_lists_are_an_error_that_says_to_pad(pairs) -> None:
    with pytest.raises(TypeError, match="padded to the same length"):
        CounterfactualPairs([[1, 2, 3], [1, 2]], pairs.source_inputs[:2], pairs.base_positions[:2], pairs.source_positions[:2], pairs.labels[:2])


def test_empty_input_mapping(pairs) -> None:
    with pytest.raises(ValueError, match="empty mapping.*input_ids"):
        CounterfactualPairs({}, pairs.source_inputs, pairs.base_positions, pairs.source_positions, pairs.labels)


def test_inputs_of_a_strange_type(pairs) -> None:
    with pytest.raises(TypeError, match="must be a torch tensor"):
        CounterfactualPairs("tokens", pairs.source_inputs, pairs.base_positions, pairs.source_positions, pairs.labels)


def test_zero_slots_per_pair(pairs) -> None:
    empty = torch.zeros(len(pairs), 0, dtype=torch.long)
    with pytest.raises(ValueError, match="zero slots.*at least one position"):
        CounterfactualPairs(pairs.base_inputs, pairs.source_inputs, empty, empty, pairs.labels)


def test_float_positions(pairs) -> None:
    with pytest.raises(TypeError, match="integer positions"):
        CounterfactualPairs(pairs.base_inputs, pairs.source_inputs, pairs.base_positions.float(), pairs.source_positions, pairs.labels)


def test_rows_that_disagree(pairs) -> None:
    with pytest.raises(ValueError, match="labels has 3 rows but base_inputs has 64"):
        CounterfactualPairs(pairs.base_inputs, pairs.source_inputs, pairs.base_positions, pairs.source_positions, pairs.labels[:3])


def test_a_pair_without_labels(pairs) -> None:
    labels = pairs.labels.clone()
    labels[5] = IGNORE_INDEX
    with pytest.raises(ValueError, match="pair 5 has no label position"):
        CounterfactualPairs(pairs.base_inputs, pairs.source_inputs, pairs.base_positions, pairs.source_positions, labels)


def test_negative_labels(pairs) -> None:
    labels = pairs.labels.clone()
    labels[0, 0] = -3
    with pytest.raises(ValueError, match="token ids >= 0 or -100"):
        CounterfactualPairs(pairs.base_inputs, pairs.source_inputs, pairs.base_positions, pairs.source_positions, labels)


def test_a_number_instead_of_a_tensor(pairs) -> None:
    with pytest.raises(ValueError, match="one row per example"):
        CounterfactualPairs(torch.tensor(3), pairs.source_inputs, pairs.base_positions, pairs.source_positions, pairs.labels)


def test_empty_variable_name(pairs) -> None:
    with pytest.raises(TypeError, match="non-empty string"):
        CounterfactualPairs(pairs.base_inputs, pairs.source_inputs, pairs.base_positions, pairs.source_positions, pairs.labels, variable="")


def test_empty_task_data() -> None:
    with pytest.raises(ValueError, match="empty"):
        LabelledSequences(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long))


# -- alignment settings ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -2])
def test_subspace_dim_below_one(models, k) -> None:
    with pytest.raises(ValueError, match="at least one dimension"):
        alignment_of(models, k)


@pytest.mark.parametrize("k", ["4", 4.0, True, None])
def test_subspace_dim_that_is_not_an_int(models, k) -> None:
    with pytest.raises(TypeError, match="subspace_dim"):
        ModelAlignment(models, "rnn.h_l0", k)


def test_subspace_dim_mapping_with_zero(models) -> None:
    with pytest.raises(ValueError, match="'null' is 0"):
        ModelAlignment(models, "rnn.h_l0", {"count": 2, "null": 0})


def test_subspace_dim_and_its_older_spelling_together(models) -> None:
    with pytest.raises(TypeError, match="not both"):
        ModelAlignment(models, "rnn.h_l0", 2, subspace_dims=2)


def test_older_spelling_still_works(models) -> None:
    assert ModelAlignment(models, "rnn.h_l0", subspace_dims=3).subspace_dim == {"count": 3}


def test_subspace_larger_than_the_width(models) -> None:
    with pytest.raises(ValueError, match="exceeds the width 16"):
        alignment_of(models, 17)


def test_no_models() -> None:
    with pytest.raises(ValueError, match="at least one model"):
        ModelAlignment({}, "rnn.h_l0", 2)


def test_missing_site(models) -> None:
    with pytest.raises(ValueError, match=r"no site given for model\(s\) \['B'\]"):
        ModelAlignment(models, {"A": "rnn.h_l0"}, 2)


def test_unknown_site_lists_the_valid_ones(models) -> None:
    with pytest.raises(ValueError, match="rnn.h_l0"):
        ModelAlignment(models, "rnn.h_l9", 2)


# -- fit ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("steps", 0, "steps must be a positive integer"),
        ("steps", 2.5, "steps must be a positive integer"),
        ("patience", -3, "patience must be a positive integer"),
        ("batch_size", 0, "batch_size must be a positive integer"),
        ("eval_every", True, "eval_every must be a positive integer"),
        ("lr", math.inf, "lr must be a finite positive number"),
        ("lr", 0.0, "lr must be a finite positive number"),
        ("lr", float("nan"), "lr must be a finite positive number"),
        ("min_delta", -1.0, "min_delta must be a finite number >= 0"),
        ("target_accuracy", 0.0, "target_accuracy must be a number > 0"),
    ],
)
def test_fit_settings_that_would_train_nothing_or_wrongly(models, pairs, option, value, message) -> None:
    alignment = alignment_of(models)
    before = {k: v.clone() for k, v in alignment.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        fit(alignment, pairs, pairs, progress=False, **{option: value})
    assert all(torch.equal(before[k], v) for k, v in alignment.state_dict().items())


def test_fit_on_empty_lists(models) -> None:
    with pytest.raises(ValueError, match="train is an empty list"):
        fit(alignment_of(models), [], [], progress=False)


def test_fit_on_something_that_is_not_pairs(models, pairs) -> None:
    with pytest.raises(TypeError, match="train must be CounterfactualPairs"):
        fit(alignment_of(models), pairs.labels, pairs, progress=False)


def test_fit_with_views_missing_a_model(models, pairs) -> None:
    with pytest.raises(ValueError, match=r"not for model\(s\) \['B'\]"):
        fit(alignment_of(models), {"A": pairs}, {"A": pairs}, progress=False)


def test_fit_with_a_direction_naming_no_model(models, pairs) -> None:
    with pytest.raises(ValueError, match="pair of model names"):
        fit(alignment_of(models), pairs, pairs, directions=[("A", "C")], progress=False)


def test_fit_with_a_direction_given_twice(models, pairs) -> None:
    with pytest.raises(ValueError, match=r"\('A', 'B'\) is given twice"):
        fit(alignment_of(models), pairs, pairs, directions=[("A", "B"), ("B", "A"), ("A", "B")], progress=False)


def test_fit_with_a_string_for_directions(models, pairs) -> None:
    with pytest.raises(TypeError, match="list of \\(source, target\\) pairs"):
        fit(alignment_of(models), pairs, pairs, directions="A->B", progress=False)


def test_fit_with_pairs_of_another_variable(models, pairs) -> None:
    with pytest.raises(ValueError, match="variables \\['phase'\\]"):
        fit(alignment_of(models, variable="phase"), pairs, pairs, progress=False)


class NaNLogits(torch.nn.Module):
    """A GRU whose logits are NaN: its outputs cannot be trained against."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(8, 8)
        self.rnn = torch.nn.GRU(8, 16, batch_first=True)
        self.readout = torch.nn.Linear(16, 8)

    def forward(self, tokens):
        return self.readout(self.rnn(self.embedding(tokens))[0]) * float("nan")


def test_nan_logits_are_an_error_not_an_untrained_result(pairs) -> None:
    models = {"A": TorchModuleAdapter(NaNLogits(), name="A")}
    with pytest.raises(FloatingPointError, match="NaN or infinite.*logits are finite"):
        fit(ModelAlignment(models, "rnn.h_l0", 2), pairs, pairs, steps=3, progress=False)


# -- evaluate --------------------------------------------------------------------------------------


def test_evaluate_on_an_empty_list(models) -> None:
    with pytest.raises(TypeError, match="CounterfactualPairs.*list \\(empty\\)"):
        evaluate(alignment_of(models), [])


def test_evaluate_labels_outside_the_vocabulary(models, pairs) -> None:
    labels = pairs.labels.clone()
    labels[labels != IGNORE_INDEX] = 50
    bad = CounterfactualPairs(pairs.base_inputs, pairs.source_inputs, pairs.base_positions, pairs.source_positions, labels)
    with pytest.raises(ValueError, match="go up to token 50.*only 8 logits"):
        evaluate(alignment_of(models), bad, floor=False)


def test_ceiling_data_missing_a_model(models, pairs, small_task) -> None:
    with pytest.raises(ValueError, match=r"not for model\(s\) \['B'\]"):
        evaluate(alignment_of(models), pairs, ceiling_data={"A": small_task.sample(8)}, floor=False)


def test_ceiling_data_that_is_not_task_sequences_is_refused_before_any_scoring(models, pairs, small_task, monkeypatch) -> None:
    import sys

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before the ceiling data was checked")

    monkeypatch.setattr(sys.modules["masalign.evaluate"], "interchange_scores", no_scoring)
    with pytest.raises(TypeError, match=r"ceiling_data\['B'\] is CounterfactualPairs, not LabelledSequences"):
        evaluate(alignment_of(models), pairs, ceiling_data={"A": small_task.sample(8), "B": pairs})


def test_pairs_of_another_variable_are_refused_before_any_model_runs(models, pairs, monkeypatch) -> None:
    import dataclasses
    import sys

    def no_reading(*args, **kwargs):
        raise AssertionError("read activations before the variable was checked")

    monkeypatch.setattr(sys.modules["masalign.evaluate"], "interchange_scores", no_reading)
    monkeypatch.setattr(ModelAlignment, "source_activations", no_reading)
    other = dataclasses.replace(pairs, variable="phase")
    with pytest.raises(KeyError, match=r"no variable 'phase'; this alignment has \['count'\]: build it with variable='phase'"):
        evaluate(alignment_of(models), other)


def test_ceiling_labels_outside_the_vocabulary(models, pairs, small_task) -> None:
    data = small_task.sample(8)
    labels = data.labels.clone()
    labels[labels != IGNORE_INDEX] = 99
    with pytest.raises(ValueError, match="not in this model's vocabulary"):
        evaluate(alignment_of(models), pairs, ceiling_data=LabelledSequences(data.inputs, labels), floor=False)


def test_sweep_with_a_bad_size(models, pairs) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        iia_by_subspace_dim(lambda k: alignment_of(models, k), [2, 0], pairs, pairs, pairs)


# -- the command line --------------------------------------------------------------------------


def test_cli_out_is_a_file(tmp_path) -> None:
    target = tmp_path / "report.txt"
    target.write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        cli_main(["demo", "--out", str(target), "--cache", str(tmp_path / "cache")])


def test_cli_refuses_to_overwrite_results(tmp_path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.json").write_text("{}")
    with pytest.raises(SystemExit, match="--overwrite"):
        cli_main(["demo", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])


def test_cli_unwritable_cache_is_found_before_training(tmp_path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match="--cache.*writable"):
        cli_main(["demo", "--out", str(tmp_path / "out"), "--cache", str(blocker)])


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "four"])
def test_cli_subspace_dim_must_be_a_positive_integer(value, capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["demo", "--subspace-dim", value])
    assert "--subspace-dim" in capsys.readouterr().err


def test_cli_corrupted_cached_model_is_named_with_the_fix(tmp_path) -> None:
    from masalign.models import reference_model

    folder = tmp_path / "multi_object-gru128-seed0"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="rm -r"):
        reference_model("gru", "multi_object", 0, tmp_path, log=lambda *a: None)




# -- display ----------------------------------------------------------------------------------


def test_report_plot_returns_a_figure_and_leaves_the_backend_alone(tmp_path) -> None:
    import matplotlib
    from matplotlib.figure import Figure

    from masalign import IIAReport

    report = IIAReport(
        models=["A", "B"], sites={"A": "s", "B": "s"}, subspace_dim={"count": 2}, variable="count", n_pairs=4,
        iia={"A": {"A": 0.9, "B": 0.25}, "B": {"A": 0.5, "B": 1.0}}, iia_token={"A": {"A": 1.0, "B": 0.5}, "B": {"A": 0.75, "B": 1.0}},
        floor={"A": {"A": 0.1, "B": 0.0}, "B": {"A": 0.05, "B": 0.2}}, ceiling={"A": 0.97, "B": 1.0},
    )
    backend = matplotlib.get_backend()
    figure = report.plot(tmp_path / "iia.png")
    assert isinstance(figure, Figure) and (tmp_path / "iia.png").stat().st_size > 0
    assert matplotlib.get_backend() == backend
    html = report._repr_html_()
    assert html.count("<tr>") == 4  # header, two sources, ceiling
    assert "0.250 <small>(0.000)</small>" in html and "0.970" in html


def test_a_model_partly_on_the_meta_device_is_refused_with_what_to_do() -> None:
    """A model whose weights are partly on the meta device (built there and never filled) would
    align nothing; it must be refused up front, saying what to do, not fail mid-fit. (A model
    sharded across real devices is supported: tests/test_cuda.py.)"""
    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig(hidden_size=8, embedding_size=4))
    model.readout.to("meta")
    with pytest.raises(ValueError, match=r"model 'A' has parameters on the meta device.*load its weights first"):
        ModelAlignment({"A": TorchModuleAdapter(model, name="A")}, "rnn.h_l0", 2)


# -- per-model views, labels, and what evaluation leaves on the models ---------------------------


def _with_positions(pairs: CounterfactualPairs, base_positions, source_positions) -> CounterfactualPairs:
    return CounterfactualPairs(pairs.base_inputs, pairs.source_inputs, base_positions, source_positions, pairs.labels)


def test_per_model_views_must_use_the_same_slots(models, pairs) -> None:
    two = torch.stack([pairs.base_positions[:, 0], pairs.base_positions[:, 0] - 1], 1)
    one_empty = two.clone()
    one_empty[3, 1] = -1
    views = {"A": _with_positions(pairs, two, two), "B": _with_positions(pairs, two[:, :1], two[:, :1])}
    with pytest.raises(ValueError, match=r"'A' and 'B' have 2 and 1 slots per pair.*same slots"):
        evaluate(alignment_of(models), views, floor=False)
    views["B"] = _with_positions(pairs, one_empty, one_empty)
    with pytest.raises(ValueError, match=r"pair 3: slot 1 is empty \(-1\) in the view of 'B' but not in the other's"):
        fit(alignment_of(models), views, views, steps=1, progress=False)


def test_labels_must_cover_the_base_positions(pairs, small_task) -> None:
    with pytest.raises(ValueError, match=r"one column per position of base_inputs \(seq = \d+\).*-100"):
        CounterfactualPairs(pairs.base_inputs, pairs.source_inputs, pairs.base_positions, pairs.source_positions, pairs.labels[:, 1:])
    task_data = small_task.sample(8, seed=0, split="held_out")
    with pytest.raises(ValueError, match="one column per position of inputs"):
        LabelledSequences(task_data.inputs, task_data.labels[:, :-1])
    no_label = task_data.labels.clone()
    no_label[5] = IGNORE_INDEX
    with pytest.raises(ValueError, match="row 5 has no label position"):
        LabelledSequences(task_data.inputs, no_label)  # it would count as a right trial in the ceiling
    with pytest.raises(TypeError, match="integer token ids"):
        LabelledSequences(task_data.inputs, task_data.labels.float())


def test_evaluation_runs_models_in_eval_mode_and_leaves_their_modes_alone(models, pairs, small_task) -> None:
    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig(hidden_size=16, embedding_size=8))
    model.embedding = torch.nn.Sequential(model.embedding, torch.nn.Dropout(0.5))
    adapter = TorchModuleAdapter(model, name="A")
    alignment = ModelAlignment({"A": adapter}, "rnn.h_l0", 2)
    model.train()
    model.rnn.eval()  # a user's own mix of modes
    ceiling_data = small_task.sample(32, seed=1, split="held_out")
    reports = [evaluate(alignment, pairs, ceiling_data=ceiling_data).to_dict() for _ in range(2)]
    assert model.training and model.embedding[1].training and not model.rnn.training
    model.eval()
    assert reports[0] == reports[1] == evaluate(alignment, pairs, ceiling_data=ceiling_data).to_dict()


def test_fit_restores_a_model_that_serves_two_names() -> None:
    from masalign.train import frozen_models

    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig(hidden_size=16, embedding_size=8)).train()
    model.readout.eval()
    adapter = TorchModuleAdapter(model)
    with frozen_models(ModelAlignment({"A": adapter, "B": adapter}, "rnn.h_l0", 2)):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.training and not model.readout.training and all(p.requires_grad for p in model.parameters())


def test_standardization_keeps_its_own_copy(models) -> None:
    alignment = alignment_of(models)
    mean, std = torch.zeros(16), torch.ones(16)
    for name in "AB":
        alignment.alignments[name].set_standardization(mean, std)
    mean += 5.0
    assert all(float(alignment.alignments[name].mean.abs().max()) == 0.0 for name in "AB")
    assert alignment.alignments["A"].mean.data_ptr() != alignment.alignments["B"].mean.data_ptr()


def test_standardization_reads_the_models_in_eval_mode(pairs) -> None:
    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig(hidden_size=16, embedding_size=8))
    model.embedding = torch.nn.Sequential(model.embedding, torch.nn.Dropout(0.5))
    means = []
    for training in (True, False):
        model.train(training)
        alignment = ModelAlignment({"A": TorchModuleAdapter(model, name="A")}, "rnn.h_l0", 2)
        fit(alignment, pairs, pairs, steps=1, standardize=True, progress=False)
        means.append(alignment.alignments["A"].mean.clone())
        assert model.training == training
    assert torch.equal(means[0], means[1])
