"""The one protocol every model backend implements, and the checks they share.

An adapter turns a model into four operations on named *sites* (hook points):

- ``sites()``: the site names with their widths;
- ``activations(inputs, site, positions)``: read the site at chosen positions;
- ``run_with_replacement(inputs, site, positions, replace)``: run the model with
  the site's activations at those positions replaced by ``replace(...)``, out of
  place and differentiably, and return the logits;
- ``logits(inputs)``: a plain run.

Shapes, once for the whole library (samples are rows):

- ``inputs``: a ``(batch, seq)`` tensor of token ids (or ``(batch, seq, features)``),
  or a mapping of such tensors (``{"input_ids": ..., "attention_mask": ...}``);
- ``positions``: ``(batch, n_slots)`` long; slot ``j`` of example ``b`` is
  intervened at sequence position ``positions[b, j]``;
- activations: ``(batch, n_slots, width)``;
- logits: ``(batch, seq, vocab)``.

A :data:`Replacement` receives only the rows being intervened on, so one
signature serves position-indexed models (all rows at once) and recurrent ones
(the rows of one time step at a time, in time order)::

    replace(hidden, example_index, slot_index) -> new_hidden
    hidden: (n_rows, width); example_index, slot_index: (n_rows,) long
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Protocol, Union, runtime_checkable

import torch
from torch import Tensor, nn

ModelInputs = Union[Tensor, Mapping[str, Tensor]]
Replacement = Callable[[Tensor, Tensor, Tensor], Tensor]


@runtime_checkable
class ModelAdapter(Protocol):
    """What the MAS core needs from a model; see the module docstring for shapes."""

    @property
    def model(self) -> nn.Module: ...

    @property
    def device(self) -> torch.device: ...

    def sites(self) -> dict[str, int]:
        """Site name -> width of the activation vector there."""
        ...

    def activations(self, inputs: ModelInputs, site: str, positions: Tensor) -> Tensor:
        """``(batch, n_slots, width)`` activations at ``site`` and ``positions``."""
        ...

    def run_with_replacement(
        self, inputs: ModelInputs, site: str, positions: Tensor, replace: Replacement
    ) -> Tensor:
        """Logits ``(batch, seq, vocab)`` with the site replaced at ``positions``."""
        ...

    def logits(self, inputs: ModelInputs) -> Tensor:
        """Logits ``(batch, seq, vocab)`` of a plain run."""
        ...


class SiteError(ValueError):
    """A site name that the model does not have, or that cannot be used."""


def unknown_site_error(site: str, valid: Mapping[str, int] | list[str], model_name: str = "model") -> SiteError:
    """Error naming the unknown site, its closest matches and every valid site."""
    names = list(valid)
    close = difflib.get_close_matches(site, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    listing = ", ".join(names) if len(names) <= 40 else ", ".join(names[:40]) + f", ... ({len(names)} in all)"
    return SiteError(f"{model_name} has no site {site!r}.{hint} Valid sites: {listing}")


def batch_size_of(inputs: ModelInputs) -> int:
    return first_tensor(inputs).shape[0]


def first_tensor(inputs: ModelInputs) -> Tensor:
    if isinstance(inputs, Tensor):
        return inputs
    if isinstance(inputs, Mapping) and inputs:
        return next(iter(inputs.values()))
    raise TypeError(f"inputs must be a tensor or a non-empty mapping of tensors, got {type(inputs).__name__}")


def check_positions(positions: Tensor, batch: int, seq_len: int, lengths: Tensor | None = None) -> Tensor:
    """Validate ``(batch, n_slots)`` positions against the sequence; returns them as long.

    ``lengths`` (batch,) gives each example's true length when inputs are padded.
    """
    if not isinstance(positions, Tensor):
        positions = torch.as_tensor(positions)
    if positions.dim() == 1:
        raise ValueError(
            f"positions must be (batch, n_slots); got shape {tuple(positions.shape)}. "
            "For one position per example use positions[:, None]."
        )
    if positions.dim() != 2 or positions.shape[0] != batch:
        raise ValueError(f"positions must have shape (batch={batch}, n_slots); got {tuple(positions.shape)}")
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise TypeError(f"positions must be integer indices, got dtype {positions.dtype}")
    positions = positions.long()
    if positions.numel() == 0:
        return positions
    if int(positions.min()) < 0:
        bad = (positions < 0).nonzero()[0].tolist()
        raise IndexError(f"position {int(positions[bad[0], bad[1]])} of example {bad[0]} is negative; positions index the sequence from 0")
    limit = lengths.to(positions.device)[:, None] if lengths is not None else torch.full_like(positions[:, :1], seq_len)
    outside = positions >= limit
    if bool(outside.any()):
        b, j = outside.nonzero()[0].tolist()
        raise IndexError(
            f"position {int(positions[b, j])} (slot {j}) of example {b} is outside its sequence of length "
            f"{int(limit[b, 0])}; valid positions are 0..{int(limit[b, 0]) - 1}"
        )
    return positions


def check_finite(tensor: Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        n_bad = int((~torch.isfinite(tensor)).sum())
        raise FloatingPointError(
            f"{what} contains {n_bad} NaN or inf values; check the model's inputs and weights "
            "(and the standardisation statistics if standardize=True)"
        )
