"""MAS core benchmarks; ratios measured side by side in one run.

1. One MAS training step (one direction, and all four directions of a two-model
   fit) over a plain forward+backward of the target model on the same batch.
2. The low-rank orthogonal map (``d x k`` columns, docs/method.md section 3) against
   the full ``d x d`` rotation, at d = 128, 1024, 4096 with k = 16: the time of one
   interchange forward+backward on a batch of 128 vectors, parametrisation
   included.

Run: ``python benchmarks/bench_mas.py [--device cuda] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from masalign import ModelAlignment, TorchModuleAdapter
from masalign.alignment import OrthogonalAlignment, interchange
from masalign.data import IGNORE_INDEX
from masalign.objectives import intervention_loss
from masalign.models import RecurrentConfig, RecurrentLM
from masalign.tasks import get_task


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for benchmark records."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def timed(fn, repeats: int, warmup: int = 2, device: str = "cpu") -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_training_step(device: str, repeats: int) -> dict:
    task = get_task("multi_object")
    pairs = task.counterfactual_pairs(128, seed=0).to(device)
    models = {}
    for name, seed in (("A", 0), ("B", 1)):
        torch.manual_seed(seed)
        models[name] = TorchModuleAdapter(RecurrentLM(RecurrentConfig("gru", 128, 128)).to(device).eval(), name=name)
    alignment = ModelAlignment(models, "rnn.h_l0", 16)
    target = models["B"].model
    hidden = {n: alignment.source_activations(n, pairs.source_inputs, pairs.source_positions) for n in models}

    def plain_step() -> None:
        target.zero_grad(set_to_none=True)
        logits = target(pairs.base_inputs)
        nn.functional.cross_entropy(logits.flatten(0, 1), pairs.labels.flatten(), ignore_index=IGNORE_INDEX).backward()

    for p in target.parameters():
        p.requires_grad_(True)
    target.train()  # a plain training step (the GRU has no dropout); cuDNN differentiates RNNs in training mode only
    plain = timed(plain_step, repeats, device=device)
    target.eval()
    for adapter in models.values():
        for p in adapter.model.parameters():
            p.requires_grad_(False)

    def mas_direction(source: str = "A", target_name: str = "B") -> None:
        logits = alignment.intervened_logits(source, target_name, hidden[source], pairs.base_inputs, pairs.base_positions)
        intervention_loss(logits, pairs.labels).backward()

    def mas_all_directions() -> None:
        for s in models:
            for t in models:
                mas_direction(s, t)

    one = timed(mas_direction, repeats, device=device)
    four = timed(mas_all_directions, max(3, repeats // 2), device=device)
    print(f"training step, GRU d=128, batch 128, seq {pairs.base_inputs.shape[1]}, k=16, {device}:")
    print(f"  plain forward+backward of the target    {plain * 1e3:8.2f} ms   1.00x")
    print(f"  MAS step, one direction (A->B)          {one * 1e3:8.2f} ms   {one / plain:5.2f}x")
    print(f"  MAS step, all four directions           {four * 1e3:8.2f} ms   {four / plain:5.2f}x  ({four / plain / 4:.2f}x per direction)")
    return {"plain_ms": plain * 1e3, "one_direction_ms": one * 1e3, "four_directions_ms": four * 1e3,
            "one_direction_ratio": one / plain, "four_directions_ratio": four / plain}


def _ratio(value: float) -> str:
    """Two significant digits below 10 (a ratio under 1 must not print as 0), whole numbers above."""
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def bench_low_rank_vs_full(device: str, repeats: int) -> dict:
    print(f"\ninterchange forward+backward, batch 128, k=16, {device}: low-rank d x k columns vs full d x d rotation")
    print(f"  {'d':>5}  {'low-rank':>10}  {'full':>10}  {'full / low-rank':>16}")
    rows = {}
    for width in (128, 1024, 4096):
        source_h = torch.randn(128, width, device=device)
        target_h = torch.randn(128, width, device=device)
        results = {}
        for full in (False, True):
            a = OrthogonalAlignment(width, 16, full_rotation=full).to(device)
            b = OrthogonalAlignment(width, 16, full_rotation=full).to(device)

            def step() -> None:
                a.zero_grad(set_to_none=True)
                b.zero_grad(set_to_none=True)
                interchange(a, source_h, b, target_h, slice(0, 16)).square().sum().backward()

            # One d=4096 full-rotation step takes minutes on a CPU: time it once.
            slow = full and width >= 4096 and device == "cpu"
            results[full] = timed(step, 1 if slow else repeats, warmup=0 if slow else 1, device=device)
        print(f"  {width:>5}  {results[False] * 1e3:8.2f}ms  {results[True] * 1e3:8.1f}ms  {_ratio(results[True] / results[False]):>15}x")
        rows[str(width)] = {"low_rank_ms": results[False] * 1e3, "full_ms": results[True] * 1e3, "ratio": results[True] / results[False]}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    print(f"device {args.device}: {machine}")
    results = {
        "device": args.device, "machine": machine, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "training_step": bench_training_step(args.device, args.repeats),
        "low_rank_vs_full": bench_low_rank_vs_full(args.device, args.repeats),
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
