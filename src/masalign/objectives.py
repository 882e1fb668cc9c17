"""What is trained and scored (docs/method.md sections 4 and 6): directions and the per-direction loss.

A *direction* is a ``(source, target)`` pair of model names: the source's aligned
coordinates are written into the target. ``(s, s)`` is DAS within model ``s``.
Both the trainer (:mod:`masalign.train`) and the evaluation
(:mod:`masalign.evaluate`) take directions and score logits against
counterfactual labels the same way, so the helpers live here, below both.

Results keyed by direction are nested ``{source: {target: value}}`` mappings
(:data:`Matrix`) everywhere, so they serialise to JSON unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

from .data import IGNORE_INDEX

if TYPE_CHECKING:
    from .mas import ModelAlignment

Direction = tuple[str, str]
Matrix = dict[str, dict[str, float]]


def direction_name(direction: Direction) -> str:
    """``"source->target"``, for progress bars and logs."""
    return f"{direction[0]}->{direction[1]}"


def all_directions(models: Sequence[str]) -> list[Direction]:
    """Every (source, target) pair, including source = target (docs/method.md section 4)."""
    return [(s, t) for s in models for t in models]


def check_directions(alignment: ModelAlignment, directions: Sequence[Direction] | None) -> list[Direction]:
    """``directions`` as a list of (source, target) tuples; ``None`` means all ``n^2``."""
    if directions is None:
        return all_directions(alignment.model_names)
    if isinstance(directions, str) or not isinstance(directions, Sequence):
        raise TypeError(f"directions must be a list of (source, target) pairs, e.g. [('A', 'B')]; got {directions!r}")
    checked = []
    for direction in directions:
        if isinstance(direction, str) or len(direction) != 2 or any(m not in alignment.models for m in direction):
            raise ValueError(
                f"direction {direction!r} must be a (source, target) pair of model names from {alignment.model_names}"
            )
        if (direction[0], direction[1]) in checked:
            raise ValueError(f"direction {tuple(direction)!r} is given twice; each direction counts once in the loss")
        checked.append((direction[0], direction[1]))
    if not checked:
        raise ValueError("directions is empty; give at least one (source, target) pair, or None for all of them")
    return checked


def to_matrix(values: Mapping[Direction, float], models: Sequence[str]) -> Matrix:
    """``{(s, t): v}`` -> ``{s: {t: v}}`` with a row for every model."""
    matrix: Matrix = {s: {} for s in models}
    for (source, target), value in values.items():
        matrix[source][target] = value
    return matrix


def _check_label_shape(logits: Tensor, labels: Tensor) -> None:
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"the target's logits have shape {tuple(logits.shape)} but the labels {tuple(labels.shape)}: labels need "
            "one entry per base input position"
        )


def correct_counts(logits: Tensor, labels: Tensor) -> tuple[int, int, int]:
    """(correct trials, correct label tokens, label tokens) for ``(batch, seq, vocab)`` logits.

    A trial is correct when every label position (labels != ``IGNORE_INDEX``) is.
    """
    _check_label_shape(logits, labels)
    mask = labels != IGNORE_INDEX
    hits = logits.argmax(-1) == labels
    trials = int((hits | ~mask).all(dim=1).sum())
    return trials, int((hits & mask).sum()), int(mask.sum())


def intervention_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``(batch, seq, vocab)`` logits against counterfactual labels: the mean
    over label tokens, or with ``reduction="sum"`` their sum."""
    _check_label_shape(logits, labels)
    return nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
    )
