"""The reference's cross-architecture grid: GRU, transformer and LSTM seeds, per site and protocol.

Each cell is one two-model MAS alignment (both maps, all four directions: the two
cross directions, and DAS within each model), trained on the same 10,000 pairs of
plain Multi-Object sequences (no void tokens, as the reference aligns them) and
scored on 2,000 held-out pairs, with the floor (untrained alignment) of every
direction and the ceiling (task accuracy on the held-out counts) of every model.

The protocols are the reference's two: "single" (one position per sequence, the
reference's "indywise", for RNN hidden states) and "stepwise" (base positions 0..t
take the source's positions 0..t in order, the reference's protocol for
transformers; exact for the fused GRU through its stepwise run). Both models of a
cell use the same protocol on the same pairs.

The models are the cached reference models (:func:`masalign.models.reference_model`):
GRU seed 0 and LSTM seeds 0 and 1 (3,000 steps at most), and transformer seeds 0 and 1,
trained as the reference trains them (void tokens with probability 0.2, lr 5e-4,
batch 128, up to 20,000 steps, stopped at 0.99 on the held-out counts). The first run
trains what is missing: see ``model_info`` in the JSON for the times.

Run: ``python examples/cross_architecture_grid.py --json examples/results/cross_architecture_grid.json``
(``--cells`` picks cells by number; ``--steps``, ``--lr``, ``--k`` change the fits).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from masalign import ModelAlignment, evaluate, fit
from masalign.models import default_cache, reference_model
from masalign.tasks import get_task

HIDDEN = "blocks.0.hook_resid_post"  # the residual stream between the transformer's two blocks
EMBEDDING = "hook_embed"

# (what the cell asks, (architecture, seed, site) of each model, protocol)
CELLS = [
    ("GRU and transformer, hidden states, one position", ("gru", 0, "rnn.h_l0"), ("transformer", 1, HIDDEN), "single"),
    ("GRU and transformer, hidden states, stepwise", ("gru", 0, "rnn.h_l0"), ("transformer", 1, HIDDEN), "stepwise"),
    ("GRU hidden state and transformer embedding, stepwise", ("gru", 0, "rnn.h_l0"), ("transformer", 1, EMBEDDING), "stepwise"),
    ("transformer seeds, embeddings, stepwise", ("transformer", 0, EMBEDDING), ("transformer", 1, EMBEDDING), "stepwise"),
    ("transformer seeds, hidden states, one position", ("transformer", 0, HIDDEN), ("transformer", 1, HIDDEN), "single"),
    ("transformer seeds, hidden states, stepwise", ("transformer", 0, HIDDEN), ("transformer", 1, HIDDEN), "stepwise"),
    ("LSTM seeds, [h; c], one position", ("lstm", 0, "rnn.hc_l0"), ("lstm", 1, "rnn.hc_l0"), "single"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, nargs="+", default=list(range(1, len(CELLS) + 1)), help="cell numbers, from 1")
    parser.add_argument("--steps", type=int, default=400, help="most training steps per cell (early stopping may end sooner)")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="write every cell's results here")
    args = parser.parse_args()
    bad = [c for c in args.cells if not 1 <= c <= len(CELLS)]
    if bad:
        parser.error(f"--cells {bad}: there are cells 1..{len(CELLS)}")
    task = get_task("multi_object")
    pairs = {
        protocol: [task.counterfactual_pairs(n, seed=seed, protocol=protocol) for n, seed in ((10_000, 1), (500, 2), (2000, 3))]
        for protocol in {CELLS[c - 1][3] for c in args.cells}
    }
    ceiling_data = task.sample(2000, seed=4, split="held_out")
    adapters, model_info, results = {}, {}, []
    for number in args.cells:
        question, first, second, protocol = CELLS[number - 1]
        names, sites = [], {}
        for architecture, seed, site in (first, second):
            name = f"{architecture}_seed{seed}"
            if name not in adapters:
                adapters[name], model_info[name] = reference_model(architecture, "multi_object", seed, default_cache(), print)
            names.append(name)
            sites[name] = site
        torch.manual_seed(0)
        train, valid, test = pairs[protocol]
        started = time.perf_counter()
        alignment = ModelAlignment({name: adapters[name] for name in names}, sites, args.k, seed=0)
        result = fit(alignment, train, valid, steps=args.steps, lr=args.lr, batch_size=128, eval_every=50, progress=False)
        report = evaluate(alignment, test, ceiling_data=ceiling_data)
        seconds = time.perf_counter() - started
        print(f"\n[{number}] {question} ({protocol}; {sites}); {result.steps} steps, best at {result.best_step}, {seconds:.0f} s")
        print(report.table())
        results.append({
            "cell": number, "question": question, "protocol": protocol, "sites": sites, **report.matrices(),
            "fit": result.summary(), "seconds": seconds,
        })
        if args.json is not None:  # after every cell, so an interrupted run keeps what it measured
            document = {
                "task": "multi_object", "k": args.k, "steps": args.steps, "lr": args.lr, "batch_size": 128,
                "pairs": {"train": 10_000, "valid": 500, "test": 2000}, "torch": torch.__version__,
                "threads": torch.get_num_threads(), "model_info": model_info, "cells": results,
            }
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
