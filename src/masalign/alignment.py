"""Alignment functions and the interchange intervention (docs/method.md sections 2 and 3).

Each model ``m`` gets one invertible map ``A_m: R^d -> R^d``. The aligned space is
split into blocks; variable ``v`` owns the coordinates ``block = slice(o_v, o_v + k_v)``.

Interchange (source ``s``, target ``t``)::

    z_t = A_t(h_t),  z_s = A_s(h_s)
    z~  = z_t with z~[block] = z_s[block]
    h~  = A_t^{-1}(z~)

Every alignment function offers ``forward``/``inverse`` (the full map) and the two
operations the interchange actually needs, ``coordinates(h, block)`` and
``substitute(h, block, values)``. The defaults go through the full map; the
orthogonal map overrides them with the closed form of docs/method.md section 3::

    h~ = h + sigma * Q_V (z_s[V] - Q_V^T h'),   h' = (h - mu) / sigma

so it only ever stores and multiplies the ``d x k`` block of columns ``Q_V``.

Kinds, by their ``make_alignment`` name: ``"orthogonal"`` (the default),
``"scaled_orthogonal"`` (``W = S Q^T``), ``"spd"`` (``W = C C^T + eps I``),
``"coupling"`` (additive coupling blocks) and ``"elementwise_inverse"``
(``atanh``/``logit`` before another kind). These go through the full map.

No model code and no training loop live here.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABCMeta, abstractmethod
from collections.abc import Iterator
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

    @property
    def device(self) -> torch.device:
        """Where the map's tensors are (its buffers exist for every kind of map)."""
        return self.mean.device

    # -- the map ----------------------------------------------------------------------

    def set_standardization(self, mean: Tensor, std: Tensor, min_std: float = 1e-6) -> None:
        """Use per-feature ``mean`` and ``std`` (each ``(width,)``) of the model's activations."""
        if mean.shape != (self.width,) or std.shape != (self.width,):
            raise ValueError(f"mean and std must have shape ({self.width},); got {tuple(mean.shape)} and {tuple(std.shape)}")
        for name, values in (("mean", mean), ("std", std)):
            bad = (~torch.isfinite(values)).nonzero().flatten()
            if len(bad):
                raise ValueError(
                    f"the standardisation's {name} is not finite at features {bad[:8].tolist()}: the activations it was "
                    "computed from hold NaN or inf"
                )
        if bool((std < 0).any()):
            raise ValueError(f"the standardisation's std is negative at features {(std < 0).nonzero().flatten()[:8].tolist()}")
        # Copies: the map must not share memory with the caller's tensors (nor two maps with one).
        self.mean = mean.detach().to(self.mean, copy=True)
        self.std = std.detach().clamp(min=min_std).to(self.std, copy=True)

    def fit_standardization(self, activations: Tensor, min_std: float = 1e-6) -> None:
        """Set ``mean`` and ``std`` from sample activations ``(..., width)`` of the model at its site.

        The statistics are per feature over all leading dimensions. Alignments that
        standardise a transform of ``h`` rather than ``h`` itself override this
        (:class:`ElementwiseInverseAlignment` standardises ``f^{-1}(h)``), so callers
        holding raw activations should use this rather than :meth:`set_standardization`.
        """
        if activations.shape[-1] != self.width:
            raise ValueError(f"activations have width {activations.shape[-1]}; this alignment has width {self.width}")
        flat = activations.detach().reshape(-1, self.width)
        if flat.shape[0] < 2:
            raise ValueError(f"a standard deviation needs at least 2 activation vectors; got {flat.shape[0]}")
        self.set_standardization(flat.mean(0), flat.std(0), min_std)

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

    @contextlib.contextmanager
    def computed_once(self) -> Iterator[None]:
        """Within the block, the map's matrix is built from its parameters once, for a forward
        pass that reads with this map and writes with it (DAS: source and target are one model).
        The same values and gradients as building it at each use; nothing is kept after."""
        yield

    def substitute(self, h: Tensor, block: slice, values: Tensor, keep_complement: bool = True) -> Tensor:
        """``A^{-1}(z)`` where ``z = A(h)`` with ``z[..., block] = values``.

        With ``keep_complement=False`` every other coordinate is zero instead
        (stitching: ``A^{-1}`` of ``values`` padded with zeros).
        """
        z = self.forward(h) if keep_complement else h.new_zeros(*h.shape[:-1], self.width)
        start, stop, _ = block.indices(self.width)
        return self.inverse(torch.cat([z[..., :start], values, z[..., stop:]], dim=-1))


class OrthogonalAlignment(AlignmentFunction):
    """``A(h) = Q^T (h - mu) / sigma`` with ``Q`` orthogonal (the default, docs/method.md section 2).

    Only the ``n_aligned`` columns that the variables use are stored and trained,
    parametrised (see ``parametrization`` below) by an unconstrained matrix, e.g.
    ``Q_V = qr(W).Q`` for a ``width x n_aligned`` matrix ``W`` (a QR retraction onto
    the Stiefel manifold, ``O(d k^2)`` per step; the signs are fixed so that ``R``
    has a positive diagonal, which makes the map from ``W`` continuous). The interchange needs nothing else (docs/method.md section 3);
    ``forward`` and ``inverse`` complete the basis when the full map is asked for.

    ``parametrization`` chooses how the ``d x k`` columns are parametrised (all are
    ``O(d k^2)`` per step but for a ``d x d`` product with a fixed rotation):

    - ``"qr"``: the QR retraction above (the default before version 0.2; saves
      made then load with it).
    - ``"householder"`` (the default; it learnt fastest in
      ``benchmarks/bench_parametrizations.py`` and ``bench_das_pyvene.py``): ``Q_V = Q_0 H_1 ... H_k E_k``, ``k`` Householder reflections
      whose vectors are the columns of an unconstrained lower-trapezoidal ``d x k``
      matrix that starts at zero, after a fixed random rotation ``Q_0`` (as
      ``torch.nn.utils.parametrizations.orthogonal`` does for a ``d x k`` weight,
      which is what pyvene's rotated-space interventions use).
    - ``"cayley"``: ``Q_V = Q_0 (I - S/2)^{-1} (I + S/2) E_k`` with ``S`` skew and
      zero outside its first ``k`` rows and columns (``S = P E_k^T - E_k P^T`` for an
      unconstrained ``d x k`` matrix ``P`` that starts at zero), inverted through
      Woodbury's identity in ``O(d k^2)``: a geodesic-like step on the Stiefel manifold.

    ``full_rotation=True`` trains the whole ``width x width`` rotation instead,
    ``Q = Q_0 exp(S - S^T)`` with a fixed random ``Q_0`` (``O(d^3)`` per step), as
    the reference code does with a full orthogonal parametrisation.
    """

    kind = "orthogonal"
    PARAMETRIZATIONS: ClassVar[tuple[str, ...]] = ("qr", "householder", "cayley")

    def __init__(
        self,
        width: int,
        n_aligned: int,
        full_rotation: bool = False,
        generator: torch.Generator | None = None,
        parametrization: str | None = None,
    ) -> None:
        super().__init__(width, n_aligned)
        if full_rotation and parametrization is not None:
            raise ValueError(
                f"full_rotation=True trains the whole rotation through a matrix exponential; it takes no "
                f"parametrization (got {parametrization!r}): leave parametrization out"
            )
        if not full_rotation:
            parametrization = "householder" if parametrization is None else parametrization
            if parametrization not in self.PARAMETRIZATIONS:
                raise ValueError(f"unknown parametrization {parametrization!r}; choose one of {list(self.PARAMETRIZATIONS)}")
        self.full_rotation = full_rotation
        self.parametrization = parametrization  # None for a full rotation
        if full_rotation:
            self.register_buffer("initial_rotation", torch.linalg.qr(torch.randn(width, width, generator=generator)).Q)
            self.skew = nn.Parameter(torch.zeros(width, width))
        elif parametrization == "qr":
            # Start from orthonormal columns: the retraction's step size scales with
            # 1 / |column|, so unit columns make Adam's lr a rotation rate, as with
            # the reference's full orthogonal parametrisation.
            start = torch.linalg.qr(torch.randn(width, max(n_aligned, 1), generator=generator)).Q[:, :n_aligned]
            self.raw_columns = nn.Parameter(start.contiguous())
        else:
            # Both start at the identity (zero parameters) after a fixed random rotation,
            # so the first columns of Q_0 are the initial subspace.
            self.register_buffer("initial_rotation", torch.linalg.qr(torch.randn(width, width, generator=generator)).Q)
            self.generator_columns = nn.Parameter(torch.zeros(width, n_aligned))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "full_rotation": self.full_rotation, "parametrization": self.parametrization}

    @contextlib.contextmanager
    def computed_once(self) -> Iterator[None]:
        if self.__dict__.get("_basis_once") is not None:  # already inside such a block
            yield
            return
        self.__dict__["_basis_once"] = self.basis
        try:
            yield
        finally:
            self.__dict__["_basis_once"] = None

    @property
    def basis(self) -> Tensor:
        """The orthonormal columns, ``(width, n_aligned)``, or ``(width, width)`` for a full rotation."""
        once = self.__dict__.get("_basis_once")
        if once is not None:
            return once
        if self.full_rotation:
            return self.initial_rotation @ torch.linalg.matrix_exp(self.skew - self.skew.T)
        if self.parametrization == "householder":
            return self.initial_rotation @ _householder_columns(self.generator_columns)
        if self.parametrization == "cayley":
            return self.initial_rotation @ _cayley_columns(self.generator_columns)
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


def _householder_columns(vectors: Tensor) -> Tensor:
    """The first ``k`` columns of ``H_1 ... H_k`` for ``vectors`` ``(d, k)``: reflection ``i``
    has the vector ``v_i = e_i + vectors[i+1:, i]`` (entries on and above the diagonal unused).

    With ``H_i = I - 2 v_i v_i^T / |v_i|^2`` the product is ``I - V T V^T`` (the UT
    transform of a block of reflections), ``T`` upper triangular with
    ``T^{-1} = striu(V^T V) + diag(V^T V) / 2``. So the columns are ``E - V T V[:k]^T``:
    two products and a ``k x k`` triangular solve, a few kernels where LAPACK's
    ``orgqr`` (``torch.linalg.householder_product``) applies the ``k`` reflections one
    by one (on an H100, forward and backward at d = 128, k = 16: 1.3 ms against 6.2 ms).
    """
    width, k = vectors.shape
    eye = torch.eye(width, k, dtype=vectors.dtype, device=vectors.device)
    v = vectors.tril(diagonal=-1) + eye
    gram = v.T @ v
    t_inverse = gram.triu(diagonal=1) + 0.5 * torch.diag_embed(gram.diagonal())
    return eye - v @ torch.linalg.solve_triangular(t_inverse, v[:k].T, upper=True)


def _cayley_columns(generator: Tensor) -> Tensor:
    """The first ``k`` columns of the Cayley transform ``(I - S/2)^{-1} (I + S/2)`` of the skew
    ``S = P E^T - E P^T`` (``P = generator``, ``(d, k)``; ``E`` the first ``k`` identity columns),
    in ``O(d k^2)``: ``S = U V^T`` with ``U = [P, -E]``, ``V = [E, P]`` has rank ``2k``, so
    ``(I - U V^T / 2)^{-1} = I + U (2 I - V^T U)^{-1} V^T`` (Woodbury)."""
    width, k = generator.shape
    eye = torch.eye(width, k, dtype=generator.dtype, device=generator.device)
    u = torch.cat([generator, -eye], dim=1)
    v = torch.cat([eye, generator], dim=1)
    right = eye + 0.5 * (u @ (v.T @ eye))  # (I + S/2) E
    small = 2.0 * torch.eye(2 * k, dtype=generator.dtype, device=generator.device) - v.T @ u
    return right + u @ torch.linalg.solve(small, v.T @ right)


# -- general invertible maps (docs/method.md section 2, "other alignment functions") ------------


def _random_rotation(width: int, generator: torch.Generator | None) -> Tensor:
    """A fixed random orthogonal ``(width, width)`` matrix (Q of the QR of a Gaussian matrix)."""
    return torch.linalg.qr(torch.randn(width, width, generator=generator)).Q


class ScaledOrthogonalAlignment(AlignmentFunction):
    """An orthogonal map followed by a learned positive scaling of the aligned coordinates.

    ::

        A(h)      = s * (Q^T h'),          h' = (h - mu) / sigma
        A^{-1}(z) = sigma * Q (z / s) + mu

    i.e. ``W = S Q^T`` with ``S = diag(s)``, ``s = exp(log_scale)`` (positive by
    construction). ``per_feature=True`` learns one scale per aligned coordinate;
    ``per_feature=False`` one scalar for all. ``Q = Q_0 exp(K - K^T)`` is a full
    ``width x width`` rotation with a fixed random ``Q_0`` (as
    ``OrthogonalAlignment(full_rotation=True)``; ``O(d^3)`` per step). At
    initialisation ``s = 1``: the map starts as a random rotation.

    The scale sits on the aligned side so that the value a source writes into a
    block can be rescaled to the target's own magnitude; a rotation alone cannot
    do that. Within one model (source = target) a scalar ``s`` cancels out of the
    interchange; between models only the ratio of the two models' scales matters.
    """

    kind = "scaled_orthogonal"

    def __init__(self, width: int, n_aligned: int, per_feature: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__(width, n_aligned)
        self.per_feature = per_feature
        self.register_buffer("initial_rotation", _random_rotation(width, generator))
        self.skew = nn.Parameter(torch.zeros(width, width))
        self.log_scale = nn.Parameter(torch.zeros(width if per_feature else 1))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "per_feature": self.per_feature}

    @property
    def rotation(self) -> Tensor:
        """``Q``, ``(width, width)`` orthogonal."""
        return self.initial_rotation @ torch.linalg.matrix_exp(self.skew - self.skew.T)

    @property
    def scale(self) -> Tensor:
        """``s``, ``(width,)``, or ``(1,)`` when ``per_feature=False``."""
        return self.log_scale.exp()

    def _forward_standardized(self, h: Tensor) -> Tensor:
        return (h @ self.rotation) * self.scale

    def _inverse_standardized(self, z: Tensor) -> Tensor:
        return (z / self.scale) @ self.rotation.T


class SymmetricPositiveDefiniteAlignment(AlignmentFunction):
    """A symmetric positive-definite linear map, inverted by a Cholesky solve.

    ::

        W         = C C^T + eps I          (C unconstrained, width x width)
        A(h)      = W h',                  h' = (h - mu) / sigma
        A^{-1}(z) = sigma * W^{-1} z + mu  (W = L L^T, two triangular solves)

    ``eps > 0`` keeps every eigenvalue of ``W`` at least ``eps``, so the inverse
    exists whatever ``C`` becomes. ``C`` starts as ``Q_0 diag(sqrt(lambda))`` with
    a random rotation ``Q_0`` and eigenvalues ``lambda`` log-uniform in
    ``[init_condition^{-1/2}, init_condition^{1/2}]``: ``W`` starts well
    conditioned (condition number at most about ``init_condition``) with random
    eigenvectors. (A Gaussian ``C``, as in the reference code, gives ``C C^T``
    eigenvalues down to almost 0, which is why it needs a large ``eps``.)

    A symmetric ``W`` is a stretch along orthogonal axes, not a rotation: its rows
    (the aligned coordinates) are pulled towards the standard basis as ``W``
    approaches a multiple of the identity. The forward map costs ``O(d^2)`` per
    row; each inverse a ``O(d^3)`` Cholesky factorisation.
    """

    kind = "spd"

    def __init__(
        self,
        width: int,
        n_aligned: int,
        eps: float = 1e-3,
        init_condition: float = 4.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(width, n_aligned)
        if not eps > 0:
            raise ValueError(f"eps must be positive (it bounds W's smallest eigenvalue away from 0); got {eps}")
        if not init_condition >= 1:
            raise ValueError(f"init_condition is a condition number and must be >= 1; got {init_condition}")
        self.eps = float(eps)
        self.init_condition = float(init_condition)
        log_eigenvalues = (torch.rand(width, generator=generator) - 0.5) * math.log(init_condition)
        self.factor = nn.Parameter(_random_rotation(width, generator) * (0.5 * log_eigenvalues).exp())

    def config(self) -> dict[str, Any]:
        return {**super().config(), "eps": self.eps, "init_condition": self.init_condition}

    @property
    def matrix(self) -> Tensor:
        """``W = C C^T + eps I``, ``(width, width)`` symmetric positive definite."""
        identity = torch.eye(self.width, dtype=self.factor.dtype, device=self.factor.device)
        return self.factor @ self.factor.T + self.eps * identity

    def _forward_standardized(self, h: Tensor) -> Tensor:
        return h @ self.matrix  # rows: (W h)^T = h^T W because W is symmetric

    def _inverse_standardized(self, z: Tensor) -> Tensor:
        cholesky = torch.linalg.cholesky(self.matrix)
        columns = z.reshape(-1, self.width).T  # cholesky_solve solves W X = B for columns of B
        return torch.cholesky_solve(columns, cholesky).T.reshape(z.shape)


def _mlp(n_in: int, hidden_size: int, n_out: int, generator: torch.Generator | None) -> nn.Sequential:
    """``Linear -> tanh -> Linear``, initialised from ``generator``; the output layer starts at zero."""
    net = nn.Sequential(nn.Linear(n_in, hidden_size), nn.Tanh(), nn.Linear(hidden_size, n_out))
    with torch.no_grad():
        # nn.Linear's own initialisation draws from the global RNG; draw from the
        # alignment's generator instead so that a seed fixes the whole map.
        net[0].weight.copy_(torch.randn(hidden_size, n_in, generator=generator) / math.sqrt(max(n_in, 1)))
        net[0].bias.zero_()
        net[2].weight.zero_()
        net[2].bias.zero_()
    return net


class _AdditiveCoupling(nn.Module):
    """One additive coupling block on ``x = [x1, x2]`` (sizes ``n_first``, ``width - n_first``)::

        y1 = x1 + f(x2),   y2 = x2 + g(y1)         (forward)
        x2 = y2 - g(y1),   x1 = y1 - f(x2)         (inverse, exact)
    """

    def __init__(self, width: int, n_first: int, hidden_size: int, generator: torch.Generator | None) -> None:
        super().__init__()
        self.n_first = n_first
        self.shift_first = _mlp(width - n_first, hidden_size, n_first, generator)  # f
        self.shift_second = _mlp(n_first, hidden_size, width - n_first, generator)  # g

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x[..., : self.n_first], x[..., self.n_first :]
        y1 = x1 + self.shift_first(x2)
        return torch.cat([y1, x2 + self.shift_second(y1)], dim=-1)

    def inverse(self, y: Tensor) -> Tensor:
        y1, y2 = y[..., : self.n_first], y[..., self.n_first :]
        x2 = y2 - self.shift_second(y1)
        return torch.cat([y1 - self.shift_first(x2), x2], dim=-1)


class CouplingAlignment(AlignmentFunction):
    """A reversible residual network of additive coupling blocks (RealNVP-style), then a rotation.

    ::

        x_0 = h' = (h - mu) / sigma
        x_i = B_i(x_{i-1}[P_i])        i = 1..n_blocks, P_i a fixed random permutation
        A(h) = Q^T x_n                 (Q = Q_0 exp(K - K^T); identity if final_rotation=False)

    Each ``B_i`` is an :class:`_AdditiveCoupling` block with two small MLPs
    (``hidden_size`` tanh units). The inverse undoes the steps in reverse order
    and is exact up to rounding (no matrix is inverted). The permutations change
    which features share a half from block to block, so every feature can
    influence every other.

    The MLPs' output layers start at zero, so the blocks start as the identity
    and the whole map starts as ``Q^T`` applied to permuted features: a random
    rotation, like the default orthogonal alignment. (At that point only the
    output layers and ``K`` receive gradient; the hidden layers follow after
    the first step.)

    Odd widths split unevenly (``ceil(d/2)`` and ``floor(d/2)`` features). A
    width of 1 cannot be split and raises ``ValueError``.
    """

    kind = "coupling"

    def __init__(
        self,
        width: int,
        n_aligned: int,
        n_blocks: int = 3,
        hidden_size: int | None = None,
        final_rotation: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(width, n_aligned)
        if width < 2:
            raise ValueError(
                f"coupling blocks split the features into two halves and need width >= 2; got width {width}. "
                "Use alignment='orthogonal' or 'scaled_orthogonal' for a one-dimensional site"
            )
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be at least 1; got {n_blocks}")
        self.n_blocks = n_blocks
        self.hidden_size = hidden_size if hidden_size is not None else max(width, 16)
        if self.hidden_size < 1:
            raise ValueError(f"hidden_size must be positive; got {self.hidden_size}")
        self.final_rotation = final_rotation
        permutations = torch.stack([torch.randperm(width, generator=generator) for _ in range(n_blocks)])
        self.register_buffer("permutations", permutations)
        self.blocks = nn.ModuleList(
            _AdditiveCoupling(width, (width + 1) // 2, self.hidden_size, generator) for _ in range(n_blocks)
        )
        if final_rotation:
            self.register_buffer("initial_rotation", _random_rotation(width, generator))
            self.skew = nn.Parameter(torch.zeros(width, width))

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "n_blocks": self.n_blocks,
            "hidden_size": self.hidden_size,
            "final_rotation": self.final_rotation,
        }

    @property
    def rotation(self) -> Tensor | None:
        """``Q`` ``(width, width)``, or ``None`` without a final rotation."""
        if not self.final_rotation:
            return None
        return self.initial_rotation @ torch.linalg.matrix_exp(self.skew - self.skew.T)

    def _forward_standardized(self, h: Tensor) -> Tensor:
        x = h
        for permutation, block in zip(self.permutations, self.blocks):
            x = block(x[..., permutation])
        rotation = self.rotation
        return x if rotation is None else x @ rotation

    def _inverse_standardized(self, z: Tensor) -> Tensor:
        rotation = self.rotation
        x = z if rotation is None else z @ rotation.T
        for permutation, block in zip(reversed(self.permutations), reversed(self.blocks)):
            x = block.inverse(x)[..., torch.argsort(permutation)]
        return x


# name -> (the nonlinearity f, its inverse f^{-1}, the open range (low, high) of f)
_BOUNDED_NONLINEARITIES: dict[str, tuple[Any, Any, float, float]] = {
    "tanh": (torch.tanh, torch.atanh, -1.0, 1.0),
    "sigmoid": (torch.sigmoid, torch.logit, 0.0, 1.0),
}


class ElementwiseInverseAlignment(AlignmentFunction):
    """Undo a bounded elementwise nonlinearity, then apply an inner alignment.

    For activations ``h = f(u)`` produced by ``f = tanh`` (values in ``(-1, 1)``)
    or ``f = sigmoid`` (values in ``(0, 1)``)::

        A(h)      = B((f^{-1}(h) - mu) / sigma)
        A^{-1}(z) = f(sigma * B^{-1}(z) + mu)

    where ``B`` is the inner alignment's map on standardised values
    (``inner="orthogonal"`` by default, with ``inner_options`` passed to it).

    Standardisation is applied to the unbounded values ``f^{-1}(h)``, after the
    inverse nonlinearity: ``mean`` and ``std`` (this object's buffers) are the
    per-feature mean and std of ``f^{-1}(h)``, not of ``h``. Use
    :meth:`fit_standardization` with raw activations ``h``, which applies
    ``f^{-1}`` first; :meth:`set_standardization` takes the statistics of
    ``f^{-1}(h)`` directly. The inner alignment's own standardisation stays at
    ``0`` and ``1``.

    Values of ``h`` within ``eps`` of an end of ``f``'s range (on either side)
    are moved to ``eps`` inside it before ``f^{-1}`` (saturated units reach
    ``+-1`` exactly in floating point, where ``atanh`` is infinite); so a
    saturated value comes back from ``A^{-1}(A(h))`` changed by at most ``eps``.
    Values further outside raise ``ValueError``: they cannot come from ``f``.

    ``coordinates`` and ``substitute`` use the inner alignment's own (possibly
    closed-form) ones on ``(f^{-1}(h) - mu) / sigma``; this equals the generic
    path through ``forward`` and ``inverse``.
    """

    kind = "elementwise_inverse"

    def __init__(
        self,
        width: int,
        n_aligned: int,
        nonlinearity: str = "tanh",
        inner: str = "orthogonal",
        inner_options: dict[str, Any] | None = None,
        eps: float = 1e-6,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(width, n_aligned)
        if nonlinearity not in _BOUNDED_NONLINEARITIES:
            raise ValueError(f"unknown nonlinearity {nonlinearity!r}; available: {', '.join(sorted(_BOUNDED_NONLINEARITIES))}")
        if inner == self.kind:
            raise ValueError(f"the inner alignment of {self.kind!r} must be another kind (e.g. 'orthogonal')")
        _, _, low, high = _BOUNDED_NONLINEARITIES[nonlinearity]
        if not 0 <= eps < (high - low) / 2:
            raise ValueError(f"eps must be in [0, {(high - low) / 2}) for {nonlinearity} (range ({low:g}, {high:g})); got {eps}")
        self.nonlinearity = nonlinearity
        self.eps = float(eps)
        self.inner_kind = inner
        self.inner_options = dict(inner_options or {})
        self.inner = make_alignment(inner, width, n_aligned, generator=generator, **self.inner_options)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "nonlinearity": self.nonlinearity,
            "inner": self.inner_kind,
            "inner_options": self.inner_options,
            "eps": self.eps,
        }

    def preimage(self, h: Tensor) -> Tensor:
        """``f^{-1}(h)``, after checking that ``h`` lies in ``f``'s range (see the class docstring)."""
        activation, inverse_activation, low, high = _BOUNDED_NONLINEARITIES[self.nonlinearity]
        if self.eps > 0:
            inside = (h >= low - self.eps) & (h <= high + self.eps)
        else:
            inside = (h > low) & (h < high)
        if not bool(inside.all()):
            outside = (~inside).nonzero()
            examples = ", ".join(f"{float(h[tuple(i)]):g} at {tuple(int(j) for j in i)}" for i in outside[:3])
            margin = f" (values within eps={self.eps:g} of an end are clamped)" if self.eps > 0 else ""
            raise ValueError(
                f"{self.nonlinearity} alignment: {len(outside)} of {h.numel()} activation value(s) lie outside the "
                f"range ({low:g}, {high:g}) of {self.nonlinearity}{margin}: {examples}"
                f"{' ...' if len(outside) > 3 else ''}; observed min {float(h.min()):g}, max {float(h.max()):g}. "
                f"Is the site really the output of {self.nonlinearity}?"
            )
        # In half precision 1 - eps rounds back to 1 (where atanh is infinite): clamp in float32.
        work = h.float() if h.is_floating_point() and h.element_size() < 4 else h
        return inverse_activation(work.clamp(low + self.eps, high - self.eps)).to(h.dtype)

    def activation(self, u: Tensor) -> Tensor:
        """``f(u)``."""
        return _BOUNDED_NONLINEARITIES[self.nonlinearity][0](u)

    def fit_standardization(self, activations: Tensor, min_std: float = 1e-6) -> None:
        """Set ``mean`` and ``std`` from raw activations ``h`` ``(..., width)``: statistics of ``f^{-1}(h)``."""
        super().fit_standardization(self.preimage(activations.detach()), min_std)

    def _forward_standardized(self, h: Tensor) -> Tensor:
        return self.inner(h)

    def _inverse_standardized(self, z: Tensor) -> Tensor:
        return self.inner.inverse(z)

    def forward(self, h: Tensor) -> Tensor:
        return self._forward_standardized(self.standardize(self.preimage(h)))

    def inverse(self, z: Tensor) -> Tensor:
        return self.activation(self.unstandardize(self._inverse_standardized(z)))

    def coordinates(self, h: Tensor, block: slice) -> Tensor:
        return self.inner.coordinates(self.standardize(self.preimage(h)), block)

    def substitute(self, h: Tensor, block: slice, values: Tensor, keep_complement: bool = True) -> Tensor:
        unbounded = self.inner.substitute(self.standardize(self.preimage(h)), block, values, keep_complement)
        return self.activation(self.unstandardize(unbounded))


def interchange(
    source_alignment: AlignmentFunction,
    source_hidden: Tensor,
    target_alignment: AlignmentFunction,
    target_hidden: Tensor,
    block: slice,
    keep_complement: bool = True,
) -> Tensor:
    """The interchange intervention of docs/method.md section 3.

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
