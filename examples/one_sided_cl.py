"""One-sided alignment with the counterfactual latent (CL) loss (docs/method.md section 5).

Model B can only be recorded, not intervened on behaviourally (think: a brain, or
an API model whose outputs we cannot read under intervention). Training uses the
behavioural loss on (B->A) and (A->A), the CL loss on (A->B) and (B->B), and then
evaluates IIA on A->B, which was never trained behaviourally. The same run without
the CL loss shows what it adds.

Run: .venv/bin/python examples/one_sided_cl.py [--pair gru-gru|gru-transformer] [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from masalign import ModelAlignment, evaluate, fit
from masalign.models import DEMO_PAIRS, DEMO_SITES, default_cache, reference_model
from masalign.tasks import get_task
from masalign.train import LatentObjective


def run(pair: str = "gru-gru", steps: int = 600, subspace_dim: int = 16, n_train: int = 6000, seed: int = 0, quiet: bool = False) -> dict:
    log = (lambda *a: None) if quiet else print
    task = get_task("multi_object")
    models, sites = {}, {}
    for label, (architecture, model_seed) in zip("AB", DEMO_PAIRS[pair]):
        models[label], _ = reference_model(architecture, "multi_object", model_seed, default_cache(), log)
        sites[label] = DEMO_SITES[architecture]
    train = task.counterfactual_pairs(n_train, seed=seed + 1)
    valid = task.counterfactual_pairs(400, seed=seed + 2)
    test = task.counterfactual_pairs(1500, seed=seed + 3)
    targets = task.latent_targets(train, seed=seed)
    log(f"counterfactual latents: {targets.n_found} of {len(targets)} pairs have a natural match ({targets.n_missing} masked)")

    results = {}
    for with_cl in (False, True):
        alignment = ModelAlignment(models, sites, subspace_dim, seed=seed)
        objective = LatentObjective([("A", "B"), ("B", "B")], targets, train.source_inputs) if with_cl else None
        started = time.perf_counter()
        fit_result = fit(
            alignment, train, valid, directions=[("B", "A"), ("A", "A")], steps=steps, lr=5e-3,
            target_accuracy=1.01, latent_objective=objective, seed=seed, progress=not quiet,
        )
        report = evaluate(alignment, test, directions=[("A", "B"), ("B", "A"), ("A", "A")])
        name = "with_cl" if with_cl else "without_cl"
        results[name] = {
            "iia_A_to_B": report.iia["A"]["B"],
            "floor_A_to_B": report.floor["A"]["B"],
            "iia_B_to_A": report.iia["B"]["A"],
            "iia_A_to_A": report.iia["A"]["A"],
            "latent_diagnostics": fit_result.latent_diagnostics,
            "seconds": time.perf_counter() - started,
        }
        log(f"{name}: IIA A->B {report.iia['A']['B']:.3f} (floor {report.floor['A']['B']:.3f}); "
            f"trained directions B->A {report.iia['B']['A']:.3f}, A->A {report.iia['A']['A']:.3f}")
        if fit_result.latent_diagnostics:
            log(f"  CL diagnostics: {json.dumps(fit_result.latent_diagnostics)}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pair", default="gru-gru", choices=sorted(DEMO_PAIRS))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = run(args.pair, args.steps)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
