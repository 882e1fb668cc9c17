"""Counterfactual latents and the CL auxiliary loss (docs/method.md section 5).

When a model's behaviour cannot be read (a brain, an API model), the interchange
can still be supervised in activation space. The counterfactual latent ``c`` of
a pair is the target model's own natural activation, at the site, for some input
and position whose causal state equals the state the intervention should
produce. The CL loss pulls the intervened activation ``h~_t`` towards ``c``.

Three steps, all plain functions:

1. :func:`find_counterfactual_latents` (any causal model, through a state
   function; ``NumericTask.latent_targets`` for the numeric tasks) chooses,
   for every pair, a ``(pool row, position)`` with the right natural state;
   pairs without one are masked out (:class:`LatentTargets`).
2. :func:`natural_latents` reads the target model's activations there.
3. :func:`cl_loss` compares them with ``h~_t``;
   :func:`symmetric_kl_histogram` and :func:`range_excess` say whether the
   intervention pushed activations off the natural manifold.

Weighting the CL loss against the cross-entropy (the reference's ``epsilon``) and
choosing its directions is the trainer's business, not this module's.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import CounterfactualPairs, ModelInputs, batches, index_inputs, inputs_to

if TYPE_CHECKING:
    from .adapters import ModelAdapter

StateFunction = Callable[[Sequence[int]], Sequence[Any]]
"""Token ids of one (padded) sequence -> the causal state after each token:
a hashable value, or ``None`` where there is no state (padding, special tokens)."""


@dataclass(frozen=True)
class LatentTargets:
    """Where each pair's counterfactual latent is found in a pool of natural sequences.

    Attributes:
        pool_row: ``(N,)`` long: the pool sequence holding pair ``i``'s latent.
        pool_position: ``(N,)`` long: the position in that sequence.
        found: ``(N,)`` bool: ``False`` where no pool position has the state the
            intervention should produce; ``pool_row`` and ``pool_position`` are 0
            there, so they can still index a tensor, and ``found`` is the mask.
        pool_tokens: a SHA-256 of the pool's token ids, so that the CL loss can refuse
            another pool of the same size (``None``: not recorded).
    """

    pool_row: Tensor
    pool_position: Tensor
    found: Tensor
    pool_tokens: str | None = None

    def __len__(self) -> int:
        return self.found.shape[0]

    @property
    def n_found(self) -> int:
        return int(self.found.sum())

    @property
    def n_missing(self) -> int:
        return len(self) - self.n_found


def take_source_state(base_state: Hashable, source_state: Hashable) -> Hashable:
    """The intervened state when the variable is the whole state: the source's."""
    return source_state


def token_fingerprint(inputs: ModelInputs) -> str:
    """A SHA-256 of ``(N, T)`` token ids (a tensor, or the ``"input_ids"`` of a mapping) and their shape."""
    ids = _token_ids(inputs, "pool_inputs")
    digest = hashlib.sha256(str(tuple(ids.shape)).encode())
    digest.update(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _token_ids(inputs: ModelInputs, what: str) -> Tensor:
    if not isinstance(inputs, Tensor):
        if "input_ids" not in inputs:
            raise TypeError(
                f"{what} is a mapping without 'input_ids' (keys: {sorted(inputs)}); the state function needs token ids"
            )
        inputs = inputs["input_ids"]
    if inputs.dim() != 2 or inputs.dtype.is_floating_point:
        raise ValueError(f"{what} must be (N, T) integer token ids; got shape {tuple(inputs.shape)} of {inputs.dtype}")
    return inputs


def _token_rows(inputs: ModelInputs, what: str) -> list[list[int]]:
    """Token ids as lists of ints: a tensor, or the ``"input_ids"`` of a mapping."""
    return _token_ids(inputs, what).tolist()


def find_counterfactual_latents(
    pairs: CounterfactualPairs,
    pool_inputs: ModelInputs,
    state_fn: StateFunction,
    intervened_state: Callable[[Any, Any], Hashable] = take_source_state,
    seed: int = 0,
) -> LatentTargets:
    """For each pair, a natural ``(pool row, position)`` in the state the intervention should produce.

    Pair ``i`` intervenes at ``p = base_positions[i, 0]`` with the value read at
    ``q = source_positions[i, 0]``. Its target state is::

        intervened_state(state_fn(base_inputs[i])[p], state_fn(source_inputs[i])[q])

    and its latent is a position ``(r, t)`` of the pool with
    ``state_fn(pool_inputs[r])[t] == target state``. When several positions
    match, one is drawn with ``random.Random(seed)`` in pair order, so the
    choice is deterministic. Pairs whose target state occurs nowhere in the pool,
    or whose base or source state is ``None``, are marked not found.

    ``state_fn`` is applied to ``base_inputs``: in :class:`CounterfactualPairs`
    they hold the original base up to the intervention position (only what
    follows is the counterfactual continuation), so the state at ``p`` is the
    base's own. Any row of token ids is a natural input, so the pool may be
    fresh samples, the pairs' own source inputs, or both.

    Args:
        pairs: ``N`` pairs with one intervention slot each.
        pool_inputs: ``(M, T_pool)`` token ids (or a mapping with ``"input_ids"``).
        state_fn: tokens of one sequence -> hashable state after each token
            (``None`` for no state), e.g. :meth:`NumericTask.states`.
        intervened_state: ``(base state, source state) -> target state``;
            by default the source's state (the variable is the whole state).
        seed: seed for the choice among matching positions.

    Returns:
        :class:`LatentTargets` with ``(N,)`` tensors.
    """
    if pairs.base_positions.shape[1] != 1:
        raise ValueError(
            f"counterfactual latents are defined here for one intervention slot per pair; these pairs have "
            f"{pairs.base_positions.shape[1]} slots. Split them into single-slot pairs (one per slot), since the "
            "state after intervening at several positions depends on how the interventions combine"
        )
    by_state: dict[Hashable, list[tuple[int, int]]] = {}
    for row, tokens in enumerate(_token_rows(pool_inputs, "pool_inputs")):
        for position, state in enumerate(state_fn(tokens)):
            if state is not None:
                by_state.setdefault(state, []).append((row, position))

    base_rows = _token_rows(pairs.base_inputs, "base_inputs")
    source_rows = _token_rows(pairs.source_inputs, "source_inputs")
    base_positions = pairs.base_positions[:, 0].tolist()
    source_positions = pairs.source_positions[:, 0].tolist()
    rng = random.Random(seed)
    n = len(pairs)
    pool_row, pool_position, found = [0] * n, [0] * n, [False] * n
    for i in range(n):
        base_state = state_fn(base_rows[i])[base_positions[i]]
        source_state = state_fn(source_rows[i])[source_positions[i]]
        if base_state is None or source_state is None:
            continue
        matches = by_state.get(intervened_state(base_state, source_state))
        if matches:
            pool_row[i], pool_position[i] = matches[rng.randrange(len(matches))]
            found[i] = True
    return LatentTargets(
        torch.tensor(pool_row), torch.tensor(pool_position), torch.tensor(found, dtype=torch.bool), token_fingerprint(pool_inputs)
    )


@torch.no_grad()
def natural_latents(
    adapter: ModelAdapter,
    site: str,
    pool_inputs: ModelInputs,
    targets: LatentTargets,
    batch_size: int = 512,
) -> Tensor:
    """The counterfactual latents ``c``: ``(N, width)`` activations of the model at ``site``
    for ``pool_inputs[pool_row[i]]`` at ``pool_position[i]``, without gradient.

    Rows of pairs that were not found hold the activation at pool row 0,
    position 0; mask them with ``targets.found``.
    """
    parts = []
    for index in batches(len(targets), batch_size):
        rows = index_inputs(pool_inputs, targets.pool_row[index])
        positions = targets.pool_position[index, None].to(adapter.device)
        parts.append(adapter.activations(inputs_to(rows, adapter.device), site, positions)[:, 0])
    return torch.cat(parts)


CL_LOSS_KINDS = ("mse", "cosine", "mse_cosine")


def cl_loss(intervened: Tensor, natural: Tensor, kind: str = "mse_cosine", mask: Tensor | None = None) -> Tensor:
    """The counterfactual latent loss between intervened activations and their latents.

    For rows ``i`` (all leading dimensions) with ``mask[i]`` true, ``a = intervened[i]``,
    ``c = natural[i]``, both ``(width,)``::

        mse(i)    = mean_j (a_j - c_j)^2
        cosine(i) = 1 - a.c / max(|a| |c|, 1e-8)
        "mse"        -> mean_i mse(i)
        "cosine"     -> mean_i cosine(i)
        "mse_cosine" -> (mean_i mse(i) + mean_i cosine(i)) / 2   (the default, docs/method.md section 5)

    Args:
        intervened: ``(..., width)`` ``h~_t``, with gradient.
        natural: ``(..., width)`` the latents ``c`` (no gradient needed).
        kind: ``"mse"``, ``"cosine"`` or ``"mse_cosine"``.
        mask: ``(...)`` bool, which rows count (e.g. ``LatentTargets.found``);
            all rows when ``None``.

    Returns:
        A scalar. With no row selected it is 0, still attached to ``intervened``'s
        graph (``backward`` works and gives zero gradients).
    """
    if kind not in CL_LOSS_KINDS:
        raise ValueError(f"unknown CL loss kind {kind!r}; use one of {', '.join(CL_LOSS_KINDS)}")
    if intervened.shape != natural.shape:
        raise ValueError(
            f"intervened activations {tuple(intervened.shape)} and natural latents {tuple(natural.shape)} must have "
            "the same shape: one latent per intervened row"
        )
    if mask is not None:
        if mask.shape != intervened.shape[:-1]:
            raise ValueError(f"mask has shape {tuple(mask.shape)}; it must be one flag per row, {tuple(intervened.shape[:-1])}")
        mask = mask.to(intervened.device, torch.bool)
        intervened, natural = intervened[mask], natural[mask]
    intervened = intervened.reshape(-1, intervened.shape[-1])
    natural = natural.reshape(-1, natural.shape[-1]).to(intervened.device, intervened.dtype)
    if intervened.shape[0] == 0:
        # A sum over no elements: exactly 0, on the graph, and never NaN.
        return intervened.sum()
    mse = (intervened - natural).square().mean()
    if kind == "mse":
        return mse
    cosine = (1 - F.cosine_similarity(intervened, natural, dim=-1, eps=1e-8)).mean()
    if kind == "cosine":
        return cosine
    return (mse + cosine) / 2


def symmetric_kl_histogram(intervened: Tensor, natural: Tensor, bins: int = 50, smoothing: float = 1e-6) -> float:
    """Symmetric KL divergence between the value histograms of ``h~_t`` and of ``c``.

    All values of each tensor (every row and feature, pooled) are binned into
    ``bins`` equal bins over the shared range ``[min, max]`` of both. With
    ``p``, ``q`` the bin frequencies, smoothed as ``p = (p + smoothing) / (1 +
    bins * smoothing)`` so that empty bins stay finite::

        D = KL(p || q) + KL(q || p) = sum_b (p_b - q_b) log(p_b / q_b)

    ``D >= 0``, ``D = 0`` for identical histograms, and ``D`` is symmetric in its
    arguments. Pooling over features compares the overall value distributions;
    standardise the features first if their scales differ a lot.

    Args:
        intervened: ``(..., width)`` intervened activations.
        natural: ``(..., width)`` natural activations (any number of rows).
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1; got {bins}")
    if intervened.numel() == 0 or natural.numel() == 0:
        raise ValueError("symmetric_kl_histogram needs at least one value in each tensor")
    a = intervened.detach().reshape(-1).double()
    b = natural.detach().reshape(-1).double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("symmetric_kl_histogram got non-finite values (inf or NaN)")
    low, high = float(torch.minimum(a.min(), b.min())), float(torch.maximum(a.max(), b.max()))
    if high == low:
        return 0.0  # every value is the same number: one shared bin
    p = torch.histc(a, bins, low, high) / a.numel()
    q = torch.histc(b, bins, low, high) / b.numel()
    p = (p + smoothing) / (1 + bins * smoothing)
    q = (q + smoothing) / (1 + bins * smoothing)
    return float(((p - q) * (p.log() - q.log())).sum())


@dataclass(frozen=True)
class RangeExcess:
    """How far intervened values leave the natural values' range, in natural stds.

    Attributes:
        per_feature: ``(width,)`` ``e_j`` (see :func:`range_excess`).
        max: ``max_j e_j``.
        mean: ``mean_j e_j`` (over all features, including those with ``e_j = 0``).
    """

    per_feature: Tensor
    max: float
    mean: float


def range_excess(intervened: Tensor, natural: Tensor) -> RangeExcess:
    """The distance by which ``h~_t``'s extremes leave ``c``'s range, per feature, in stds of ``c``.

    For feature ``j``, with ``lo_j``, ``hi_j``, ``sd_j`` the min, max and (unbiased)
    std of ``natural[..., j]`` over all rows::

        e_j = max(0, max_i a_ij - hi_j, lo_j - min_i a_ij) / sd_j      (a = intervened)

    so ``e_j = 0`` when every intervened value lies within the natural range,
    and ``e_j = 2`` when the furthest one is two natural stds beyond it. A
    feature that is constant in ``natural`` (``sd_j = 0``) gives ``inf`` if it is
    exceeded at all, else 0.

    Args:
        intervened: ``(..., width)``.
        natural: ``(..., width)``, at least two rows.
    """
    a = intervened.detach().reshape(-1, intervened.shape[-1]).double()
    c = natural.detach().reshape(-1, natural.shape[-1]).double()
    if a.shape[1] != c.shape[1]:
        raise ValueError(f"intervened width {a.shape[1]} and natural width {c.shape[1]} differ")
    if a.shape[0] == 0 or c.shape[0] < 2:
        raise ValueError(f"range_excess needs intervened rows and at least 2 natural rows; got {a.shape[0]} and {c.shape[0]}")
    beyond = torch.clamp(torch.maximum(a.max(0).values - c.max(0).values, c.min(0).values - a.min(0).values), min=0)
    std = c.std(0)
    per_feature = torch.where(beyond > 0, beyond / std, torch.zeros_like(beyond))  # beyond / 0 -> inf, as documented
    return RangeExcess(per_feature, float(per_feature.max()), float(per_feature.mean()))


__all__ = [
    "CL_LOSS_KINDS",
    "LatentTargets",
    "RangeExcess",
    "StateFunction",
    "cl_loss",
    "find_counterfactual_latents",
    "natural_latents",
    "range_excess",
    "symmetric_kl_histogram",
    "take_source_state",
]
