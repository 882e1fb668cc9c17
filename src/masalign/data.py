"""Counterfactual datasets: the format MAS trains and evaluates on.

A :class:`CounterfactualPairs` holds ``N`` interchange examples for one causal
variable. Row ``i`` says: run the model on ``base_inputs[i]``, but at base
position ``base_positions[i, j]`` put the variable's value read from
``source_inputs[i]`` at ``source_positions[i, j]``; the model should then predict
``labels[i]`` (next-token targets, ``IGNORE_INDEX`` where there is nothing to
predict). Any task with a high-level causal model can be written this way.

``base_inputs`` already contain the counterfactual continuation after the
intervention (teacher forcing): the tokens a model would produce if it followed
the causal model, so a model that feeds back its own predictions sees the same
inputs whenever it is right.

Models with different tokenisations see the same pairs in their own token
positions: pass a mapping ``{model_name: CounterfactualPairs}`` whose rows
correspond (row ``i`` is the same pair in every view). That mapping is the
position correspondence between the models.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

# One inputs type for the whole library: the adapters define what a model takes.
from .adapters.base import EMPTY_SLOT, ModelInputs, tokens_and_mask

IGNORE_INDEX = -100


def _as_tensor(value: object, name: str) -> Tensor:
    """A tensor from a tensor, a numpy array or a rectangular nested list, or a clear error."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (list, tuple)) or type(value).__module__ == "numpy":
        try:
            return torch.as_tensor(value)
        except (ValueError, TypeError) as error:
            raise TypeError(
                f"{name} could not be turned into a tensor ({error}); pass a torch tensor of shape (N, ...), "
                "with every row padded to the same length"
            ) from None
    raise TypeError(f"{name} must be a torch tensor (or a numpy array / nested list of ints), got {type(value).__name__}")


def _as_inputs(value: object, name: str) -> ModelInputs:
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(
                f"{name} is an empty mapping; give token ids as a (N, T) tensor or a mapping such as "
                "{'input_ids': ..., 'attention_mask': ...}"
            )
        return {key: _as_tensor(item, f"{name}[{key!r}]") for key, item in value.items()}
    return _as_tensor(value, name)


def _rows(inputs: ModelInputs) -> int:
    first = inputs if isinstance(inputs, Tensor) else next(iter(inputs.values()))
    if first.dim() == 0:
        raise ValueError("got a single number where a tensor with one row per example was expected, shape (N, ...)")
    return first.shape[0]


def index_inputs(inputs: ModelInputs, index: Tensor) -> ModelInputs:
    """Rows ``index`` of a tensor or of every tensor in a mapping."""
    if isinstance(inputs, Tensor):
        return inputs[index]
    return {key: value[index] for key, value in inputs.items()}


def inputs_to(inputs: ModelInputs, device: torch.device | str) -> ModelInputs:
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    return {key: value.to(device) for key, value in inputs.items()}


def batches(n: int, batch_size: int) -> Iterator[Tensor]:
    """Row indices ``0..n-1`` in order, ``batch_size`` at a time (the last batch may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    for start in range(0, n, batch_size):
        yield torch.arange(start, min(start + batch_size, n))


@dataclass
class CounterfactualPairs:
    """Interchange examples for one variable.

    Attributes:
        base_inputs: ``(N, T_base)`` token ids (or a mapping of such tensors).
        source_inputs: ``(N, T_source)``.
        base_positions: ``(N, n_slots)`` long: where to intervene in the base;
            ``EMPTY_SLOT`` (-1) marks a slot a pair does not use (pairs with fewer
            positions than others, e.g. :func:`prefix_positions`).
        source_positions: ``(N, n_slots)`` long: where to read in the source; empty
            exactly where ``base_positions`` is.
        labels: ``(N, T_base)`` long: counterfactual next-token labels at every
            base position, ``IGNORE_INDEX`` (-100) where there is no label.
        variable: name of the causal variable these pairs intervene on.
    """

    base_inputs: ModelInputs
    source_inputs: ModelInputs
    base_positions: Tensor
    source_positions: Tensor
    labels: Tensor
    variable: str = "count"

    def __post_init__(self) -> None:
        for name in ("base_inputs", "source_inputs"):
            setattr(self, name, _as_inputs(getattr(self, name), name))
        for name in ("base_positions", "source_positions", "labels"):
            setattr(self, name, _as_tensor(getattr(self, name), name))
        if not isinstance(self.variable, str) or not self.variable:
            raise TypeError(f"variable must be a non-empty string naming the causal variable, got {self.variable!r}")
        n = _rows(self.base_inputs)
        if n == 0:
            raise ValueError("the counterfactual dataset is empty: it needs at least one pair")
        for name in ("source_inputs", "base_positions", "source_positions", "labels"):
            value = getattr(self, name)
            rows = _rows(value)
            if rows != n:
                raise ValueError(f"{name} has {rows} rows but base_inputs has {n}; every field needs one row per pair")
        for name in ("base_positions", "source_positions"):
            value = getattr(self, name)
            if value.dim() != 2:
                raise ValueError(f"{name} must be (N, n_slots); got shape {tuple(value.shape)}")
            if value.dtype.is_floating_point:
                raise TypeError(f"{name} must hold integer positions, got {value.dtype}")
        if self.base_positions.shape[1] == 0:
            raise ValueError(
                "base_positions has zero slots per pair, so nothing would be intervened on and IIA would be the "
                "models' unchanged behaviour; give at least one position per pair, shape (N, n_slots >= 1)"
            )
        if self.base_positions.shape[1] != self.source_positions.shape[1]:
            raise ValueError(
                f"base_positions has {self.base_positions.shape[1]} slots per pair but source_positions has "
                f"{self.source_positions.shape[1]}; slot j of the source goes to slot j of the base"
            )
        base_empty, source_empty = self.base_positions == EMPTY_SLOT, self.source_positions == EMPTY_SLOT
        if not torch.equal(base_empty, source_empty):
            i, j = (base_empty != source_empty).nonzero()[0].tolist()
            raise ValueError(
                f"pair {i}: slot {j} is empty ({EMPTY_SLOT}) in {'base' if base_empty[i, j] else 'source'}_positions but "
                f"not in the other: slot j of the source goes to slot j of the base, so a base and a source prefix of "
                f"different lengths cannot be paired; give both the same number of positions"
            )
        if bool(base_empty.all(dim=1).any()):
            i = int(base_empty.all(dim=1).nonzero()[0])
            raise ValueError(f"pair {i} has only empty slots ({EMPTY_SLOT}): nothing would be intervened on; give it a position")
        _check_labels(self.labels, self.base_inputs, "base_inputs", "pair")

    def __len__(self) -> int:
        return _rows(self.base_inputs)

    def subset(self, index: Tensor | slice) -> CounterfactualPairs:
        """The pairs at ``index`` (a long tensor or a slice)."""
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        return CounterfactualPairs(
            index_inputs(self.base_inputs, index),
            index_inputs(self.source_inputs, index),
            self.base_positions[index],
            self.source_positions[index],
            self.labels[index],
            self.variable,
        )

    def to(self, device: torch.device | str) -> CounterfactualPairs:
        return CounterfactualPairs(
            inputs_to(self.base_inputs, device),
            inputs_to(self.source_inputs, device),
            self.base_positions.to(device),
            self.source_positions.to(device),
            self.labels.to(device),
            self.variable,
        )

    def check_vocabulary(self, vocab_size: int, model_name: str = "the model") -> None:
        """Raise if a label is not a valid index into ``vocab_size`` logits."""
        top = int(self.labels.max())
        if top >= vocab_size:
            raise ValueError(
                f"labels of variable {self.variable!r} go up to token {top}, but {model_name} has only "
                f"{vocab_size} logits (token ids 0..{vocab_size - 1})"
            )


CounterfactualData = Union[CounterfactualPairs, Mapping[str, CounterfactualPairs]]


def prefix_positions(ends: Tensor | list[int], n_slots: int | None = None) -> Tensor:
    """``(N, n_slots)`` positions ``0, 1, ..., ends[i]`` per row, then :data:`EMPTY_SLOT`.

    The stepwise (contiguous prefix) protocol: every position of the base from the
    first token to ``ends[i]`` takes the source's position of the same index, in
    order. Give the same tensor for ``base_positions`` and ``source_positions``
    (prefixes pair one to one, so they have one length). ``n_slots`` defaults to
    the longest prefix.
    """
    ends = torch.as_tensor(ends)
    if ends.dim() != 1 or ends.dtype.is_floating_point or ends.dtype == torch.bool:
        raise TypeError(f"ends must be one integer position per row, (N,); got {ends.dtype} of shape {tuple(ends.shape)}")
    if ends.numel() and int(ends.min()) < 0:
        raise ValueError(f"prefix ends must be positions >= 0; got {int(ends.min())}")
    longest = int(ends.max()) + 1 if ends.numel() else 0
    n_slots = longest if n_slots is None else n_slots
    if n_slots < longest:
        raise ValueError(f"n_slots={n_slots} is shorter than the longest prefix ({longest} positions)")
    slots = torch.arange(n_slots)[None, :].expand(len(ends), -1)
    return torch.where(slots <= ends.long()[:, None], slots, torch.full_like(slots, EMPTY_SLOT))


def _check_labels(labels: Tensor, inputs: ModelInputs, inputs_name: str, row: str) -> None:
    """Next-token labels ``(N, seq)`` laid out as ``inputs``' positions, token ids or
    :data:`IGNORE_INDEX`, at least one per row (a row without one would count as right)."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer token ids, got {labels.dtype}")
    tokens = tokens_and_mask(inputs)[0]
    seq = tokens.shape[1] if tokens.dim() >= 2 else None
    if labels.dim() != 2 or (seq is not None and labels.shape[1] != seq):
        raise ValueError(
            f"labels must be (N, seq) with one column per position of {inputs_name} (seq = {seq}), got shape "
            f"{tuple(labels.shape)}; put {IGNORE_INDEX} where nothing is predicted"
        )
    if bool((labels < IGNORE_INDEX).any()) or bool(((labels < 0) & (labels != IGNORE_INDEX)).any()):
        raise ValueError(f"labels must be token ids >= 0 or {IGNORE_INDEX} (no label)")
    has_label = (labels != IGNORE_INDEX).any(dim=1)
    if not bool(has_label.all()):
        raise ValueError(f"{row} {int((~has_label).nonzero()[0])} has no label position; every {row} needs at least one label")


def view_for(data: CounterfactualData, model: str) -> CounterfactualPairs:
    """The pairs as ``model`` sees them (shared pairs, or that model's own view)."""
    if isinstance(data, CounterfactualPairs):
        return data
    if model not in data:
        raise KeyError(f"the counterfactual data has views for {sorted(data)}, not for model {model!r}")
    return data[model]


def check_views(data: CounterfactualData) -> int:
    """Number of pairs; raises if the per-model views disagree on it or on the variable."""
    if isinstance(data, CounterfactualPairs):
        return len(data)
    if not isinstance(data, Mapping) or not data or not all(isinstance(v, CounterfactualPairs) for v in data.values()):
        raise TypeError(
            "expected CounterfactualPairs, or a non-empty {model_name: CounterfactualPairs} mapping of per-model "
            f"views; got {type(data).__name__}" + (" (empty)" if isinstance(data, (list, tuple, Mapping)) and not data else "")
        )
    sizes = {name: len(view) for name, view in data.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the per-model views must hold the same pairs in the same order; their sizes differ: {sizes}")
    variables = {view.variable for view in data.values()}
    if len(variables) != 1:
        raise ValueError(f"the per-model views name different variables: {sorted(variables)}")
    # Slot j of the source model's view goes to slot j of the target's: the views must agree on
    # which slots each pair uses, or an empty source slot (read as zeros) would be written in.
    (first_name, first), *others = data.items()
    for name, view in others:
        if view.base_positions.shape[1] != first.base_positions.shape[1]:
            raise ValueError(
                f"the views of {first_name!r} and {name!r} have {first.base_positions.shape[1]} and "
                f"{view.base_positions.shape[1]} slots per pair; slot j of one model's positions goes to slot j of "
                "the other's, so every view needs the same slots (intervene on positions that tokenise alike, "
                "e.g. one token per item in every tokenizer)"
            )
        differs = (view.base_positions == EMPTY_SLOT) != (first.base_positions == EMPTY_SLOT)
        if bool(differs.any()):
            i, j = differs.nonzero()[0].tolist()
            empty_in = first_name if bool(first.base_positions[i, j] == EMPTY_SLOT) else name
            raise ValueError(
                f"pair {i}: slot {j} is empty ({EMPTY_SLOT}) in the view of {empty_in!r} but not in the other's; "
                "slot j of one model's positions goes to slot j of the other's, so the views must use the same slots"
            )
    return next(iter(sizes.values()))


def variable_of(data: CounterfactualData) -> str:
    return data.variable if isinstance(data, CounterfactualPairs) else next(iter(data.values())).variable


def subset(data: CounterfactualData, index: Tensor) -> CounterfactualData:
    if isinstance(data, CounterfactualPairs):
        return data.subset(index)
    return {name: view.subset(index) for name, view in data.items()}


@dataclass
class LabelledSequences:
    """Plain task data: ``inputs`` ``(N, T)`` and next-token ``labels`` ``(N, T)``
    (``IGNORE_INDEX`` where nothing is predicted). Used for training reference
    models and for the ceiling (a model's own task accuracy)."""

    inputs: ModelInputs
    labels: Tensor

    def __post_init__(self) -> None:
        self.inputs = _as_inputs(self.inputs, "inputs")
        self.labels = _as_tensor(self.labels, "labels")
        if _rows(self.inputs) == 0:
            raise ValueError("the dataset is empty")
        if _rows(self.labels) != _rows(self.inputs):
            raise ValueError(f"labels has {_rows(self.labels)} rows but inputs has {_rows(self.inputs)}")
        _check_labels(self.labels, self.inputs, "inputs", "row")

    def __len__(self) -> int:
        return _rows(self.inputs)

    def subset(self, index: Tensor) -> LabelledSequences:
        return LabelledSequences(index_inputs(self.inputs, index), self.labels[index])


__all__ = [
    "IGNORE_INDEX",
    "ModelInputs",
    "batches",
    "CounterfactualPairs",
    "CounterfactualData",
    "LabelledSequences",
    "view_for",
    "subset",
    "check_views",
    "variable_of",
]
