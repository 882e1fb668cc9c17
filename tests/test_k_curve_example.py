"""examples/iia_vs_subspace_dim.py --merge: run folders merged into one document, no fitting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from example_scripts import load_example


@pytest.fixture(scope="module")
def example():
    return load_example("iia_vs_subspace_dim.py")


def _by_str_k(table: dict) -> dict:
    return {method: {str(k): value for k, value in row.items()} for method, row in table.items()}


def run_document(iia: dict, floor: dict | None = None, **settings) -> dict:
    """A run's document as the example writes it, with cells given as {method: {k: value}}."""
    floor = floor if floor is not None else {m: {k: 0.1 for k in row} for m, row in iia.items()}
    return {
        "subspace_dim": sorted({k for row in iia.values() for k in row}), "iia": _by_str_k(iia), "floor": _by_str_k(floor),
        "steps": 400, "n_train": 6000, "site": "rnn.h_l0", "seed": 0,
        "command": "examples/iia_vs_subspace_dim.py ...", "seconds": 12.5, "device": "cuda", "device_name": "GPU",
        **settings,
    }


def write_run(folder: Path, document: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "iia_vs_k.json").write_text(json.dumps(document))
    return folder


def test_merge_takes_the_union_of_cells_and_lists_the_runs(example, tmp_path):
    first = write_run(tmp_path / "mas", run_document({"MAS": {1: 0.3, 4: 0.8}}, command="run mas", seconds=10.0))
    second = write_run(tmp_path / "das", run_document({"DAS": {2: 0.5}, "MAS": {4: 0.8}}, command="run das", seconds=20.0))
    out = tmp_path / "merged"

    merged = example.merge([first, second], out)

    assert merged["subspace_dim"] == [1, 2, 4]
    assert merged["iia"] == {"MAS": {"1": 0.3, "4": 0.8}, "DAS": {"2": 0.5}}
    assert merged["floor"] == {"MAS": {"1": 0.1, "4": 0.1}, "DAS": {"2": 0.1}}
    assert (merged["steps"], merged["n_train"], merged["site"], merged["seed"]) == (400, 6000, "rnn.h_l0", 0)
    assert [(r["folder"], r["command"], r["seconds"], r["device"]) for r in merged["runs"]] == [
        (str(first), "run mas", 10.0, "cuda"), (str(second), "run das", 20.0, "cuda"),
    ]
    assert merged["seconds"] == 30.0
    assert json.loads((out / "iia_vs_k.json").read_text()) == merged
    assert not (out / "iia_vs_k.png").exists()  # stitching is missing: no plot


def test_merge_plots_when_every_method_covers_every_k(example, tmp_path):
    folders = [
        write_run(tmp_path / method, run_document({method: {1: 0.2, 2: 0.4}}))
        for method in ("MAS", "stitching", "DAS")
    ]
    merged = example.merge(folders, tmp_path / "merged")
    assert set(merged["iia"]) == {"MAS", "stitching", "DAS"}
    assert (tmp_path / "merged" / "iia_vs_k.png").is_file()


def test_merge_refuses_a_cell_with_two_values(example, tmp_path):
    first = write_run(tmp_path / "a", run_document({"MAS": {4: 0.8}}))
    second = write_run(tmp_path / "b", run_document({"MAS": {4: 0.7}}))
    with pytest.raises(ValueError, match="iia of MAS at k=4 differs between runs") as error:
        example.merge([first, second], tmp_path / "merged")
    assert str(first) in str(error.value) and str(second) in str(error.value)


def test_merge_refuses_a_floor_with_two_values(example, tmp_path):
    first = write_run(tmp_path / "a", run_document({"MAS": {4: 0.8}}, floor={"MAS": {4: 0.1}}))
    second = write_run(tmp_path / "b", run_document({"MAS": {4: 0.8}}, floor={"MAS": {4: 0.2}}))
    with pytest.raises(ValueError, match="floor of MAS at k=4"):
        example.merge([first, second], tmp_path / "merged")


@pytest.mark.parametrize(("name", "value"), [("steps", 1000), ("n_train", 4000), ("site", "rnn.c_l0"), ("seed", 1)])
def test_merge_refuses_runs_with_different_settings(example, tmp_path, name, value):
    first = write_run(tmp_path / "a", run_document({"MAS": {1: 0.3}}))
    second = write_run(tmp_path / "b", run_document({"DAS": {1: 0.3}}, **{name: value}))
    with pytest.raises(ValueError, match=f"different {name}") as error:
        example.merge([first, second], tmp_path / "merged")
    assert str(first) in str(error.value) and str(second) in str(error.value)


def test_merge_refuses_a_folder_without_a_run(example, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no iia_vs_k.json"):
        example.merge([tmp_path / "empty"], tmp_path / "merged")


def test_every_example_script_answers_help_without_running(tmp_path) -> None:
    """A user's first `--help` must describe a script, not start minutes of training."""
    import subprocess
    import sys

    from example_scripts import EXAMPLES

    for script in sorted(EXAMPLES.glob("*.py")):
        done = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout, (script.name, done.stderr[-2000:])
        assert not any(tmp_path.iterdir()), script.name  # nothing written
