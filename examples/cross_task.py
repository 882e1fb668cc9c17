"""The papers' cross-task comparison: the count of Multi-Object against the value of Arithmetic.

Two GRUs (width 128) trained on different tasks: the demo's Multi-Object GRU (seed 0)
and one trained here on Arithmetic (``B n v0 op1 a1 = v1 , ... E``, a running value
0..20; cached beside the demo's models). MAS aligns the Multi-Object GRU's hidden
state, variable ``count``, with the Arithmetic GRU's, variable ``value``: each model
reads its own task's sequences, and pair ``i`` of both views writes the same number
(:func:`masalign.cross_task.cross_task_pairs`). One position per pair, k = 16,
10,000 training and 2,000 test pairs; IIA in all four directions with floors, and
each model's ceiling on its own task.

Run: ``python examples/cross_task.py --json examples/results/cross_task.json``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from masalign import ModelAlignment, evaluate, fit
from masalign.adapters import TorchModuleAdapter
from masalign.arithmetic import ArithmeticTask
from masalign.cross_task import cross_task_pairs
from masalign.models import RecurrentConfig, default_cache, load_model, reference_model, save_model, train_lm
from masalign.tasks import get_task


def arithmetic_gru(seed: int, steps: int) -> tuple[TorchModuleAdapter, dict]:
    task = ArithmeticTask()
    folder = default_cache() / f"arithmetic-gru128-seed{seed}"
    if folder.exists():
        print(f"  reusing {folder}")
        return TorchModuleAdapter(load_model(folder), name="arithmetic_gru"), {"cached": True, "folder": str(folder)}
    print(f"  training a GRU on Arithmetic, seed {seed} ({steps} steps at most) ...")
    config = RecurrentConfig("gru", hidden_size=128, embedding_size=128, vocab_size=task.vocab_size)
    model, summary = train_lm(task, config, seed=seed, steps=steps, lr=3e-3, target_accuracy=0.99, check_every=250,
                              checkpoint=folder.parent / f"{folder.name}.training", log=print)
    save_model(model, folder)
    return TorchModuleAdapter(model, name="arithmetic_gru"), {
        "cached": False, "folder": str(folder), "training_seconds": summary.seconds, "training_steps": summary.steps,
        "trial_accuracy": summary.check_trial_accuracy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="MAS steps at most")
    parser.add_argument("--model-steps", type=int, default=6000, help="the Arithmetic GRU's training steps at most")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    counting, arithmetic = get_task("multi_object"), ArithmeticTask()
    counter, counter_info = reference_model("gru", "multi_object", 0)
    adder, adder_info = arithmetic_gru(0, args.model_steps)
    models = {"multi_object_gru": counter, "arithmetic_gru": adder}
    tasks = {"multi_object_gru": counting, "arithmetic_gru": arithmetic}
    train, valid, test = (cross_task_pairs(tasks, n, seed=seed) for n, seed in ((10_000, 1), (500, 2), (2000, 3)))
    ceiling = {"multi_object_gru": counting.sample(2000, seed=4, split="held_out"), "arithmetic_gru": arithmetic.sample(2000, seed=4)}
    torch.manual_seed(0)
    started = time.perf_counter()
    variable = next(iter(train.values())).variable
    alignment = ModelAlignment(models, "rnn.h_l0", {variable: 16}, seed=0)
    result = fit(alignment, train, valid, steps=args.steps, lr=5e-3, batch_size=128, eval_every=50, progress=False)
    report = evaluate(alignment, test, ceiling_data=ceiling)
    seconds = time.perf_counter() - started
    print(f"{result.steps} steps, best at {result.best_step}, {seconds:.0f} s")
    print(report.table())
    if args.json is not None:
        args.json.write_text(json.dumps({
            "variable": variable, "site": "rnn.h_l0", "k": 16, "steps": args.steps, "lr": 5e-3, **report.matrices(),
            "fit": result.summary(), "seconds": seconds, "model_info": {"multi_object_gru": counter_info, "arithmetic_gru": adder_info},
            "threads": torch.get_num_threads(),
        }, indent=2))


if __name__ == "__main__":
    main()
