"""Saving and loading alignments and reference models: exact round trips, atomic
writes, no silent overwrite, and a clear error for every corrupted, edited,
newer-format or mismatched save."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import masalign.storage as storage
from masalign import ModelAlignment, TorchModuleAdapter, interchange_scores
from masalign.models import RecurrentConfig, RecurrentLM, load_model, save_model
from masalign.storage import check_writable


def tiny_models(model_class: type[RecurrentLM] = RecurrentLM, embedding_size: int = 8) -> dict[str, TorchModuleAdapter]:
    torch.manual_seed(0)
    config = RecurrentConfig(hidden_size=16, embedding_size=embedding_size)
    return {name: TorchModuleAdapter(model_class(config), name=name) for name in "AB"}


def perturbed_alignment(models: dict[str, TorchModuleAdapter], kind: str = "orthogonal") -> ModelAlignment:
    """An alignment whose every tensor differs from its initial value."""
    alignment = ModelAlignment(models, "rnn.h_l0", 4, alignment=kind, seed=3)
    with torch.no_grad():
        for p in alignment.alignments.parameters():
            p.add_(0.1 * torch.randn_like(p))
    width = next(iter(alignment.widths.values()))
    for a in alignment.alignments.values():
        a.set_standardization(torch.full((width,), 0.1), torch.full((width,), 0.5))
    return alignment


def assert_same_state(saved: nn.Module, loaded: nn.Module) -> None:
    before, after = saved.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# -- one set of checks for both kinds of save --------------------------------------------


@dataclass
class SaveCase:
    original: nn.Module
    write: Callable[..., Path]  # (folder, overwrite=False)
    read: Callable[[Path], nn.Module]
    tensor_file: str
    json_file: str
    kind: str


def alignment_case() -> SaveCase:
    models = tiny_models()
    alignment = perturbed_alignment(models)
    return SaveCase(
        alignment,
        lambda folder, overwrite=False: alignment.save(folder, overwrite=overwrite),
        lambda folder: ModelAlignment.load(folder, models),
        "alignment.safetensors",
        "alignment.json",
        "masalign.alignment",
    )


def model_case() -> SaveCase:
    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig(hidden_size=16, embedding_size=8))
    return SaveCase(
        model,
        lambda folder, overwrite=False: save_model(model, folder, overwrite=overwrite),
        load_model,
        "model.safetensors",
        "config.json",
        "masalign.reference_model",
    )


@pytest.fixture(params=["alignment", "model"])
def case(request) -> SaveCase:
    return {"alignment": alignment_case, "model": model_case}[request.param]()


def test_round_trip_is_exact(case, tmp_path) -> None:
    case.write(tmp_path / "saved")
    manifest = json.loads((tmp_path / "saved" / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["kind"] == case.kind
    assert set(manifest["files"]) == {case.tensor_file, case.json_file}
    assert_same_state(case.original, case.read(tmp_path / "saved"))


def test_overwrite_is_refused_then_allowed(case, tmp_path) -> None:
    folder = tmp_path / "saved"
    case.write(folder)
    first = {k: v.clone() for k, v in case.original.state_dict().items()}
    with torch.no_grad():
        for p in case.original.parameters():
            p.add_(1.0)
    with pytest.raises(FileExistsError, match=r"already exists; pass overwrite=True \(--overwrite"):
        case.write(folder)
    loaded = case.read(folder).state_dict()
    assert all(torch.equal(first[k], loaded[k]) for k in first)  # the first save is untouched
    case.write(folder, overwrite=True)
    assert_same_state(case.original, case.read(folder))
    assert leftovers(tmp_path) == []


def test_an_empty_folder_is_not_an_overwrite(case, tmp_path) -> None:
    (tmp_path / "saved").mkdir()
    case.write(tmp_path / "saved")
    assert_same_state(case.original, case.read(tmp_path / "saved"))


def test_overwrite_never_deletes_other_files(case, tmp_path) -> None:
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"refusing to replace .* holds \['notes.txt'\]"):
        case.write(folder, overwrite=True)
    assert snapshot(folder) == {"notes.txt": b"mine"}


def test_saving_onto_a_file_is_an_error(case, tmp_path) -> None:
    (tmp_path / "saved").write_text("a file")
    with pytest.raises(FileExistsError, match="is a file"):
        case.write(tmp_path / "saved", overwrite=True)
    assert (tmp_path / "saved").read_text() == "a file"


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "over-existing"])
def test_a_save_interrupted_midway_changes_nothing(case, tmp_path, monkeypatch, interruption, existing) -> None:
    folder = tmp_path / "saved"
    if existing:
        case.write(folder)
    before = snapshot(folder) if existing else None

    def write_half_then_fail(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"half a safetensors file")
        raise interruption

    monkeypatch.setattr(storage, "save_file", write_half_then_fail)
    with pytest.raises(interruption):
        case.write(folder, overwrite=existing)
    if existing:
        assert snapshot(folder) == before
    else:
        assert not folder.exists()
    assert leftovers(tmp_path) == []


def test_a_save_interrupted_while_moving_into_place_changes_nothing(case, tmp_path, monkeypatch) -> None:
    folder = tmp_path / "saved"
    case.write(folder)
    before = snapshot(folder)
    real_replace = storage.os.replace

    def interrupt_the_new_folder(source, destination):
        if ".tmp-" in Path(source).name:
            raise KeyboardInterrupt
        real_replace(source, destination)

    monkeypatch.setattr(storage.os, "replace", interrupt_the_new_folder)
    with pytest.raises(KeyboardInterrupt):
        case.write(folder, overwrite=True)
    assert snapshot(folder) == before
    assert leftovers(tmp_path) == []


# -- damaged saves -----------------------------------------------------------------------------


def test_corrupted_bytes_are_detected(case, tmp_path) -> None:
    case.write(tmp_path / "saved")
    path = tmp_path / "saved" / case.tensor_file
    data = bytearray(path.read_bytes())
    data[-8:] = b"\xff" * 8  # NaNs in the last tensor: the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{re.escape(case.tensor_file)} does not match the SHA-256.*corrupted or was edited"):
        case.read(tmp_path / "saved")


def test_a_truncated_file_is_detected(case, tmp_path) -> None:
    case.write(tmp_path / "saved")
    path = tmp_path / "saved" / case.tensor_file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(case.tensor_file)} does not match the SHA-256"):
        case.read(tmp_path / "saved")


def test_an_edited_json_is_detected(case, tmp_path) -> None:
    case.write(tmp_path / "saved")
    path = tmp_path / "saved" / case.json_file
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "seed": 12345}, indent=2))
    with pytest.raises(ValueError, match=rf"{re.escape(case.json_file)} does not match the SHA-256.*edited"):
        case.read(tmp_path / "saved")


def test_a_damaged_manifest_is_named(case, tmp_path) -> None:
    case.write(tmp_path / "saved")
    manifest = tmp_path / "saved" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(ValueError, match=r"manifest.json is not valid JSON.*truncated or corrupted"):
        case.read(tmp_path / "saved")


def test_a_newer_format_version_is_refused(case, tmp_path) -> None:
    case.write(tmp_path / "saved")
    manifest = tmp_path / "saved" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99, but this masalign reads format_version 2"):
        case.read(tmp_path / "saved")


def test_a_missing_file_is_named(case, tmp_path) -> None:
    case.write(tmp_path / "saved")
    (tmp_path / "saved" / case.tensor_file).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(case.tensor_file)} is missing"):
        case.read(tmp_path / "saved")


def test_a_missing_manifest_in_a_new_save_is_an_error(case, tmp_path) -> None:
    case.write(tmp_path / "saved")
    (tmp_path / "saved" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json is missing.*format_version 2"):
        case.read(tmp_path / "saved")


def test_loading_one_kind_of_save_as_the_other(tmp_path) -> None:
    model_case().write(tmp_path / "model")
    with pytest.raises(ValueError, match="holds a 'masalign.reference_model' save, not a masalign alignment"):
        ModelAlignment.load(tmp_path / "model", tiny_models())


# -- saves from before the manifest (format_version 1) -------------------------------------------


def make_legacy(case: SaveCase, folder: Path) -> None:
    """What masalign wrote before format 2: the same files, no manifest, no architectures."""
    case.write(folder)
    (folder / "manifest.json").unlink()
    path = folder / case.json_file
    document = json.loads(path.read_text())
    document.pop("architectures", None)
    if case.kind == "masalign.alignment":
        document["format_version"] = 1
        if "subspace_dim" in document:  # its format-1 spelling
            document["subspace_dims"] = document.pop("subspace_dim")
    else:
        del document["format_version"]
    path.write_text(json.dumps(document, indent=2))


def test_a_legacy_save_loads_with_a_warning(case, tmp_path) -> None:
    make_legacy(case, tmp_path / "old")
    with pytest.warns(UserWarning, match="older masalign.*cannot be checked"):
        loaded = case.read(tmp_path / "old")
    assert_same_state(case.original, loaded)


def test_a_truncated_legacy_save_names_the_file(case, tmp_path) -> None:
    make_legacy(case, tmp_path / "old")
    path = tmp_path / "old" / case.tensor_file
    path.write_bytes(path.read_bytes()[:30])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=rf"{re.escape(case.tensor_file)} is not a readable safetensors"):
        case.read(tmp_path / "old")


def test_nans_in_a_legacy_alignment_are_refused(tmp_path) -> None:
    case = alignment_case()
    make_legacy(case, tmp_path / "old")
    path = tmp_path / "old" / case.tensor_file
    data = bytearray(path.read_bytes())
    data[-8:] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="alignment.safetensors holds non-finite values"):
        case.read(tmp_path / "old")


# -- alignments: exact interventions after loading, and the models they belong to ---------------


@pytest.mark.parametrize("kind", ["orthogonal", "scaled_orthogonal"])
def test_a_loaded_alignment_intervenes_exactly_as_the_saved_one(trained_grus, small_task, kind, tmp_path) -> None:
    models = {name: TorchModuleAdapter(model, name=name) for name, model in trained_grus.items()}
    alignment = perturbed_alignment(models, kind)  # no training needed to compare two copies
    alignment.save(tmp_path / "saved")
    loaded = ModelAlignment.load(tmp_path / "saved", models)
    assert_same_state(alignment, loaded)
    test = small_task.counterfactual_pairs(64, seed=11)
    hidden = alignment.source_activations("A", test.source_inputs, test.source_positions)
    with torch.no_grad():
        before = alignment.intervened_logits("A", "B", hidden, test.base_inputs, test.base_positions)
        after = loaded.intervened_logits("A", "B", hidden, test.base_inputs, test.base_positions)
    assert torch.equal(before, after)
    iia_before = {direction: s.trial_accuracy for direction, s in interchange_scores(alignment, test).items()}
    iia_after = {direction: s.trial_accuracy for direction, s in interchange_scores(loaded, test).items()}
    assert iia_before == iia_after


class RenamedLM(RecurrentLM):
    """The same parameters under another class name."""


def _swapped(models: dict[str, TorchModuleAdapter]) -> dict[str, TorchModuleAdapter]:
    return {"A": models["B"], "B": models["A"]}


@pytest.mark.parametrize(
    ("other_models", "message"),
    [
        (lambda: {**tiny_models(), "B": tiny_models(RenamedLM)["B"]},
         "model 'B' is not the architecture .*model_class: saved 'RecurrentLM', now 'RenamedLM'"),
        (lambda: {**tiny_models(), "B": tiny_models(embedding_size=12)["B"]},  # the same width at the site
         "model 'B' is not the architecture .*parameter_fingerprint: saved '[0-9a-f]+', now '[0-9a-f]+'"),
        # Two seeds of one architecture pass every shape check: a save must still know its own models.
        (lambda: _swapped(tiny_models()), "model 'A' does not have the weights .*right names"),
    ],
    ids=["other-class", "other-shapes", "swapped-seeds"],
)
def test_an_alignment_for_other_models_is_refused(other_models, message, tmp_path) -> None:
    alignment = perturbed_alignment(tiny_models())
    alignment.save(tmp_path / "saved")
    models = other_models()
    with pytest.raises(ValueError, match=rf"{message}.*check_models=False"):
        ModelAlignment.load(tmp_path / "saved", models)
    assert_same_state(alignment, ModelAlignment.load(tmp_path / "saved", models, check_models=False))


def test_an_alignment_loads_onto_its_models_cast_to_bfloat16(tmp_path) -> None:
    alignment = perturbed_alignment(tiny_models())
    alignment.save(tmp_path / "saved")
    models = tiny_models()
    for adapter in models.values():
        adapter.model.to(torch.bfloat16)
    assert_same_state(alignment, ModelAlignment.load(tmp_path / "saved", models))


def test_a_save_whose_map_settings_would_be_rebuilt_otherwise_is_refused(tmp_path, monkeypatch) -> None:
    """The SPD map's eps is no tensor: a default changed since the save would load other maps silently."""
    from masalign.alignment import SymmetricPositiveDefiniteAlignment as SPDAlignment

    models = tiny_models()
    alignment = ModelAlignment(models, "rnn.h_l0", 4, alignment="spd", seed=3)
    alignment.save(tmp_path / "saved")
    assert_same_state(alignment, ModelAlignment.load(tmp_path / "saved", models))
    monkeypatch.setattr(SPDAlignment, "config", lambda self: {"width": self.width, "n_aligned": self.n_aligned, "eps": 0.5, "init_condition": self.init_condition})
    with pytest.raises(ValueError, match=r"map of model 'A' was saved with eps=.*rebuilding it .* gives eps=0.5: this masalign cannot rebuild it"):
        ModelAlignment.load(tmp_path / "saved", models)


def test_a_float64_alignment_loads_back_in_float64(tmp_path) -> None:
    models = tiny_models()
    alignment = perturbed_alignment(models).double()
    with torch.no_grad():
        for p in alignment.alignments.parameters():
            p.add_(1e-12 * torch.randn_like(p))  # below float32's resolution
    alignment.save(tmp_path / "saved")
    loaded = ModelAlignment.load(tmp_path / "saved", models)
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {torch.float64}
    assert_same_state(alignment, loaded)


def test_the_saved_architecture_is_readable(tmp_path) -> None:
    alignment = perturbed_alignment(tiny_models())
    alignment.save(tmp_path / "saved")
    recorded = json.loads((tmp_path / "saved" / "alignment.json").read_text())["architectures"]["A"]
    assert {k: recorded[k] for k in ("adapter", "model_class", "site", "width")} == {
        "adapter": "TorchModuleAdapter",
        "model_class": "RecurrentLM",
        "site": "rnn.h_l0",
        "width": 16,
    }


# -- reference models ---------------------------------------------------------------------------


def test_a_loaded_reference_model_computes_the_same_logits(small_task, tmp_path) -> None:
    torch.manual_seed(1)
    model = RecurrentLM(RecurrentConfig("lstm", hidden_size=16, embedding_size=8)).eval()
    save_model(model, tmp_path / "lstm")
    loaded = load_model(tmp_path / "lstm")
    inputs = small_task.sample(32, seed=5).inputs
    with torch.no_grad():
        assert torch.equal(model(inputs), loaded(inputs))
    assert loaded.config == model.config


def test_check_writable(tmp_path) -> None:
    assert check_writable(tmp_path / "new" / "cache").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        check_writable(tmp_path / "file")
    with pytest.raises(OSError, match="cannot write into"):
        check_writable(tmp_path / "file" / "cache")
