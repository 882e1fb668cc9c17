"""IIA against subspace size k for MAS, DAS and stitching on the GRU seed pair.

- MAS: one alignment for both GRUs, trained in all four directions; reported:
  the mean cross-seed IIA (A->B, B->A).
- DAS: one alignment within a single GRU (source = target), for each seed; reported:
  the mean of the two within-model IIAs.
- Stitching: MAS with the target's complement zeroed (``keep_complement=False``);
  reported: the mean cross-seed IIA.

Writes ``OUT/iia_vs_k.json`` (with the command, the wall time and the device) and,
when all three methods are run, a plot. Two ways to run it:

- one process, the whole curve:
    .venv/bin/python examples/iia_vs_subspace_dim.py --out k_curve   (about 20-30 minutes on 2 CPU cores)
- many small processes (e.g. one per method and k, on a GPU with --device cuda --threads 1),
  each into its own folder, then merged into one document and plot:
    .venv/bin/python examples/iia_vs_subspace_dim.py --device cuda --threads 1 --methods MAS --dims 4 --out k_curve/MAS_4 &
    ...
    .venv/bin/python examples/iia_vs_subspace_dim.py --merge k_curve/* --out k_curve_merged
  The merge refuses runs with different --steps, --train-pairs, --seed or site, and two runs
  that give the same (method, k) cell different values.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from masalign import ModelAlignment, iia_by_subspace_dim
from masalign.models import DEMO_PAIRS, DEMO_SITES, default_cache, reference_model
from masalign.tasks import get_task

METHODS = ("MAS", "stitching", "DAS")
# A run's settings that must agree for its cells to be merged with another run's.
SHARED_SETTINGS = ("steps", "n_train", "site", "seed")
DOCUMENT_NAME = "iia_vs_k.json"

Cells = dict[str, dict[str, float]]  # method -> str(k) -> value, as json reads and writes it


def _mean(matrix: dict, directions: list[tuple[str, str]]) -> float:
    return sum(matrix[s][t] for s, t in directions) / len(directions)


def _by_str_k(table: dict[str, dict[int, float]]) -> Cells:
    # json writes int keys as strings; the document uses strings everywhere, so a returned
    # document and one read back from disk look alike.
    return {method: {str(k): value for k, value in row.items()} for method, row in table.items()}


def device_record(device: torch.device) -> dict[str, Any]:
    """What the document says about where it ran."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": str(device), "device_name": name, "threads": torch.get_num_threads()}


def load_models(device: torch.device) -> dict[str, Any]:
    """The GRU seed pair's adapters, labelled A and B, with their modules on ``device``."""
    models = {}
    for label, (architecture, model_seed) in zip("AB", DEMO_PAIRS["gru-gru"]):
        adapter, _ = reference_model(architecture, "multi_object", model_seed, default_cache(), print)
        # The adapters (and the alignments built on them) take their device from the parameters.
        adapter.model.to(device)
        models[label] = adapter
    return models


def run(
    dims: list[int], steps: int, n_train: int, out: Path, seed: int = 0, methods: tuple[str, ...] = METHODS,
    device: str | torch.device = "cpu",
) -> dict:
    started = time.perf_counter()
    device = torch.device(device)
    task = get_task("multi_object")
    models = load_models(device)
    train = task.counterfactual_pairs(n_train, seed=seed + 1)
    valid = task.counterfactual_pairs(400, seed=seed + 2)
    test = task.counterfactual_pairs(1500, seed=seed + 3)
    site = DEMO_SITES["gru"]
    options = dict(steps=steps, lr=5e-3, eval_every=50, seed=seed, progress=False)
    cross = [("A", "B"), ("B", "A")]

    def sweep(build, directions=None):
        return iia_by_subspace_dim(
            build, dims, train, valid, test, fit_options=options, directions=directions,
            progress=lambda k, report: print(f"  k={k:>2}: {report.iia}", flush=True),
        )

    table: dict[str, dict[int, float]] = {}
    floors: dict[str, dict[int, float]] = {}
    fits: dict[str, dict[int, Any]] = {}  # how each fit ended: did it use every step?
    for method, keep in [(m, keep) for m, keep in (("MAS", True), ("stitching", False)) if m in methods]:
        print(f"{method} (mean of the cross-seed directions)")
        reports = sweep(lambda k, keep=keep: ModelAlignment(models, site, k, keep_complement=keep, seed=seed))
        table[method] = {k: _mean(r.iia, cross) for k, r in reports.items()}
        floors[method] = {k: _mean(r.floor, cross) for k, r in reports.items()}
        fits[method] = {k: _how_it_ended(r) for k, r in reports.items()}
    if "DAS" in methods:
        print("DAS (within each seed, mean of the two)")
        per_seed = {label: sweep(lambda k, label=label: ModelAlignment({label: models[label]}, site, k, seed=seed)) for label in "AB"}
        table["DAS"] = {k: _mean({l: r[k].iia[l] for l, r in per_seed.items()}, [("A", "A"), ("B", "B")]) for k in dims}
        floors["DAS"] = {k: _mean({l: r[k].floor[l] for l, r in per_seed.items()}, [("A", "A"), ("B", "B")]) for k in dims}
        fits["DAS"] = {k: {label: _how_it_ended(r[k]) for label, r in per_seed.items()} for k in dims}
    seconds = time.perf_counter() - started
    print(f"done in {seconds:.0f}s")
    document = {
        "subspace_dim": sorted(dims), "iia": _by_str_k(table), "floor": _by_str_k(floors), "fits": _by_str_k(fits),
        "steps": steps, "n_train": n_train, "site": site, "seed": seed,
        "command": " ".join(sys.argv), "seconds": seconds, **device_record(device),
    }
    write(document, out)
    return document


def _how_it_ended(report: Any) -> dict[str, Any]:
    """The fit's steps, why it stopped and its best step (a fit stopped early would end the same with more steps)."""
    fit_summary = report.extra["fit"]
    return {key: fit_summary[key] for key in ("steps", "stop_reason", "best_step")}


def write(document: dict, out: Path) -> None:
    """The JSON document in ``out``, and the plot when it covers every method at every k."""
    out.mkdir(parents=True, exist_ok=True)
    (out / DOCUMENT_NAME).write_text(json.dumps(document, indent=2))
    if covers_all(document):  # the plot draws all three
        plot(document, out / "iia_vs_k.png")


def covers_all(document: dict) -> bool:
    """Whether every method has a cell at every k of the document."""
    dims = document.get("subspace_dim", document.get("subspace_dims"))
    return all(method in document["iia"] and {str(k) for k in dims} <= {str(k) for k in document["iia"][method]}
               for method in METHODS)


def read_run(folder: Path) -> dict:
    path = folder / DOCUMENT_NAME
    if not path.is_file():
        raise ValueError(f"{folder} holds no {DOCUMENT_NAME}; is it a run folder of this example?")
    return json.loads(path.read_text())


def _settings(document: dict) -> dict[str, Any]:
    # Runs written before --seed existed ran with seed 0.
    return {name: document.get(name, 0 if name == "seed" else None) for name in SHARED_SETTINGS}


def check_same_settings(documents: dict[Path, dict]) -> dict[str, Any]:
    """The settings the runs share; a ValueError naming the folders when two differ."""
    (first, first_document), *rest = documents.items()
    shared = _settings(first_document)
    for folder, document in rest:
        for name, value in _settings(document).items():
            if value != shared[name]:
                raise ValueError(
                    f"cannot merge runs with different {name}: {first} has {shared[name]!r}, {folder} has {value!r}"
                )
    return shared


def merge_cells(documents: dict[Path, dict], key: str) -> Cells:
    """The union of the runs' ``key`` cells ("iia" or "floor"), each (method, k) once.

    A cell given by two runs must have the same value in both (same settings and seed
    give the same fit); a different value means the runs are not comparable, so refuse.
    """
    merged: Cells = {}
    came_from: dict[tuple[str, str], Path] = {}
    for folder, document in documents.items():
        for method, row in document[key].items():
            for k, value in row.items():
                cell = (method, str(k))
                if cell in came_from and merged[method][str(k)] != value:
                    raise ValueError(
                        f"{key} of {method} at k={k} differs between runs: {merged[method][str(k)]!r} in "
                        f"{came_from[cell]}, {value!r} in {folder}"
                    )
                merged.setdefault(method, {})[str(k)] = value
                came_from.setdefault(cell, folder)
    # Known methods first, in the usual order; each row by k.
    order = [m for m in METHODS if m in merged] + sorted(m for m in merged if m not in METHODS)
    return {method: dict(sorted(merged[method].items(), key=lambda item: int(item[0]))) for method in order}


def _run_record(folder: Path, document: dict) -> dict[str, Any]:
    return {
        "folder": str(folder), "command": document.get("command"), "seconds": document.get("seconds"),
        "device": document.get("device"), "device_name": document.get("device_name"),
    }


def merge(folders: list[Path], out: Path) -> dict:
    """One document (and plot, when complete) from the run folders' ``iia_vs_k.json``, written to ``out``.

    Top-level ``seconds`` is the runs' summed time (parallel runs took less wall time),
    ``device`` the distinct devices; ``runs`` lists each run's command, seconds and device.
    """
    if not folders:
        raise ValueError("--merge needs at least one run folder")
    documents = {Path(folder): read_run(Path(folder)) for folder in folders}
    shared = check_same_settings(documents)
    # Every k a run lists or gives a cell for (documents from before subspace_dim say subspace_dims).
    dims = sorted(
        {int(k) for d in documents.values() for k in d.get("subspace_dim", d.get("subspace_dims", []))}
        | {int(k) for d in documents.values() for row in d["iia"].values() for k in row}
    )
    runs = [_run_record(folder, document) for folder, document in documents.items()]
    seconds = [run["seconds"] for run in runs]
    document = {
        "subspace_dim": dims, "iia": merge_cells(documents, "iia"), "floor": merge_cells(documents, "floor"),
        # Runs from before fits were recorded have none.
        "fits": merge_cells({f: d for f, d in documents.items() if "fits" in d}, "fits"),
        **shared,
        "command": " ".join(sys.argv),
        "seconds": sum(seconds) if None not in seconds else None,
        "device": ", ".join(sorted({run["device"] for run in runs if run["device"] is not None})) or None,
        "runs": runs,
    }
    write(document, out)
    return document


def plot(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(5.5, 3.8))
    dims = document.get("subspace_dim", document.get("subspace_dims"))
    for method, marker in (("MAS", "o"), ("DAS", "s"), ("stitching", "^")):
        ax.plot(dims, [document["iia"][method][str(k)] if str(k) in document["iia"][method] else document["iia"][method][k] for k in dims],
                marker=marker, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(k) for k in dims])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("subspace size k")
    ax.set_ylabel("IIA (trial accuracy)")
    ax.set_title("count, GRU seeds 0 and 1, rnn.h_l0")
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="k_curve")
    parser.add_argument("--dims", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--train-pairs", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--device", default="cpu", help="where the models and alignments run, e.g. cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 for many parallel processes)")
    parser.add_argument("--merge", nargs="+", metavar="DIR", help="merge these run folders into --out instead of fitting")
    args = parser.parse_args()
    if args.merge:
        merge([Path(folder) for folder in args.merge], Path(args.out))
        return
    torch.set_num_threads(args.threads)
    run(args.dims, args.steps, args.train_pairs, Path(args.out), seed=args.seed, methods=tuple(args.methods), device=args.device)


if __name__ == "__main__":
    main()
