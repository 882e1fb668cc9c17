"""Three models in one alignment (MAS: n maps, n x n directions) against pairwise stitching (a map pair per direction).

A GRU, an LSTM (site ``[h; c]``) and a transformer (residual stream after block 0)
learn the counting task. MAS fits one rotation per model, 3 in all, on all 9
directions at once; pairwise stitching fits a separate alignment for each of the
6 cross directions (two maps each, 12 in all, the target's complement zeroed:
``keep_complement=False``). Both see the same pairs, steps and k; the IIA of
every cross direction (with its floor) and the wall time of each approach are
printed side by side, and ``--json PATH`` writes them.

Run: ``python examples/many_models.py [--full] [--steps N] [--protocol single|stepwise] [--json PATH]``.
The default trains three small models on counts 1..8 (about a minute);
``--full`` uses the demo's reference models on Multi-Object (trained once, then
cached under ``MASALIGN_CACHE``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from masalign import ActivationMemo, ModelAlignment, TorchModuleAdapter, TransformerLensAdapter, evaluate, fit
from masalign.models import DEMO_SITES, RecurrentConfig, TransformerConfig, reference_model, train_lm
from masalign.tasks import D0, D1, D2, NumericTask, get_task

ARCHITECTURES = ("gru", "lstm", "transformer")


def small_models(task: NumericTask, seed: int = 0) -> dict:
    """Three small models trained on ``task`` (each stops at 0.99 accuracy on its check split)."""
    configs = {
        "gru": (RecurrentConfig("gru", hidden_size=48, embedding_size=32), "held_out"),
        "lstm": (RecurrentConfig("lstm", hidden_size=24, embedding_size=32), "held_out"),  # [h; c] is 48 wide
        "transformer": (TransformerConfig(d_model=48, n_layers=1, n_ctx=64), "train"),  # checked on the training counts
    }
    adapters, accuracy = {}, {}
    for name, (config, split) in configs.items():
        model, summary = train_lm(task, config, seed=seed, steps=1500, lr=5e-3 if name != "transformer" else 3e-3,
                                  check_every=50, check_split=split)
        accuracy[name] = summary.check_trial_accuracy
        adapter_class = TransformerLensAdapter if name == "transformer" else TorchModuleAdapter
        adapters[name] = adapter_class(model, name=name)
    return adapters, accuracy


def run(full: bool, steps: int, subspace_dim: int, seed: int = 0, protocol: str = "single", transformer_site: str | None = None) -> dict:
    torch.manual_seed(seed)
    if full:
        task = get_task("multi_object")
        adapters = {name: reference_model(name, task.name, seed)[0] for name in ARCHITECTURES}
        accuracy = {}
    else:
        task = NumericTask("multi_object_small", (D0, D1, D2), max_count=8, held_out_counts=(3, 6))
        adapters, accuracy = small_models(task, seed)
    sites = {name: DEMO_SITES[name] for name in ARCHITECTURES}
    if transformer_site is not None:
        sites["transformer"] = transformer_site
    n_train, n_test = (10_000, 2_000) if full else (3_000, 500)
    train, valid, test = (
        task.counterfactual_pairs(n, seed=seed + s, protocol=protocol) for n, s in ((n_train, 1), (300, 2), (n_test, 3))
    )
    options = dict(steps=steps, batch_size=128, lr=5e-3, eval_every=50, seed=seed, progress=False)
    cross = [(s, t) for s, t in itertools.permutations(ARCHITECTURES, 2)]

    started = time.perf_counter()
    memo = ActivationMemo()
    mas = ModelAlignment(adapters, sites, subspace_dim, seed=seed)
    fit(mas, train, valid, memo=memo, **options)
    mas_report = evaluate(mas, test, memo=memo)
    mas_seconds = time.perf_counter() - started

    started = time.perf_counter()
    memo = ActivationMemo()
    stitched = {}
    for source, target in cross:
        pair = {source: adapters[source], target: adapters[target]}
        alignment = ModelAlignment(pair, {m: sites[m] for m in pair}, subspace_dim, keep_complement=False, seed=seed)
        fit(alignment, train, valid, directions=[(source, target)], memo=memo, **options)
        report = evaluate(alignment, test, directions=[(source, target)], memo=memo)
        stitched[f"{source}->{target}"] = {"iia": report.iia[source][target], "floor": report.floor[source][target]}
    stitch_seconds = time.perf_counter() - started

    rows = {
        f"{s}->{t}": {
            "mas": mas_report.iia[s][t], "mas_floor": mas_report.floor[s][t],
            "stitching": stitched[f"{s}->{t}"]["iia"], "stitching_floor": stitched[f"{s}->{t}"]["floor"],
        }
        for s, t in cross
    }
    return {
        "task": task.name, "full": full, "protocol": protocol, "steps": steps, "subspace_dim": subspace_dim, "sites": sites,
        "model_accuracy": accuracy, "das": {m: mas_report.iia[m][m] for m in ARCHITECTURES},
        "cross": rows, "maps": {"mas": len(ARCHITECTURES), "stitching": 2 * len(cross)},
        "wall_seconds": {"mas": mas_seconds, "stitching": stitch_seconds},
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the demo's reference models on Multi-Object")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--subspace-dim", type=int, default=16)
    parser.add_argument("--protocol", default="single", choices=("single", "stepwise"),
                        help="intervene at one position, or on the whole prefix up to it (the reference's transformer protocol)")
    parser.add_argument("--transformer-site", default=None,
                        help=f"the transformer's site (default {DEMO_SITES['transformer']}; hook_embed is where a prefix's count transfers)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    result = run(args.full, args.steps, args.subspace_dim, protocol=args.protocol, transformer_site=args.transformer_site)
    if result["model_accuracy"]:
        print("model accuracy (check split):", {m: round(a, 3) for m, a in result["model_accuracy"].items()})
    print("DAS within each model (MAS diagonal): " + ", ".join(f"{m} {v:.3f}" for m, v in result["das"].items()))
    print(f"{'direction':<22}{'MAS (3 maps)':>16}{'stitching (12 maps)':>24}")
    for direction, row in result["cross"].items():
        print(f"{direction:<22}{row['mas']:>8.3f} ({row['mas_floor']:.3f}){row['stitching']:>14.3f} ({row['stitching_floor']:.3f})")
    seconds = result["wall_seconds"]
    print(f"wall time: MAS {seconds['mas']:.0f} s (one fit, 9 directions), stitching {seconds['stitching']:.0f} s "
          f"(6 fits); {result['steps']} steps each, k = {result['subspace_dim']}, {result['threads']} threads")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
