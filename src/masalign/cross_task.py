"""Counterfactual pairs across tasks: models trained on different tasks, one shared variable.

The papers compare the count of an object task with the cumulative value of
Arithmetic. Each model reads its own task's sequences (its own view of the pairs,
:func:`masalign.data.view_for`), and pair ``i`` of every view must agree on what is
transplanted: the source's variable at its position. So each task draws its own
pairs (one position each), and pairs are matched across tasks on that source value.
Then for every direction ``source -> target``, the source's value at pair ``i`` is
the value the target's labels at pair ``i`` were computed with, whichever task the
source came from.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Protocol

import torch

from .data import IGNORE_INDEX, CounterfactualPairs


class PairTask(Protocol):
    name: str

    def counterfactual_pairs(self, n_pairs: int, seed: int = 0) -> CounterfactualPairs: ...

    def states(self, tokens: list[int]) -> list: ...


def source_values(task: PairTask, pairs: CounterfactualPairs) -> list[int]:
    """The variable's value each pair's source holds at its (single) position."""
    if pairs.source_positions.shape[1] != 1:
        raise ValueError(f"cross-task pairs intervene at one position per pair; these have {pairs.source_positions.shape[1]} slots")
    values = []
    for tokens, (position,) in zip(pairs.source_inputs.tolist(), pairs.source_positions.tolist()):
        state = task.states(tokens)[position]
        values.append(state.count if hasattr(state, "count") else state)  # NumericTask's CausalState, or Arithmetic's int
    return values


def cross_task_pairs(
    tasks: Mapping[str, PairTask], n_pairs: int, seed: int = 0, variable: str | None = None, max_draws: int = 20
) -> dict[str, CounterfactualPairs]:
    """``n_pairs`` pairs per model (``{model name: its task}``), matched on the value the source holds.

    Each task's pairs come from its own ``counterfactual_pairs`` (its causal model,
    positions and labels); pair ``i`` of every view has the same source value. Values
    that only some tasks produce (e.g. a count of 0 in the demo phase) are never
    drawn. The views are renamed to one ``variable`` (default: the tasks' variable
    names joined by ``=``, e.g. ``count=value``). Raises if ``max_draws`` rounds of
    ``n_pairs`` per task cannot be matched into ``n_pairs`` pairs.
    """
    if len(tasks) < 2:
        raise ValueError(f"cross-task pairs need at least two models' tasks, got {list(tasks)}")
    if n_pairs <= 0:
        raise ValueError(f"n_pairs must be positive, got {n_pairs}")
    if isinstance(max_draws, bool) or not isinstance(max_draws, int) or max_draws < 1:
        raise ValueError(f"max_draws must be a positive integer (how many batches of pairs to draw), got {max_draws!r}")
    rng = random.Random(seed)
    pools: dict[str, list[CounterfactualPairs]] = {name: [] for name in tasks}
    by_value: dict[str, dict[int, list[tuple[int, int]]]] = {name: {} for name in tasks}
    for draw in range(max_draws):
        for index, (name, task) in enumerate(tasks.items()):
            pairs = task.counterfactual_pairs(n_pairs, seed=seed * 1_000 + draw * len(tasks) + index)
            for row, value in enumerate(source_values(task, pairs)):
                by_value[name].setdefault(value, []).append((len(pools[name]), row))
            pools[name].append(pairs)
        shared = set.intersection(*(set(values) for values in by_value.values()))
        available = sum(min(len(by_value[name][value]) for name in tasks) for value in shared)
        if available >= n_pairs:
            break
    else:
        raise ValueError(
            f"could match only {available} of {n_pairs} pairs on the source value after {max_draws} draws; the tasks "
            f"share the values {sorted(shared)}: ask for fewer pairs or raise max_draws"
        )
    # Every shared value contributes as many pairs as its rarest task has; then n_pairs of them, shuffled.
    matched = [
        {name: by_value[name][value][k] for name in tasks}
        for value in sorted(shared)
        for k in range(min(len(by_value[name][value]) for name in tasks))
    ]
    rng.shuffle(matched)
    matched = matched[:n_pairs]
    names = sorted({pools[name][0].variable for name in tasks})
    joint = variable if variable is not None else "=".join(names)
    return {name: _gather(pools[name], [m[name] for m in matched], joint) for name in tasks}


def _gather(pools: list[CounterfactualPairs], picks: list[tuple[int, int]], variable: str) -> CounterfactualPairs:
    """The picked ``(pool, row)`` pairs: the pools padded to one width and joined, then indexed once."""

    def joined(field: str, fill: int) -> torch.Tensor:
        width = max(getattr(pool, field).shape[1] for pool in pools)
        return torch.cat([torch.nn.functional.pad(getattr(pool, field), (0, width - getattr(pool, field).shape[1]), value=fill) for pool in pools])

    offsets = [0]
    for pool in pools[:-1]:
        offsets.append(offsets[-1] + len(pool))
    rows = torch.tensor([offsets[pool] + row for pool, row in picks])
    every = CounterfactualPairs(  # both tasks pad with token 0
        joined("base_inputs", 0), joined("source_inputs", 0), joined("base_positions", 0), joined("source_positions", 0),
        joined("labels", IGNORE_INDEX), variable,
    )
    return every.subset(rows)
