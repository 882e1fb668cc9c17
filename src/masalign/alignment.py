"""Alignment functions and the interchange intervention (METHOD.md sections 2 and 3).

Each model ``m`` gets one invertible map ``A_m: R^d -> R^d``. The aligned space is
split into blocks; variable ``v`` owns the coordinates ``block = slice(o_v, o_v + k_v)``.

Interchange (source ``s``, target ``t``)::

    z_t = A_t(h_t),  z_s = A_s(h_s)
    z~  = z_t with z~[block] = z_s[block]
    h~  = A_t^{-1}(z~)

Every alignment function offers ``forward``/``inverse`` (the full map) and the two
operations the interchange actually needs, ``coordinates(h, block)`` and
``substitute(h, block, values)``. The defaults go through the full map; the
orthogonal map overrides them with the closed form of METHOD.md section 3::

    h~ = h + sigma * Q_V (z_s[V] - Q_V^T h'),   h' = (h - mu) / sigma

so it only ever stores and multiplies the ``d x k`` block of columns ``Q_V``.

No model code and no training loop live here.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class AlignmentFunction(nn.Module, metaclass=ABCMeta):
    """An invertible map ``R^width -> R^width`` with optional standardisation.

    ``mean`` and ``std`` are fixed buffers (set with :meth:`set_standardization`);
    the map is applied to ``(h - mean) / std``. Subclasses implement
    ``_forward_standardized`` and ``_inverse_standardized`` and may override
    ``coordinates``/``substitute`` with cheaper closed forms.

    Shapes: ``h`` and ``z`` are ``(..., width)``; ``block`` is a slice of the aligned
    coordinates; ``values`` are ``(..., block length)``.
    """

    kind: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[AlignmentFunction]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            AlignmentFunction.registry[cls.kind] = cls

    def __init__(self, width: int, n_aligned: int) -> None:
        super().__init__()
        if n_aligned > width:
            raise ValueError(f"cannot align {n_aligned} coordinates in a space of width {width}")
        self.width = width
        self.n_aligned = n_aligned
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    # -- to be provided by subclasses ---------------------------------------------

    @abstractmethod
    def _forward_standardized(self, h: Tensor) -> Tensor:
        """The map on standardised activations."""

    @abstractmethod
    def _inverse_standardized(self, z: Tensor) -> Tensor:
        """Its inverse, back to standardised activations."""

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (the rest is in ``state_dict``)."""
        return {"width": self.width, "n_aligned": self.n_aligned}

    # -- the map ----------------------------------------------------------------------

    def set_standardization(self, mean: Tensor, std: Tensor, min_std: float = 1e-6) -> None:
        """Use per-feature ``mean`` and ``std`` (each ``(width,)``) of the model's activations."""
        if mean.shape != (self.width,) or std.shape != (self.width,):
            raise ValueError(f"mean and std must have shape ({self.width},); got {tuple(mean.shape)} and {tuple(std.shape)}")
        self.mean = mean.detach().to(self.mean)
        self.std = std.detach().clamp(min=min_std).to(self.std)

    def standardize(self, h: Tensor) -> Tensor:
        return (h - self.mean) / self.std

    def unstandardize(self, h: Tensor) -> Tensor:
        return h * self.std + self.mean

    def forward(self, h: Tensor) -> Tensor:
        """``z = A(h)``, all ``width`` aligned coordinates."""
        return self._forward_standardized(self.standardize(h))

    def inverse(self, z: Tensor) -> Tensor:
        """``h = A^{-1}(z)``."""
        return self.unstandardize(self._inverse_standardized(z))

    def coordinates(self, h: Tensor, block: slice) -> Tensor:
        """``A(h)[..., block]``."""
        return self.forward(h)[..., block]

    def substitute(self, h: Tensor, block: slice, values: Tensor, keep_complement: bool = True) -> Tensor:
        """``A^{-1}(z)`` where ``z = A(h)`` with ``z[..., block] = values``.

        With ``keep_complement=False`` every other coordinate is zero instead
        (stitching: ``A^{-1}`` of ``values`` padded with zeros).
        """
        z = self.forward(h) if keep_complement else h.new_zeros(*h.shape[:-1], self.width)
        start, stop, _ = block.indices(self.width)
        return self.inverse(torch.cat([z[..., :start], values, z[..., stop:]], dim=-1))


class OrthogonalAlignment(AlignmentFunction):
    """``A(h) = Q^T (h - mu) / sigma`` with ``Q`` orthogonal (the default, METHOD.md section 2).

    By default only the ``n_aligned`` columns that the variables use are stored and
    trained: ``Q_V = qr(W).Q`` for an unconstrained ``width x n_aligned`` matrix ``W``
    (a QR retraction onto the Stiefel manifold, ``O(d k^2)`` per step; the signs
    are fixed so that ``R`` has a positive diagonal, which makes the map from ``W``
    continuous). The interchange needs nothing else (METHOD.md section 3);
    ``forward`` and ``inverse`` complete the basis when the full map is asked for.

    ``full_rotation=True`` trains the whole ``width x width`` rotation instead,
    ``Q = Q_0 exp(S - S^T)`` with a fixed random ``Q_0`` (``O(d^3)`` per step), as
    the reference code does with a full orthogonal parametrisation.
    """

    kind = "orthogonal"

    def __init__(self, width: int, n_aligned: int, full_rotation: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__(width, n_aligned)
        self.full_rotation = full_rotation
        if full_rotation:
            self.register_buffer("initial_rotation", torch.linalg.qr(torch.randn(width, width, generator=generator)).Q)
            self.skew = nn.Parameter(torch.zeros(width, width))
        else:
            # Start from orthonormal columns: the retraction's step size scales with
            # 1 / |column|, so unit columns make Adam's lr a rotation rate, as with
            # the reference's full orthogonal parametrisation.
            start = torch.linalg.qr(torch.randn(width, max(n_aligned, 1), generator=generator)).Q[:, :n_aligned]
            self.raw_columns = nn.Parameter(start.contiguous())

    def config(self) -> dict[str, Any]:
        return {**super().config(), "full_rotation": self.full_rotation}

    @property
    def basis(self) -> Tensor:
        """The orthonormal columns, ``(width, n_aligned)``, or ``(width, width)`` for a full rotation."""
        if self.full_rotation:
            return self.initial_rotation @ torch.linalg.matrix_exp(self.skew - self.skew.T)
        q, r = torch.linalg.qr(self.raw_columns)
        signs = torch.sign(torch.diagonal(r))
        return q * torch.where(signs == 0, torch.ones_like(signs), signs)

    def full_basis(self) -> Tensor:
        """A ``(width, width)`` orthogonal ``Q`` whose first columns are :attr:`basis`."""
        q = self.basis
        if q.shape[1] == self.width:
            return q
        # Complete the basis with the orthogonal complement of the stored columns.
        complete = torch.linalg.qr(q.detach(), mode="complete").Q
        return torch.cat([q, complete[:, q.shape[1] :]], dim=1)

    def _forward_standardized(self, h: Tensor) -> Tensor:
        return h @ self.full_basis()

    def _inverse_standardized(self, z: Tensor) -> Tensor:
        return z @ self.full_basis().T

    def coordinates(self, h: Tensor, block: slice) -> Tensor:
        return self.standardize(h) @ self.basis[:, block]

    def substitute(self, h: Tensor, block: slice, values: Tensor, keep_complement: bool = True) -> Tensor:
        q_block = self.basis[:, block]
        if not keep_complement:
            return self.unstandardize(values @ q_block.T)
        standardized = self.standardize(h)
        return self.unstandardize(standardized + (values - standardized @ q_block) @ q_block.T)


def interchange(
    source_alignment: AlignmentFunction,
    source_hidden: Tensor,
    target_alignment: AlignmentFunction,
    target_hidden: Tensor,
    block: slice,
    keep_complement: bool = True,
) -> Tensor:
    """The interchange intervention of METHOD.md section 3.

    ``source_hidden`` ``(..., d_s)`` and ``target_hidden`` ``(..., d_t)`` are paired
    rows; returns ``h~_t`` ``(..., d_t)``: the target's activations with the aligned
    coordinates ``block`` taken from the source. ``keep_complement=False`` zeroes
    the target's other coordinates (stitching).
    """
    values = source_alignment.coordinates(source_hidden, block)
    return target_alignment.substitute(target_hidden, block, values, keep_complement)


def make_alignment(kind: str, width: int, n_aligned: int, **options: Any) -> AlignmentFunction:
    """Build a registered alignment function by its ``kind`` name."""
    if kind not in AlignmentFunction.registry:
        raise ValueError(f"unknown alignment kind {kind!r}; available: {', '.join(sorted(AlignmentFunction.registry))}")
    return AlignmentFunction.registry[kind](width, n_aligned, **options)
