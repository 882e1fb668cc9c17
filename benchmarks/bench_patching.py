"""Activation patching on real pretrained models: every cell run whole, against cells run from caches.

``masalign.activation_patching`` over the residual stream (every sixth block's
output) at every position of 8 counting prompts (clean ``"21, 22, 23, 24, 25, "``,
corrupted ``"51, 52, 53, 54, 55, "``, ...; every prompt the same number of tokens,
no padding), denoising, the logit difference of the clean and corrupted next
numbers' first digits at the last position. Two ways, timed side by side in
interleaved rounds (medians; the first round includes the first calls' costs):

- whole (``prefix_cache=False``): each cell is one ``run_with_replacement`` of the
  whole model, as ``transformer_lens.patching`` runs one;
- cached (the default): each cell runs only the blocks after the site, over the
  positions from the patched one on, from the corrupted run's states and the later
  blocks' keys and values, computed once per site (``masalign.patching``).

The largest difference between the two grids is printed with them. Models:
SmolLM2-135M through TransformerLens (a ``TransformerBridge``) and nnsight, Gemma-3-270M
through nnsight (``masalign.pretrained``, from their GGUF wheels). Run:

    python benchmarks/bench_patching.py [--json PATH] [--repeats N] [--models smollm2-135m:transformer_lens ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import torch
from bench_mas import cpu_name

from masalign.patching import LogitDifference, activation_patching
from masalign.pretrained import load_pretrained

PROMPTS = 8
MODELS = ("smollm2-135m:transformer_lens", "smollm2-135m:nnsight", "gemma3-270m:nnsight")
N_LAYERS = {"smollm2-135m": 30, "gemma3-270m": 18}


def counting_pairs(tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean and corrupted runs of five two-digit numbers (``"21, 22, 23, 24, 25, "``: both
    tokenisers here split the digits and the space), and the next number's first digit in each."""
    starts = {"clean": range(21, 21 + PROMPTS), "corrupted": range(51, 51 + PROMPTS)}
    encoded = {name: [tokenizer(", ".join(str(s + i) for i in range(5)) + ", ")["input_ids"] for s in batch] for name, batch in starts.items()}
    lengths = {len(ids) for batch in encoded.values() for ids in batch}
    if len(lengths) != 1:
        raise RuntimeError(f"the prompts tokenise to different lengths {sorted(lengths)}; the benchmark needs one")
    answers = {name: [tokenizer(str(s + 5)[0], add_special_tokens=False)["input_ids"][0] for s in batch] for name, batch in starts.items()}
    return (torch.tensor(encoded["clean"]), torch.tensor(encoded["corrupted"]), torch.tensor(answers["clean"]), torch.tensor(answers["corrupted"]))


def bench_model(model: str, repeats: int) -> dict[str, Any]:
    name, _, backend = model.partition(":")
    adapter, tokenizer = load_pretrained(name, backend, name=name)
    clean, corrupted, answer, wrong = counting_pairs(tokenizer)
    pattern = "blocks.{}.hook_resid_post" if backend == "transformer_lens" else "model.layers.{}.output"
    sites = [pattern.format(layer) for layer in range(0, N_LAYERS[name], 6)]
    metric = LogitDifference(answer=answer, wrong=wrong)

    def grid(prefix_cache: bool) -> torch.Tensor:
        return activation_patching(adapter, clean, corrupted, sites, metric, normalize=False, prefix_cache=prefix_cache).raw

    times: dict[str, list[float]] = {"whole": [], "cached": []}
    values: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for way, prefix_cache in (("whole", False), ("cached", True)):
            start = time.perf_counter()
            values[way] = grid(prefix_cache)
            times[way].append(time.perf_counter() - start)
    whole, cached = values["whole"], values["cached"]
    whole_s, cached_s = statistics.median(times["whole"]), statistics.median(times["cached"])
    return {
        "model": name, "backend": backend, "sites": len(sites), "positions": clean.shape[1], "prompts": PROMPTS,
        "whole_s": whole_s, "cached_s": cached_s, "ratio": whole_s / cached_s,
        "max_abs_difference": float((whole - cached).abs().max()), "largest_value": float(whole.abs().max()), "times": times,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    print(f"activation patching, {PROMPTS} prompts, denoising; medians of {args.repeats} interleaved rounds, {torch.get_num_threads()} threads")
    print(f"{'model':<30}{'grid':>10}{'whole':>10}{'cached':>10}{'ratio':>8}  max |difference| (largest value)")
    for model in args.models:
        row = bench_model(model, args.repeats)
        results.append(row)
        print(f"{model:<30}{row['sites']:>4} x {row['positions']:<3}{row['whole_s']:>9.2f}s{row['cached_s']:>9.2f}s{row['ratio']:>7.2f}x  "
              f"{row['max_abs_difference']:.1e} ({row['largest_value']:.2f})", flush=True)  # fmt: skip
    if args.json:
        machine = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "repeats": args.repeats, "results": results}, handle, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
