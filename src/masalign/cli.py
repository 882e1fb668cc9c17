"""Command line: ``masalign demo`` (the main job) and ``masalign --help``.

The demo trains (or reuses cached copies of) two models with different seeds on
Multi-Object (two GRUs by default, or a GRU and a transformer with
``--pair gru-transformer``), runs MAS on ``count`` at the hidden state in all four directions,
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

from .adapters import ModelAdapter, TorchModuleAdapter
from .evaluate import evaluate
from .mas import ModelAlignment
from .models import RecurrentConfig, TransformerConfig, load_model, save_model, train_lm
from .tasks import get_task
from .train import fit


def default_cache() -> Path:
    return Path(os.environ.get("MASALIGN_CACHE", Path.home() / ".cache" / "masalign"))


PAIRS = {
    # name: ((architecture, seed), (architecture, seed))
    "gru-gru": (("gru", 0), ("gru", 1)),
    "gru-transformer": (("gru", 0), ("transformer", 1)),
}
SITES = {"gru": "rnn.h_l0", "transformer": "blocks.0.hook_resid_post"}


def reference_model(architecture: str, task_name: str, seed: int, cache: Path, log) -> tuple[ModelAdapter, dict]:
    """A reference model trained on ``task_name`` with ``seed``, from the cache when it is there."""
    config = RecurrentConfig("gru", hidden_size=128, embedding_size=128) if architecture == "gru" else TransformerConfig()
    folder = cache / f"{task_name}-{architecture}128-seed{seed}"
    if (folder / "model.safetensors").exists():
        log(f"  reusing {folder}")
        model, info = load_model(folder), {"cached": True, "folder": str(folder)}
    else:
        log(f"  training {architecture} seed {seed} on {task_name} ...")
        model, summary = train_lm(get_task(task_name), config, seed=seed)
        save_model(model, folder)
        log(f"  done in {summary.seconds:.0f}s ({summary.steps} steps, held-out accuracy {summary.check_trial_accuracy:.3f}); saved to {folder}")
        info = {"cached": False, "folder": str(folder), "training_seconds": summary.seconds, "training_steps": summary.steps}
    name = f"{architecture}_seed{seed}"
    if architecture == "gru":
        return TorchModuleAdapter(model, name=name), info
    from .adapters.transformer_lens import TransformerLensAdapter

    return TransformerLensAdapter(model, name=name), info


def run_demo(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = print if not args.quiet else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    task = get_task(args.task)
    started = time.perf_counter()
    times: dict[str, float] = {}

    log(f"[1/4] reference models ({args.pair} on {args.task})")
    models, model_info, sites = {}, {}, {}
    for architecture, seed in PAIRS[args.pair]:
        adapter, info = reference_model(architecture, args.task, seed, Path(args.cache), log)
        name = f"{architecture}_seed{seed}"
        models[name], model_info[name] = adapter, info
        sites[name] = args.transformer_site if architecture == "transformer" else SITES[architecture]
    names = list(models)
    times["models"] = time.perf_counter() - started

    log("[2/4] counterfactual pairs for 'count'")
    train = task.counterfactual_pairs(args.train_pairs, seed=args.seed + 1)
    valid = task.counterfactual_pairs(args.valid_pairs, seed=args.seed + 2)
    test = task.counterfactual_pairs(args.test_pairs, seed=args.seed + 3)
    ceiling_data = task.sample(args.test_pairs, seed=args.seed + 4, split="held_out")

    log(f"[3/4] MAS at {sites}, k = {args.subspace_dim}, all four directions")
    t0 = time.perf_counter()
    alignment = ModelAlignment(models, sites, args.subspace_dim, seed=args.seed)
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
        "pair": args.pair,
        "sites": sites,
        "variable": "count",
        "models": names,
        "seeds": {"models": {f"{a}_seed{s}": s for a, s in PAIRS[args.pair]}, "alignment": args.seed},
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
    demo.add_argument("--pair", default="gru-gru", choices=sorted(PAIRS), help="which two models to align (seeds 0 and 1)")
    demo.add_argument("--transformer-site", default=SITES["transformer"], help="the transformer's site for --pair gru-transformer")
    demo.add_argument("--subspace-dim", type=int, default=16)
    demo.add_argument("--steps", type=int, default=1000, help="most training steps (early stopping may end sooner)")
    demo.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (the reference uses 1e-3 with more steps)")
    demo.add_argument("--batch-size", type=int, default=128)
    demo.add_argument("--eval-every", type=int, default=50)
    demo.add_argument("--train-pairs", type=int, default=10000)
    demo.add_argument("--valid-pairs", type=int, default=500)
    demo.add_argument("--test-pairs", type=int, default=2000)
    demo.add_argument("--seed", type=int, default=0, help="seed of the alignment and the pairs")
    demo.add_argument("--cache", default=str(default_cache()), help="where trained reference models are kept")
    demo.add_argument("--quiet", action="store_true")
    convert = commands.add_parser("convert-gguf", help="convert a GGUF file, or smollm2-135m / gemma3-270m, to a Hugging Face folder")
    convert.add_argument("model", metavar="GGUF_OR_NAME", help="a .gguf file, or a pretrained model's name (masalign.pretrained.PRETRAINED)")
    convert.add_argument("--out", default=None, help="the folder to write (default: under $MASALIGN_CACHE)")
    convert.add_argument("--overwrite", action="store_true", help="convert again, replacing what is in the folder")
    args = parser.parse_args(argv)
    if args.command == "convert-gguf":
        from .pretrained import convert_gguf_command

        return convert_gguf_command(args.model, args.out, args.overwrite)
    if args.command == "demo":
        run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
