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

from masalign import ModelAlignment, evaluate, fit
from masalign.cli import PAIRS, SITES, default_cache, reference_model
from masalign.tasks import get_task


def run(dims: list[int], steps: int, n_train: int, out: Path, seed: int = 0) -> dict:
    task = get_task("multi_object")
    models = {}
    for label, (architecture, model_seed) in zip("AB", PAIRS["gru-gru"]):
        models[label], _ = reference_model(architecture, "multi_object", model_seed, default_cache(), print)
    train = task.counterfactual_pairs(n_train, seed=seed + 1)
    valid = task.counterfactual_pairs(400, seed=seed + 2)
    test = task.counterfactual_pairs(1500, seed=seed + 3)
    site = SITES["gru"]
    table: dict[str, dict[int, float]] = {"MAS": {}, "DAS": {}, "stitching": {}}
    floors: dict[str, dict[int, float]] = {"MAS": {}, "DAS": {}, "stitching": {}}
    options = dict(steps=steps, lr=5e-3, eval_every=50, seed=seed, progress=False)
    for k in dims:
        started = time.perf_counter()
        for method, keep in (("MAS", True), ("stitching", False)):
            alignment = ModelAlignment(models, site, k, keep_complement=keep, seed=seed)
            fit(alignment, train, valid, **options)
            report = evaluate(alignment, test, directions=[("A", "B"), ("B", "A")])
            table[method][k] = (report.iia["A"]["B"] + report.iia["B"]["A"]) / 2
            floors[method][k] = (report.floor["A"]["B"] + report.floor["B"]["A"]) / 2
        das, das_floor = [], []
        for label in "AB":
            alignment = ModelAlignment({label: models[label]}, site, k, seed=seed)
            fit(alignment, train, valid, **options)
            report = evaluate(alignment, test)
            das.append(report.iia[label][label])
            das_floor.append(report.floor[label][label])
        table["DAS"][k], floors["DAS"][k] = sum(das) / 2, sum(das_floor) / 2
        print(f"k={k:>2}: MAS {table['MAS'][k]:.3f}  DAS {table['DAS'][k]:.3f}  stitching {table['stitching'][k]:.3f}  "
              f"({time.perf_counter() - started:.0f}s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    document = {"subspace_dims": dims, "iia": table, "floor": floors, "steps": steps, "n_train": n_train, "site": site}
    (out / "iia_vs_k.json").write_text(json.dumps(document, indent=2))
    plot(document, out / "iia_vs_k.png")
    return document


def plot(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(5.5, 3.8))
    dims = document["subspace_dims"]
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
    args = parser.parse_args()
    torch.set_num_threads(2)
    run(args.dims, args.steps, args.train_pairs, Path(args.out))


if __name__ == "__main__":
    main()
