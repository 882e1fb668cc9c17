"""Reads of templated prompts: the shared prefixes run once (segments) against one plain run.

``fit`` and ``evaluate`` read, for each row, the base's states and keys/values up to
the first written or labelled position (``NNsightAdapter.key_value_prefix``) and
the source's states at the read positions (``key_value_activations``). Counterfactual
pairs built from templates share most of their prompts' beginnings; the adapter cuts
the prompts into segments and runs each segment once per distinct prefix
(:mod:`masalign.adapters.shared_prefix`). Here each read of 256 rows is timed both
ways, side by side: plain (``cuts=[0, seq]``, one run as before) and shared (the
planned cuts), with the largest difference between them (relative to the largest
value) and how many token positions each ran.

Models and data:

- ``gpt2-race``: the 64-wide, 2-layer GPT-2 and the variable-binding pairs of
  ``benchmarks/bench_das_pyvene.py`` (13-token prompts), block 0's output;
- ``smollm2-135m`` (layer 15 of 30) and ``gemma3-270m`` (layer 9 of 18) from their
  GGUF wheels (``masalign.pretrained``), through nnsight, on two run tasks of
  :mod:`masalign.lm_tasks` intervened at the answer: counting 10..98 (left-padded)
  and weekdays after ``"Days of the week:"``; ``smollm2-135m:transformer_lens``: the
  same through a TransformerLens ``TransformerBridge`` (``blocks.15.hook_resid_post``).

``--repeats`` rounds (default 3) time every read once each, interleaved; the times
are medians and the ratio plain / shared. Run:

    python benchmarks/bench_shared_prefix.py [--json PATH] [--repeats N] [--models gpt2-race smollm2-135m gemma3-270m]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
from bench_mas import cpu_name  # noqa: E402

from masalign.adapters import NNsightAdapter  # noqa: E402
from masalign.adapters.base import tokens_and_mask  # noqa: E402
from masalign.data import index_inputs  # noqa: E402
from masalign.prefix import suffix_start  # noqa: E402

ROWS = 256
PRETRAINED_LAYERS = {"smollm2-135m": 15, "gemma3-270m": 9}


def race_reads(workdir: Path) -> list[tuple[str, NNsightAdapter, str, Any]]:
    """The DAS race's model and 256 of its training pairs (the model trained into ``workdir`` if absent)."""
    import bench_das_pyvene as race
    from nnsight import NNsight
    from transformers import GPT2LMHeadModel

    example = race.load_example()
    checkpoint = example.CHECKPOINTS[0]
    folder = workdir / checkpoint.name
    if not (folder / "config.json").exists():
        example.train_checkpoint(checkpoint, folder, max_steps=2000)
    views = race.write_pairs(example, example.load_vocabulary(folder), {"train": 4096, "valid": 256, "test": 1024}, workdir / "pairs.safetensors")
    rows = torch.randperm(4096, generator=torch.Generator().manual_seed(0))[:ROWS]
    data = views["train"]
    adapter = NNsightAdapter(NNsight(GPT2LMHeadModel.from_pretrained(folder).eval()), name="gpt2")
    pairs = _Pairs(index_inputs(data.base_inputs, rows), index_inputs(data.source_inputs, rows), data.base_positions[rows], data.source_positions[rows], data.labels[rows])
    return [("variable binding", adapter, f"transformer.h.{race.LAYER}.output", pairs)]


class _Pairs:
    def __init__(self, base_inputs: Any, source_inputs: Any, base_positions: torch.Tensor, source_positions: torch.Tensor, labels: torch.Tensor) -> None:
        self.base_inputs, self.source_inputs = base_inputs, source_inputs
        self.base_positions, self.source_positions, self.labels = base_positions, source_positions, labels


def pretrained_reads(model: str) -> list[tuple[str, Any, str, Any]]:
    """``model``: a name of ``PRETRAINED_LAYERS``, through nnsight, or ``NAME:transformer_lens``."""
    from masalign.lm_tasks import counting, weekdays
    from masalign.pretrained import load_pretrained

    name, _, backend = model.partition(":")
    adapter, tokenizer = load_pretrained(name, backend or "nnsight", name=name)
    layer = PRETRAINED_LAYERS[name]
    site = f"blocks.{layer}.hook_resid_post" if backend == "transformer_lens" else f"model.layers.{layer}.output"
    reads = []
    for label, task in (("counting 10..98", counting(10, 98, 3, 4)), ("weekdays after a prefix", weekdays(prefix="Days of the week:"))):
        reads.append((label, adapter, site, task.counterfactual_views({name: tokenizer}, ROWS, seed=1, position="answer")[name]))
    return reads


def bench_read(read: Callable[[list[int] | None], Any], end: int, repeats: int, mask: torch.Tensor | None) -> dict[str, Any]:
    """Both ways of one read of positions ``0..end-1`` (``read(cuts)``), ``repeats`` interleaved
    rounds after a warm-up of each. The two are compared at real tokens (``mask``): nothing reads
    padding, and a TransformerBridge's attention gives padding, which attends to nothing, other
    states in runs of other lengths."""
    with torch.no_grad():
        plain_value, shared_value = read([0, end]), read(None)
        times: dict[str, list[float]] = {"plain": [], "shared": []}
        for _ in range(repeats):
            for way, cuts in (("plain", [0, end]), ("shared", None)):
                start = time.perf_counter()
                read(cuts)
                times[way].append(time.perf_counter() - start)
    plain_parts = _at_real_tokens(plain_value, mask)
    shared_parts = _at_real_tokens(shared_value, mask)
    difference = max(float((a - b).abs().max() / a.abs().max().clamp(min=1)) for a, b in zip(plain_parts, shared_parts, strict=True))
    plain, shared = statistics.median(times["plain"]), statistics.median(times["shared"])
    return {"plain_s": plain, "shared_s": shared, "ratio": plain / shared, "max_relative_difference": difference, "times": times}


def _at_real_tokens(value: Any, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """A prefix's states, keys and values with padding's zeroed; a source read as it is (it reads real tokens)."""
    if not hasattr(value, "tensors"):
        return [value]
    if mask is None:
        return list(value.tensors())
    real = mask.bool()
    keys_values = [t * real[:, None, : t.shape[2], None] for t in (*value.keys, *value.values)]
    return [value.states * real[:, : value.states.shape[1], None], *keys_values]


def plan_of(adapter: Any, run: Callable[[], Any]) -> list[tuple[int, int, int]]:
    """The segments (start, end, groups) a read runs, or one plain segment."""
    found: list[Any] = []
    runs = adapter._key_values
    original = runs._shared_prefix_segments

    def spy(*args: Any, **kwargs: Any) -> Any:
        segments = original(*args, **kwargs)
        found.append(segments)
        return segments

    runs._shared_prefix_segments = spy  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            run()
    finally:
        del runs._shared_prefix_segments
    segments = found[0] if found else None
    return [] if segments is None else [(s.start, s.end, s.n_groups) for s in segments]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write every read's timings and plan here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--models", nargs="*", default=["gpt2-race", *PRETRAINED_LAYERS, "smollm2-135m:transformer_lens"],
        help="gpt2-race, a pretrained model through nnsight, or NAME:transformer_lens (a TransformerBridge)",
    )
    parser.add_argument("--workdir", default=None, help="where the race's model and pairs are (default: a temporary folder)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for model in args.models:
        reads = race_reads(Path(args.workdir or tempfile.mkdtemp(prefix="bench_shared_prefix_"))) if model == "gpt2-race" else pretrained_reads(model)
        for task, adapter, site, data in reads:
            base, source = data.base_inputs, data.source_inputs
            seq = tokens_and_mask(base)[0].shape[1]
            start = suffix_start(data.base_positions, data.labels)
            read_end = int(data.source_positions.max()) + 1
            for kind, read, end in (
                ("base prefix", lambda cuts: adapter.key_value_prefix(base, site, start, cuts=cuts), seq),
                ("source", lambda cuts: adapter.key_value_activations(source, site, data.source_positions, cuts=cuts), read_end),
            ):
                plan = plan_of(adapter, lambda: read(None))
                row = {"model": model, "task": task, "site": site, "read": kind, "rows": ROWS, "seq": seq, "plan": plan,
                       "positions_plain": ROWS * end, "positions_shared": sum(g * (b - a) for a, b, g in plan) if plan else ROWS * end}  # fmt: skip
                row.update(bench_read(read, end, args.repeats, tokens_and_mask(base)[1] if kind == "base prefix" else None))
                results.append(row)
                cuts = [0, *(b for _, b, _ in plan)] if plan else "one run"
                print(
                    f"{model:29s} {task:24s} {kind:11s} plain {row['plain_s']:7.3f} s  shared {row['shared_s']:7.3f} s  "
                    f"{row['ratio']:5.2f}x  positions {row['positions_plain']:5d} -> {row['positions_shared']:5d}  cuts {cuts}  "
                    f"max rel. diff {row['max_relative_difference']:.1e}",
                    flush=True,
                )
    if args.json:
        machine = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"rows": ROWS, "repeats": args.repeats, "machine": machine, "reads": results}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
