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

from . import storage
from .evaluate import IIAReport, evaluate
from .mas import ModelAlignment
from .models import DEMO_PAIRS, DEMO_SITES, default_cache, reference_model
from .tasks import TASKS, get_task
from .train import fit


OUTPUTS = ("report.json", "iia.png", "alignment")


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse, before minutes of training, an ``--out`` that is a file or already holds results."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"masalign demo: --out {out} is a file, not a folder; choose a folder path")
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise SystemExit(
            f"masalign demo: {out} already holds {', '.join(existing)} from an earlier run; pass --overwrite to "
            "replace them, or choose another --out"
        )
    check_writable(out, "--out")


def check_writable(folder: Path, what: str) -> None:
    try:
        storage.check_writable(folder)
    except OSError as error:
        raise SystemExit(f"masalign demo: {what}: {error}; choose a writable folder") from None


def write_text_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def run_demo(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    check_output_folder(out, args.overwrite)
    check_writable(Path(args.cache), "--cache")
    log = print if not args.quiet else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    check_device(args.device)
    if args.pair == PRETRAINED_PAIR:
        from .pretrained_demo import plot_layer_sweep, run_pretrained_demo

        document, alignment, report, _ = run_pretrained_demo(args, log)
        plot_layer_sweep(document, out / "layer_sweep.png")
        return write_results(out, document, alignment, report, args, log)
    return write_results(out, *run_numeric_demo(args, log), args, log)


def check_device(device: str) -> torch.device:
    """``--device`` as a torch device, or a clear error before any work is done."""
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise SystemExit(f"--device {device!r} is not a device torch knows ({error}); use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return parsed


def alignment_options(args: argparse.Namespace) -> dict:
    """The orthogonal map's options from the demo's flags."""
    return {"parametrization": getattr(args, "parametrization", "householder")}


def run_numeric_demo(args: argparse.Namespace, log) -> tuple[dict, ModelAlignment, IIAReport]:
    """The reference models of the numeric task (two GRU seeds, or a GRU and a transformer)."""
    task = get_task(args.task)
    started = time.perf_counter()
    times: dict[str, float] = {}

    protocol = args.protocol or DEMO_PROTOCOLS[args.pair]
    log(f"[1/4] reference models ({args.pair} on {args.task})")
    models, model_info, sites = {}, {}, {}
    for architecture, seed in DEMO_PAIRS[args.pair]:
        adapter, info = reference_model(architecture, args.task, seed, Path(args.cache), log)
        adapter.model.to(args.device)  # the adapters follow their model's device
        name = f"{architecture}_seed{seed}"
        models[name], model_info[name] = adapter, info
        sites[name] = (args.transformer_site or DEMO_TRANSFORMER_SITES[protocol]) if architecture == "transformer" else DEMO_SITES[architecture]
    names = list(models)
    times["models"] = time.perf_counter() - started

    log("[2/4] counterfactual pairs for 'count'")
    train = task.counterfactual_pairs(args.train_pairs, seed=args.seed + 1, protocol=protocol)
    valid = task.counterfactual_pairs(args.valid_pairs, seed=args.seed + 2, protocol=protocol)
    test = task.counterfactual_pairs(args.test_pairs, seed=args.seed + 3, protocol=protocol)
    ceiling_data = task.sample(args.test_pairs, seed=args.seed + 4, split="held_out")

    log(f"[3/4] MAS at {sites}, {protocol} protocol, k = {args.subspace_dim}, all four directions")
    t0 = time.perf_counter()
    alignment = ModelAlignment(models, sites, args.subspace_dim, seed=args.seed, alignment_options=alignment_options(args))
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
    document = {
        "task": args.task,
        "pair": args.pair,
        "sites": sites,
        "variable": "count",
        "protocol": protocol,
        "models": names,
        "seeds": {"models": {f"{a}_seed{s}": s for a, s in DEMO_PAIRS[args.pair]}, "alignment": args.seed},
        "subspace_dim": args.subspace_dim,
        "parametrization": getattr(args, "parametrization", "householder"),
        **report.matrices(),
        "fit": result.summary(),
        "wall_seconds": times,
        "model_info": model_info,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device_description(args.device),
    }
    return document, alignment, report


def device_description(device: str) -> str:
    """``cpu``, or the GPU's name after the device (``cuda:0 (NVIDIA H100 80GB HBM3)``), for reports."""
    parsed = torch.device(device)
    if parsed.type != "cuda":
        return str(parsed)
    return f"{parsed} ({torch.cuda.get_device_name(parsed)})"


def write_results(out: Path, document: dict, alignment: ModelAlignment, report: IIAReport, args: argparse.Namespace, log) -> dict:
    """report.json, iia.png and the alignment into ``out``; each written whole or not at all."""
    alignment.save(out / "alignment", overwrite=args.overwrite)
    report.plot(out / "iia.png")
    write_text_atomically(out / "report.json", json.dumps(document, indent=2))
    log("")
    log(report.table())
    log(f"\nwrote {out / 'report.json'}, {out / 'iia.png'} and {out / 'alignment'}/ in {document['wall_seconds']['total']:.0f}s")
    return document


# The numeric pairs' interchange protocol: one position suits recurrent hidden states; a
# transformer's count at one position is not where its later positions read it, so the
# GRU-transformer pair intervenes on the whole prefix (the reference's protocol for
# transformers; examples/cross_architecture_grid.py measures both).
DEMO_PROTOCOLS = {"gru-gru": "single", "gru-lstm": "single", "gru-transformer": "stepwise"}
# The transformer's site per protocol: the count of a whole prefix transfers through the
# token embeddings (the reference: "transformers need the embedding layer, intervened
# stepwise"); one position's embedding holds no count, so one position uses the
# residual stream between the two blocks.
DEMO_TRANSFORMER_SITES = {"stepwise": "hook_embed", "single": DEMO_SITES["transformer"]}

# Settings of the pretrained-LM demo where they differ from the numeric demo's defaults.
PRETRAINED_PAIR = "pretrained-lm"
PRETRAINED_DEFAULTS = {
    "steps": 80, "train_pairs": 512, "valid_pairs": 48, "test_pairs": 160, "batch_size": 16, "eval_every": 20,
    "subspace_dim": 16, "lr": 1e-2,
}
NUMERIC_DEFAULTS = {
    "steps": 1000, "train_pairs": 10000, "valid_pairs": 500, "test_pairs": 2000, "batch_size": 128, "eval_every": 50,
    "subspace_dim": 16, "lr": 5e-3,
}


# Flags that only one kind of pair reads, and their defaults there: given to the other kind
# they would be ignored without a word, so they are refused.
PRETRAINED_ONLY = {
    "sweep_steps": 30, "layers_smollm2": None, "layers_gemma3": None, "lm_low": 10, "lm_high": 98, "lm_position": ["answer"],
}
NUMERIC_ONLY = {"task": "multi_object", "protocol": None, "transformer_site": None}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_pair_flags(args: argparse.Namespace) -> str | None:
    """What is wrong with a flag given for the other kind of pair, or ``None``."""
    pretrained = args.pair == PRETRAINED_PAIR
    foreign = NUMERIC_ONLY if pretrained else PRETRAINED_ONLY
    given = [flag(name) for name in foreign if getattr(args, name) is not None]
    if given:
        applies = "the numeric pairs" if pretrained else f"--pair {PRETRAINED_PAIR}"
        return f"{', '.join(given)} applies to {applies} only, not to --pair {args.pair}"
    if args.transformer_site is not None and args.pair != "gru-transformer":
        return f"--transformer-site applies to --pair gru-transformer only, not to --pair {args.pair}"
    return None


def apply_pair_defaults(args: argparse.Namespace) -> None:
    if args.pair == PRETRAINED_PAIR:
        defaults = {**PRETRAINED_DEFAULTS, **PRETRAINED_ONLY}
    else:
        defaults = {**NUMERIC_DEFAULTS, **NUMERIC_ONLY}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.layers = {"smollm2": args.layers_smollm2, "gemma3": args.layers_gemma3}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive; it must be at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="masalign", description="Model Alignment Search")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="align two GRU seeds on the numeric task and report IIA")
    demo.add_argument("--out", default="demo_out", help="folder for report.json, iia.png and the alignment")
    demo.add_argument("--task", default=None, choices=sorted(TASKS), help="numeric pairs: the task (default multi_object)")
    demo.add_argument(
        "--pair", default="gru-gru", choices=[*sorted(DEMO_PAIRS), PRETRAINED_PAIR],
        help="which two models to align: two GRU seeds, a GRU and a transformer, a GRU and an LSTM, or SmolLM2-135M and Gemma-3-270M",
    )
    demo.add_argument("--sweep-steps", type=positive_int, default=None, help="pretrained-lm: steps of each layer-sweep fit (default 30)")
    demo.add_argument("--layers-smollm2", type=int, nargs="+", default=None, help="pretrained-lm: SmolLM2 layers to sweep")
    demo.add_argument("--layers-gemma3", type=int, nargs="+", default=None, help="pretrained-lm: Gemma-3 layers to sweep")
    demo.add_argument("--lm-low", type=positive_int, default=None, help="pretrained-lm: smallest number in the counting runs (default 10)")
    demo.add_argument("--lm-high", type=positive_int, default=None, help="pretrained-lm: largest number in the counting runs (default 98)")
    demo.add_argument(
        "--lm-position", nargs="+", default=None, choices=["answer", "item_last", "item_first", "separator"],
        help="pretrained-lm: the token(s) intervened on in each tokenisation (masalign.lm_tasks anchors): every "
        "position that predicts an answer token (default; answers of one length, e.g. 10..98), the last number's last "
        "digit, its first digit, or the comma after it",
    )
    demo.add_argument(
        "--transformer-site", default=None,
        help=f"the transformer's site for --pair gru-transformer (default {DEMO_TRANSFORMER_SITES['stepwise']} stepwise, "
        f"{DEMO_TRANSFORMER_SITES['single']} with --protocol single)",
    )
    demo.add_argument(
        "--protocol", choices=["single", "stepwise"], default=None,
        help="numeric pairs: intervene at one position per sequence, or on the whole prefix up to it, in order "
        "(default: stepwise for gru-transformer, single otherwise)",
    )
    demo.add_argument("--subspace-dim", type=positive_int, default=None, help="k (default 16)")
    demo.add_argument(
        "--parametrization", choices=["householder", "qr", "cayley"], default="householder",
        help="how the orthogonal map's columns are trained (default householder; qr was the default before 0.2)",
    )
    demo.add_argument("--steps", type=positive_int, default=None, help="most training steps, early stopping may end sooner (default 1000; 80 for pretrained-lm)")
    demo.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 5e-3; 1e-2 for pretrained-lm; the reference uses 1e-3 with more steps)")
    demo.add_argument("--batch-size", type=positive_int, default=None, help="default 128 (smaller for pretrained-lm)")
    demo.add_argument("--eval-every", type=positive_int, default=None, help="default 50 (smaller for pretrained-lm)")
    demo.add_argument("--train-pairs", type=positive_int, default=None, help="default 10000 (smaller for pretrained-lm)")
    demo.add_argument("--valid-pairs", type=positive_int, default=None, help="default 500 (smaller for pretrained-lm)")
    demo.add_argument("--test-pairs", type=positive_int, default=None, help="default 2000 (smaller for pretrained-lm)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the alignment and the pairs")
    demo.add_argument(
        "--device", default="cpu",
        help="where the models run: cpu (default; the README's numbers), cuda or cuda:N (the alignment maps follow)",
    )
    demo.add_argument(
        "--cache", default=str(default_cache()),
        help="where trained reference models and converted pretrained models are kept (default $MASALIGN_CACHE or ~/.cache/masalign)",
    )
    demo.add_argument("--quiet", action="store_true")
    demo.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    convert = commands.add_parser("convert-gguf", help="convert a GGUF file, or smollm2-135m / gemma3-270m, to a Hugging Face folder")
    convert.add_argument("model", metavar="GGUF_OR_NAME", help="a .gguf file, or a pretrained model's name (masalign.pretrained.PRETRAINED)")
    convert.add_argument("--out", default=None, help="the folder to write (default: under $MASALIGN_CACHE)")
    convert.add_argument("--overwrite", action="store_true", help="convert again, replacing what is in the folder")
    args = parser.parse_args(argv)
    if args.command == "convert-gguf":
        from .pretrained import convert_gguf_command

        return convert_gguf_command(args.model, args.out, args.overwrite)
    if args.command == "demo":
        problem = check_pair_flags(args)
        if problem is not None:
            parser.error(problem)
        apply_pair_defaults(args)
        if args.pair == PRETRAINED_PAIR:
            from .pretrained_demo import check_arguments

            problem = check_arguments(args)
            if problem is not None:
                parser.error(problem)
        run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
