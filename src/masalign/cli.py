"""Command line: ``masalign demo`` (the main job) and ``masalign --help``.

The demo trains (or reuses cached copies of) two GRUs with different seeds on
Multi-Object, runs MAS on ``count`` at the hidden state in all four directions,
prints the IIA matrix with ceiling and floor, and writes ``report.json`` and
``iia.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .adapters import TorchModuleAdapter
from .evaluate import evaluate
from .mas import ModelAlignment
from .models import RecurrentConfig, load_recurrent_lm, save_recurrent_lm, train_recurrent_lm
from .tasks import get_task
from .train import fit


def default_cache() -> Path:
    return Path(os.environ.get("MASALIGN_CACHE", Path.home() / ".cache" / "masalign"))


def reference_gru(task_name: str, seed: int, cache: Path, log) -> tuple[torch.nn.Module, dict]:
    """A GRU trained on ``task_name`` with ``seed``, from the cache when it is there."""
    config = RecurrentConfig("gru", hidden_size=128, embedding_size=128)
    folder = cache / f"{task_name}-gru{config.hidden_size}-seed{seed}"
    if (folder / "model.safetensors").exists():
        log(f"  reusing {folder}")
        return load_recurrent_lm(folder), {"cached": True, "folder": str(folder)}
    log(f"  training GRU seed {seed} on {task_name} ...")
    model, summary = train_recurrent_lm(get_task(task_name), config, seed=seed)
    save_recurrent_lm(model, folder)
    log(f"  done in {summary.seconds:.0f}s ({summary.steps} steps, held-out accuracy {summary.held_out_trial_accuracy:.3f}); saved to {folder}")
    return model, {"cached": False, "folder": str(folder), "training_seconds": summary.seconds, "training_steps": summary.steps}


def run_demo(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = print if not args.quiet else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    task = get_task(args.task)
    started = time.perf_counter()
    times: dict[str, float] = {}

    log(f"[1/4] reference models ({args.task}, seeds {args.seeds[0]} and {args.seeds[1]})")
    names = [f"gru_seed{s}" for s in args.seeds]
    models, model_info = {}, {}
    for name, seed in zip(names, args.seeds):
        model, info = reference_gru(args.task, seed, Path(args.cache), log)
        models[name] = TorchModuleAdapter(model, name=name)
        model_info[name] = info
    times["models"] = time.perf_counter() - started

    log("[2/4] counterfactual pairs for 'count'")
    train = task.counterfactual_pairs(args.train_pairs, seed=args.seed + 1)
    valid = task.counterfactual_pairs(args.valid_pairs, seed=args.seed + 2)
    test = task.counterfactual_pairs(args.test_pairs, seed=args.seed + 3)
    ceiling_data = task.sample(args.test_pairs, seed=args.seed + 4, split="held_out")

    log(f"[3/4] MAS at rnn.h_l0, k = {args.subspace_dim}, all four directions")
    t0 = time.perf_counter()
    alignment = ModelAlignment(models, "rnn.h_l0", args.subspace_dim, seed=args.seed)
    result = fit(
        alignment, train, valid, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        eval_every=args.eval_every, seed=args.seed, progress=not args.quiet,
    )
    times["fit"] = time.perf_counter() - t0
    log(f"  stopped after {result.steps} steps ({result.stop_reason}) in {times['fit']:.0f}s; best at step {result.best_step}")

    log("[4/4] evaluation on held-out pairs")
    t0 = time.perf_counter()
    report = evaluate(alignment, test, ceiling_data=ceiling_data)
    times["evaluate"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - started

    alignment.save(out / "alignment")
    report.plot(out / "iia.png")
    document = {
        "task": args.task,
        "site": "rnn.h_l0",
        "variable": "count",
        "models": names,
        "seeds": {"models": dict(zip(names, args.seeds)), "alignment": args.seed},
        "subspace_dim": args.subspace_dim,
        "iia": report.iia,
        "iia_token": report.iia_token,
        "ceiling": report.ceiling,
        "floor": report.floor,
        "floor_token": report.floor_token,
        "n_test_pairs": report.n_pairs,
        "fit": result.summary(),
        "wall_seconds": times,
        "model_info": model_info,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "report.json").write_text(json.dumps(document, indent=2))
    log("")
    log(report.table())
    log(f"\nwrote {out / 'report.json'}, {out / 'iia.png'} and {out / 'alignment'}/ in {times['total']:.0f}s")
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="masalign", description="Model Alignment Search")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="align two GRU seeds on the numeric task and report IIA")
    demo.add_argument("--out", default="demo_out", help="folder for report.json, iia.png and the alignment")
    demo.add_argument("--task", default="multi_object", choices=["multi_object", "single_object", "same_object"])
    demo.add_argument("--seeds", type=int, nargs=2, default=[0, 1], help="seeds of the two models")
    demo.add_argument("--subspace-dim", type=int, default=16)
    demo.add_argument("--steps", type=int, default=1500, help="most training steps (early stopping may end sooner)")
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.add_argument("--batch-size", type=int, default=128)
    demo.add_argument("--eval-every", type=int, default=50)
    demo.add_argument("--train-pairs", type=int, default=10000)
    demo.add_argument("--valid-pairs", type=int, default=500)
    demo.add_argument("--test-pairs", type=int, default=2000)
    demo.add_argument("--seed", type=int, default=0, help="seed of the alignment and the pairs")
    demo.add_argument("--cache", default=str(default_cache()), help="where trained reference models are kept")
    demo.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
