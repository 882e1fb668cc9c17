"""Shared prompt prefixes: rows whose prompts begin alike run those positions once.

In a causal model a position's keys, values and states depend only on the tokens
up to it. Counterfactual pairs built from templates share long prefixes: the DAS
race's 4,096 base prompts of 13 tokens hold 1 distinct 2-token prefix, 10
distinct 6-token ones, 100 distinct 10-token ones and 992 distinct 12-token ones.
A read of many rows can then run the prompt in segments ``[c_0, c_1), [c_1, c_2),
...``: segment ``s`` runs once per distinct prefix of length ``c_{s+1}`` (its
*group*), attending to the keys and values its group's earlier segments stored,
and each row's values are gathered from its groups. 256 rows of the race run
about a fifth of the token positions of one plain run.

This module is the bookkeeping, on token tensors only: which rows share a prefix
(:func:`prefix_groups`, exact: grouped by a hash, then checked token for token),
how many distinct prefixes each length has (:func:`distinct_prefix_counts`), and
where to cut (:func:`plan_segments`, from a cost of one run plus the positions it
runs). The runs themselves are :mod:`masalign.adapters.key_values` (Hugging Face caches,
through nnsight or a TransformerLens bridge).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# One run's fixed cost (hooks, input preparation, the cache, masks), in units of one
# position through one block: a 2-layer, 64-wide GPT-2 runs 256 x 13 positions through
# its blocks in about 29 ms (4.4 us a block-position) and any run costs about 1.3 ms more.
# Larger models cost more per block-position, so cutting is cheaper for them than this
# assumes: they are cut less often than would pay.
RUN_COST = 300
# On a GPU a run's fixed cost (kernel launches, Python) is a far larger share of a read:
# cut only where that saves much more (not measured here: no GPU on the machines this
# was written on).
CUDA_RUN_COST_FACTOR = 30
# A block that only computes its keys and values (the run stops there) costs about this
# share of a whole block (its norm and key/value projection of the attention input).
KEY_VALUE_SHARE = 0.25
# A plan is used only when it costs at most this share of the plain reads.
WORTH_IT = 0.8
# At most this many cut candidates are weighed (the lengths where most prefixes split).
MAX_CANDIDATES = 48


@dataclass(frozen=True)
class Segment:
    """Positions ``start..end-1``, run once per group: ``group_of_row[r]`` is row ``r``'s group,
    ``first_row[g]`` the row that stands for group ``g`` (its prefix up to ``end`` is theirs)."""

    start: int
    end: int
    group_of_row: Tensor
    first_row: Tensor

    @property
    def n_groups(self) -> int:
        return int(self.first_row.numel())


def _prefix_hashes(columns: Tensor) -> Tensor:
    """``(rows, seq)`` float64: a hash of each row's first ``c + 1`` positions, for every ``c``.

    A random projection of the token ids, summed along the sequence: rows with the
    same prefix get the same value (the same operations in the same order); rows
    with different prefixes very likely differ, and :func:`prefix_groups` checks.
    """
    weights = torch.rand(columns.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    return torch.cumsum(columns.double() * weights, dim=1)


def prefix_columns(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """``(rows, seq)`` long: what decides a position's value besides the earlier ones, the token
    and its attention-mask bit (left padding shifts the position ids, which follow the mask)."""
    columns = tokens.long() * 2
    return columns if mask is None else columns + (mask != 0).long()


def distinct_prefix_counts(columns: Tensor) -> Tensor:
    """``counts[c]``: how many distinct prefixes of length ``c`` the rows hold (``counts[0] = 1``).

    From the hashes, so an undetected collision could only undercount (a cost
    estimate; :func:`prefix_groups` is exact)."""
    rows, seq = columns.shape
    counts = torch.ones(seq + 1, dtype=torch.long)
    if rows == 0 or seq == 0:
        counts[1:] = 0 if rows == 0 else 1
        return counts
    ordered = torch.sort(_prefix_hashes(columns), dim=0).values
    counts[1:] = 1 + (ordered[1:] != ordered[:-1]).sum(dim=0)
    return counts


def run_cost(device: torch.device) -> float:
    """One run's fixed cost on ``device``, in block-positions (:data:`RUN_COST`)."""
    return RUN_COST * (CUDA_RUN_COST_FACTOR if device.type == "cuda" else 1)


def plan_segments(
    counts: Tensor, end: int, position_cost: Callable[[int, int], float], plain_cost: float, run_cost: float = RUN_COST
) -> list[int]:
    """Cut points ``0 = c_0 < c_1 < ... < c_m = end`` that minimise the summed cost of the segment
    runs, ``run_cost + counts[b] * (b - a) * position_cost(a, b)`` for a segment ``[a, b)`` (the
    blocks it runs, per position); ``[0, end]`` (the plain reads, ``plain_cost``) unless cutting
    costs at most :data:`WORTH_IT` of that."""
    if end <= 1:
        return [0, end]
    # Cutting just before the count rises is never worse than anywhere else between rises.
    jumps = counts[2 : end + 1] - counts[1:end]  # jumps[i]: counts[i + 2] - counts[i + 1]
    candidates = (jumps > 0).nonzero()[:, 0] + 1
    if candidates.numel() > MAX_CANDIDATES:
        largest = torch.topk(jumps[candidates - 1], MAX_CANDIDATES).indices
        candidates = candidates[largest]
    points = [0, *sorted(int(c) for c in candidates), end]
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [0])}
    for b in points[1:]:
        best[b] = min(
            ((cost + run_cost + int(counts[b]) * (b - a) * position_cost(a, b), [*cuts, b]) for a, (cost, cuts) in best.items() if a < b),
            key=lambda option: option[0],
        )
    cost, cuts = best[end]
    return cuts if len(cuts) > 2 and cost <= WORTH_IT * plain_cost else [0, end]


def prefix_groups(columns: Tensor, cuts: list[int]) -> list[Segment]:
    """The segments between ``cuts``, each with every row's group (rows with the same columns up to
    the segment's end) and one row per group, exactly: rows a hash puts together are compared
    column for column, and a row that differs from its group's first is given a group of its own."""
    rows = columns.shape[0]
    hashes = _prefix_hashes(columns) if rows else columns.double()
    segments = []
    for start, end in zip(cuts[:-1], cuts[1:], strict=True):
        _, group = torch.unique(hashes[:, end - 1], return_inverse=True)
        n_groups = int(group.max()) + 1 if rows else 0
        first = torch.full((n_groups,), rows, dtype=torch.long).scatter_reduce_(0, group, torch.arange(rows), reduce="amin")
        differs = (columns[:, :end] != columns[first[group], :end]).any(dim=1).nonzero()[:, 0]
        if differs.numel():
            group = group.clone()
            group[differs] = n_groups + torch.arange(differs.numel())
            first = torch.cat([first, differs])
        segments.append(Segment(start, end, group, first))
    return segments


def one_group_per_row(rows: int, cuts: list[int]) -> list[Segment]:
    """The segments between ``cuts`` with every row a group of its own (the plain reads)."""
    each = torch.arange(rows)
    return [Segment(start, end, each, each) for start, end in zip(cuts[:-1], cuts[1:], strict=True)]


def gather_segments(parts: list[Tensor], segments: list[Segment], rows: Tensor | None, dim: int) -> Tensor:
    """Each of ``rows``' values (every row for ``None``) along its groups' segments: ``parts[s]``
    holds segment ``s``'s values per group (group first, positions along ``dim``), concatenated
    along ``dim``."""
    groups = [segment.group_of_row if rows is None else segment.group_of_row[rows] for segment in segments]
    # index_select: a third of advanced indexing's time on these 4-d key tensors.
    return torch.cat([part.index_select(0, group.to(part.device)) for part, group in zip(parts, groups, strict=True)], dim=dim)


__all__ = ["KEY_VALUE_SHARE", "RUN_COST", "Segment", "run_cost", "distinct_prefix_counts", "gather_segments", "one_group_per_row", "plan_segments", "prefix_columns", "prefix_groups"]
