"""IIA against subspace size k for MAS, DAS and stitching on the GRU seed pair.

- MAS: one alignment for both GRUs, trained in all four directions; reported:
  the mean cross-seed IIA (A->B, B->A).
- DAS: one alignment within a single GRU (source = target), for each seed; reported:
  the mean of the two within-model IIAs.
- Stitching: MAS with the target's complement zeroed (``keep_complement=False``);
  reported: the mean cross-seed IIA.

Writes a plot and a JSON table. Run:
  .venv/bin/python examples/iia_vs_subspace_dim.py --out k_curve   (about 20-30 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from masalign import ModelAlignment, iia_by_subspace_dim
from masalign.models import DEMO_PAIRS, DEMO_SITES, default_cache, reference_model
from masalign.tasks import get_task


def _mean(matrix: dict, directions: list[tuple[str, str]]) -> float:
    return sum(matrix[s][t] for s, t in directions) / len(directions)


def run(dims: list[int], steps: int, n_train: int, out: Path, seed: int = 0, methods: tuple[str, ...] = ("MAS", "stitching", "DAS")) -> dict:
    task = get_task("multi_object")
    models = {}
    for label, (architecture, model_seed) in zip("AB", DEMO_PAIRS["gru-gru"]):
        models[label], _ = reference_model(architecture, "multi_object", model_seed, default_cache(), print)
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
    started = time.perf_counter()
    for method, keep in [(m, keep) for m, keep in (("MAS", True), ("stitching", False)) if m in methods]:
        print(f"{method} (mean of the cross-seed directions)")
        reports = sweep(lambda k, keep=keep: ModelAlignment(models, site, k, keep_complement=keep, seed=seed))
        table[method] = {k: _mean(r.iia, cross) for k, r in reports.items()}
        floors[method] = {k: _mean(r.floor, cross) for k, r in reports.items()}
    if "DAS" in methods:
        print("DAS (within each seed, mean of the two)")
        per_seed = {label: sweep(lambda k, label=label: ModelAlignment({label: models[label]}, site, k, seed=seed)) for label in "AB"}
        table["DAS"] = {k: _mean({l: r[k].iia[l] for l, r in per_seed.items()}, [("A", "A"), ("B", "B")]) for k in dims}
        floors["DAS"] = {k: _mean({l: r[k].floor[l] for l, r in per_seed.items()}, [("A", "A"), ("B", "B")]) for k in dims}
    print(f"done in {time.perf_counter() - started:.0f}s")
    out.mkdir(parents=True, exist_ok=True)
    document = {"subspace_dim": dims, "iia": table, "floor": floors, "steps": steps, "n_train": n_train, "site": site}
    (out / "iia_vs_k.json").write_text(json.dumps(document, indent=2))
    if set(methods) == {"MAS", "stitching", "DAS"}:  # the plot draws all three
        plot(document, out / "iia_vs_k.png")
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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="k_curve")
    parser.add_argument("--dims", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--train-pairs", type=int, default=6000)
    parser.add_argument("--methods", nargs="+", choices=["MAS", "stitching", "DAS"], default=["MAS", "stitching", "DAS"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    run(args.dims, args.steps, args.train_pairs, Path(args.out), methods=tuple(args.methods))


if __name__ == "__main__":
    main()
