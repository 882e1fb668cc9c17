"""How fast each parametrisation of the orthogonal alignment learns, on the demo's MAS fit.

The demo's setting (``masalign demo``: the two cached reference GRUs on
Multi-Object, ``count`` at ``rnn.h_l0``, all four directions, k = 16, batch 128,
10,000 training pairs, 500 validation pairs) trained for ``--steps`` steps with
each parametrisation of :class:`masalign.alignment.OrthogonalAlignment` (QR
retraction, Householder reflections, Cayley transform) at each learning rate in
``--lrs``. Printed side by side: mean validation IIA over the four directions
at chosen steps, the steps and the training seconds (validations not counted)
to reach 0.95 of the run's best, and the time per step. ``--json PATH`` writes
the curves. The DAS race (``bench_das_pyvene.py``) compares the same
parametrisations on a GPT-2.

Run: ``python benchmarks/bench_parametrizations.py [--steps 300] [--lrs 5e-3 1e-3] [--json PATH]``
(the GRUs are trained and cached on first use, as the demo does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from bench_mas import cpu_name

from masalign import ModelAlignment, fit
from masalign.models import DEMO_SITES, default_cache, reference_model
from masalign.tasks import get_task

PARAMETRIZATIONS = ("qr", "householder", "cayley")
FRACTION = 0.95


def curve(result: Any) -> list[tuple[int, float, float]]:
    """(step, mean validation IIA over directions, training seconds) per validation."""
    points = []
    for entry in result.history:
        values = [v for matrix in entry["valid_accuracy"].values() for row in matrix.values() for v in row.values()]
        points.append((entry["step"], sum(values) / len(values), entry["train_seconds"]))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-3, 1e-3], help="5e-3 is the demo's, 1e-3 fit's default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    task = get_task("multi_object")
    models = {f"gru_seed{seed}": reference_model("gru", "multi_object", seed, default_cache())[0] for seed in (0, 1)}
    sites = {name: DEMO_SITES["gru"] for name in models}
    train = task.counterfactual_pairs(10_000, seed=1)
    valid = task.counterfactual_pairs(500, seed=2)
    print(f"demo setting: {list(models)} at {DEMO_SITES['gru']}, k 16, batch 128, {args.steps} steps, {args.threads} threads")

    runs: dict[str, dict[str, Any]] = {}
    marks = [s for s in (25, 50, 100, 200, 300, 500, 1000) if s <= args.steps]
    print(f"  {'':26s} " + " ".join(f"{'IIA@' + str(s):>8s}" for s in marks) + f" {'best':>6s} {'to 0.95 of best':>18s} {'ms/step':>8s}")
    for lr in args.lrs:
        for parametrization in PARAMETRIZATIONS:
            alignment = ModelAlignment(models, sites, 16, seed=0, alignment_options={"parametrization": parametrization})
            result = fit(
                alignment, train, valid, steps=args.steps, batch_size=128, lr=lr, eval_every=args.eval_every,
                patience=10**9, target_accuracy=2.0, progress=False,
            )  # fmt: skip
            points = curve(result)
            best = max(iia for _, iia, _ in points)
            step, _, seconds = next(p for p in points if p[1] >= FRACTION * best)
            ms = 1000 * (points[-1][2] - points[0][2]) / points[-1][0]
            at = {s: next(iia for st, iia, _ in points if st >= s) for s in marks}
            name = f"{parametrization} lr {lr:g}"
            runs[name] = {"curve": points, "best": best, "steps_to_fraction": step, "seconds_to_fraction": seconds, "ms_per_step": ms}
            print(
                f"  {name:26s} " + " ".join(f"{at[s]:8.3f}" for s in marks)
                + f" {best:6.3f} {step:6d} steps {seconds:5.1f} s {ms:8.1f}",
                flush=True,
            )  # fmt: skip
    if args.json:
        machine = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
        settings = {"steps": args.steps, "eval_every": args.eval_every, "lrs": args.lrs, "threads": args.threads}
        Path(args.json).write_text(json.dumps({"settings": settings, "machine": machine, "runs": runs}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
