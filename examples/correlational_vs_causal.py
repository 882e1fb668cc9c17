"""Correlational similarity (RSA, CKA, Procrustes, NBS, ridge, DSA) beside MAS IIA.

Three models trained on Multi-Object: GRU seed 0, GRU seed 1, and a 2-layer
transformer (TransformerLens). For each pair: the correlational measures on the
same activations (held-out task sequences, every position that carries a count),
DSA on the models' trajectories, and MAS IIA on `count` after a fit. Where do
RSA/CKA call two models similar while MAS says they do not share the variable,
or the reverse?

Run: .venv/bin/python examples/correlational_vs_causal.py --out comparison   (about 20 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from masalign import ModelAlignment, evaluate, fit
from masalign.models import DEMO_SITES, default_cache, reference_model
from masalign.compare import side_by_side
from masalign.similarity import DSA
from masalign.tasks import get_task

MODELS = {"gru_seed0": ("gru", 0), "gru_seed1": ("gru", 1), "transformer_seed1": ("transformer", 1)}


def count_positions(task, inputs: torch.Tensor) -> torch.Tensor:
    """(N, 1) one random count-carrying position per sequence (seeded)."""
    generator = torch.Generator().manual_seed(0)
    positions = []
    for row in inputs.tolist():
        valid = [i for i, state in enumerate(task.states(row)) if state is not None]
        positions.append([valid[int(torch.randint(len(valid), (1,), generator=generator))]])
    return torch.tensor(positions)


def run(out: Path, steps: int = 600, subspace_dim: int = 16) -> list[dict]:
    task = get_task("multi_object")
    adapters, sites = {}, {}
    for name, (architecture, seed) in MODELS.items():
        adapters[name], _ = reference_model(architecture, "multi_object", seed, default_cache(), print)
        sites[name] = DEMO_SITES[architecture]
    natural = task.sample(2000, seed=21, split="all")
    positions = count_positions(task, natural.inputs)
    trajectories = task.sample(200, seed=22, split=list(range(12, 21)))
    trajectory_positions = torch.arange(27).repeat(200, 1)  # every step of the shortest (n = 12) sequence
    train = task.counterfactual_pairs(8000, seed=1)
    valid = task.counterfactual_pairs(400, seed=2)
    test = task.counterfactual_pairs(1500, seed=3)
    rows = []
    for a, b in itertools.combinations(MODELS, 2):
        alignment = ModelAlignment({a: adapters[a], b: adapters[b]}, {a: sites[a], b: sites[b]}, subspace_dim)
        fit(alignment, train, valid, steps=steps, lr=5e-3, progress=False)
        report = evaluate(alignment, test)
        comparison = side_by_side(
            adapters[a], sites[a], adapters[b], sites[b], natural.inputs, positions, iia=report, names=(a, b),
            dsa=DSA(n_delays=5, rank=20, score_method="angular"), trajectory_inputs=trajectories.inputs,
            trajectory_positions=trajectory_positions,
        )
        row = comparison.row()
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(rows, indent=2))
    keys = ["rsa_spearman", "cka_linear", "cka_debiased", "procrustes_angular", "nbs", "ridge_r2_xy", "ridge_r2_yx", "dsa_angular", "mas_cross_iia_mean"]
    print("| pair | " + " | ".join(keys) + " |")
    print("|" + " --- |" * (len(keys) + 1))
    for row in rows:
        print(f"| {row['pair']} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="comparison")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(2)
    run(Path(args.out), args.steps)


if __name__ == "__main__":
    main()
