"""Do void tokens make the reference transformer solve the held-out counts?

Trains the papers' transformer (2 layers, width 128, one head, rotary positions) on
Multi-Object with the reference's settings (lr 5e-4, batch 128) for a fixed number
of steps, with void tokens in the demo phase at probability ``--void-p`` (the
reference's "_unk" models use 0.2; 0 is the plain task), and prints the trial
accuracy on the held-out counts 4, 9, 14 and 17 every ``--check-every`` steps. No
early stop, nothing cached: this is the comparison, not the reference model.

Run: ``python examples/transformer_void_tokens.py --void-p 0 --steps 2000`` (about 7 minutes
on 2 CPU cores), and again with ``--void-p 0.2``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from masalign.models import reference_config, train_lm
from masalign.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--void-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--check-every", type=int, default=250)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    task = dataclasses.replace(get_task("multi_object"), void_p=args.void_p)
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line.strip())

    _, summary = train_lm(
        task, reference_config("transformer"), seed=args.seed, steps=args.steps, lr=5e-4,
        target_accuracy=2.0, check_every=args.check_every, log=log,  # 2.0: never stop early
    )
    print(summary)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "void_p": args.void_p, "seed": args.seed, "lr": 5e-4, "batch_size": 128, "threads": torch.get_num_threads(),
            "log": lines, "final": dataclasses.asdict(summary),
        }, indent=2))


if __name__ == "__main__":
    main()
