"""Representational similarity analysis: RDMs and their comparison (docs/method.md section 8)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Literal, get_args

import numpy as np
import scipy.stats
import torch
from torch import Tensor

from ._common import (
    ArrayLike,
    _as_sample_matrices,
    _check_choice,
    _numpy_view,
    _squared_distances,
    _upper_triangle,
    _upper_triangle_numpy,
)

RDMMetric = Literal["correlation", "cosine", "euclidean", "sqeuclidean"]
RDMComparison = Literal["spearman", "pearson", "kendall", "cosine"]
RDM_METRICS: tuple[RDMMetric, ...] = get_args(RDMMetric)
RDM_COMPARISONS: tuple[RDMComparison, ...] = get_args(RDMComparison)


def rdm(X: ArrayLike, metric: RDMMetric = "correlation") -> Tensor:
    """Representational dissimilarity matrix between the samples (rows) of X.

    Args:
        X: (N, d) activations, samples as rows.
        metric: dissimilarity between rows x_i, x_j:
            * ``"correlation"``: 1 - Pearson(x_i, x_j), in [0, 2]; invariant to
              per-row shift and scale. Rows must not be constant.
            * ``"cosine"``: 1 - <x_i, x_j> / (||x_i|| ||x_j||), in [0, 2]; invariant
              to per-row scale. Rows must not be zero.
            * ``"euclidean"``: ||x_i - x_j||, in [0, inf).
            * ``"sqeuclidean"``: ||x_i - x_j||^2, in [0, inf). (rsatoolbox's
              "euclidean" is this divided by d.)
            Both Euclidean forms are invariant to rotation and shift of the features.

    Returns:
        (N, N) symmetric tensor with zero diagonal, in X's dtype and device.
    """
    _check_choice(metric, RDM_METRICS, "RDM metric")
    (X,) = _as_sample_matrices([X], ["X"], measure="rdm", min_samples=2)
    return _rdm(X, metric, "X")


def _rdm(X: Tensor, metric: str, name: str) -> Tensor:
    if metric in ("correlation", "cosine"):
        unit_rows = _unit_rows(X, metric, name)
        dissimilarity = 1.0 - unit_rows @ unit_rows.T
        dissimilarity = 0.5 * (dissimilarity + dissimilarity.T)
        dissimilarity.fill_diagonal_(0.0)
        return dissimilarity
    if metric == "sqeuclidean":
        return _squared_distances(X)
    return _squared_distances(X).sqrt()  # "euclidean"


def _unit_rows(X: Tensor | np.ndarray, metric: str, name: str = "X") -> Tensor | np.ndarray:
    """Rows centred (correlation) and scaled to unit norm; raises on degenerate rows.

    A row is constant when its values are equal, checked on the row itself: centring a
    constant that floats cannot hold (0.1) leaves rounding noise with a norm above 0."""
    if isinstance(X, np.ndarray):
        rows = X - X.mean(axis=1, keepdims=True) if metric == "correlation" else X
        norms = np.linalg.norm(rows, axis=1)
        bad = (norms == 0) | ((X == X[:, :1]).all(axis=1) if metric == "correlation" else False)
    else:
        rows = X - X.mean(dim=1, keepdim=True) if metric == "correlation" else X
        norms = torch.linalg.vector_norm(rows, dim=1)
        bad = (norms == 0) | ((X == X[:, :1]).all(dim=1) if metric == "correlation" else False)
    degenerate = int(bad.sum())
    if degenerate:
        kind = "constant" if metric == "correlation" else "all-zero"
        raise ValueError(
            f"rdm(metric={metric!r}) is undefined for {kind} rows; {name} has {degenerate} such rows: drop them, "
            f"or use metric='euclidean'"
        )
    return rows / norms[:, None]


def _condensed_rdm_numpy(X: np.ndarray, metric: str, name: str = "X") -> np.ndarray:
    """The upper triangle of rdm(X, metric) (row by row), on CPU through numpy's BLAS.

    U U^T and S S^T are symmetric rank-k updates (half a general product), and only
    the upper triangle is kept; the values equal those of :func:`rdm`.
    """
    if metric in ("correlation", "cosine"):
        unit_rows = _unit_rows(X, metric, name)
        similarity = _upper_triangle_numpy(unit_rows @ unit_rows.T)
        return np.subtract(1.0, similarity, out=similarity)
    wide = X.astype(np.float64, copy=False)  # float32 would cancel: see _squared_distances
    shifted = wide - wide[:1]
    gram = shifted @ shifted.T
    row_norms = gram.diagonal().copy()
    squared = row_norms[:, None] + row_norms[None, :]
    squared -= 2.0 * gram
    condensed = _upper_triangle_numpy(squared)
    np.maximum(condensed, 0.0, out=condensed)
    if metric == "euclidean":
        np.sqrt(condensed, out=condensed)
    return condensed


def _average_ranks_numpy(values: np.ndarray) -> np.ndarray:
    """Average ranks (scipy.stats.rankdata 'average') with one integer sort.

    Each float64 value is mapped to an order-preserving int64 key; its low bits are
    replaced by the element's index, so one sort of int64 keys (numpy's vectorised
    quicksort, much faster than an argsort) yields the order. Elements whose keys
    agree after truncation are then put in order by their full values, and tied
    values get the mean of their ranks.
    """
    count = values.size
    values = np.ascontiguousarray(values, dtype=np.float64)
    index_bits = max(1, (count - 1).bit_length())
    low_mask = np.int64((1 << index_bits) - 1)
    keys = (values + 0.0).view(np.int64)  # + 0.0 turns -0.0 into +0.0
    if values.min() < 0:
        keys ^= (keys >> 63) & np.int64(0x7FFFFFFFFFFFFFFF)  # negatives: reverse their order
    keys &= ~low_mask
    keys |= np.arange(count, dtype=np.int64)
    keys.sort()
    order = keys & low_mask
    # Neighbours share their truncated key iff their XOR (as unsigned) is below 2^index_bits.
    neighbours = np.bitwise_xor(keys[1:], keys[:-1]).view(np.uint64)
    same_truncated = neighbours <= np.uint64(low_mask)
    rank_at_position = np.arange(1, count + 1, dtype=np.float64)
    if same_truncated.any():
        truncated = keys >> index_bits
        in_group = np.zeros(count, dtype=bool)
        in_group[:-1] |= same_truncated
        in_group[1:] |= same_truncated
        positions = np.flatnonzero(in_group)
        group_order = order[positions]
        group_values = values[group_order]
        resort = np.lexsort((group_values, truncated[positions]))
        order[positions] = group_order[resort]
        group_values = group_values[resort]
        # Ties have equal truncated keys, so they lie in one group, at consecutive positions.
        tied = (group_values[1:] == group_values[:-1]) & (positions[1:] == positions[:-1] + 1)
        if tied.any():
            run_start = np.concatenate(([True], ~tied))
            run_id = np.cumsum(run_start) - 1
            first = positions[run_start]
            last = positions[np.concatenate((run_start[1:], [True]))]
            rank_at_position[positions] = ((first + last) / 2.0 + 1.0)[run_id]
    ranks = np.empty(count, dtype=np.float64)
    ranks[order] = rank_at_position
    return ranks


_CONSTANT_RDM = "correlation is undefined: one RDM has all off-diagonal dissimilarities equal"


def _pearson_numpy(u: np.ndarray, v: np.ndarray) -> float:
    # Equal values centred on their float mean leave rounding noise, not zeros: test them as they are.
    if np.ptp(u) == 0 or np.ptp(v) == 0:
        raise ValueError(_CONSTANT_RDM)
    u = u - u.mean()
    v = v - v.mean()
    norm_u, norm_v = float(np.linalg.norm(u)), float(np.linalg.norm(v))
    if norm_u == 0.0 or norm_v == 0.0:
        raise ValueError(
            "correlation is undefined: one RDM has all off-diagonal dissimilarities equal"
        )
    return float(u @ v) / (norm_u * norm_v)


def _cosine_numpy(u: np.ndarray, v: np.ndarray) -> float:
    norms = float(np.linalg.norm(u)) * float(np.linalg.norm(v))
    if norms == 0.0:
        raise ValueError("cosine is undefined for an all-zero dissimilarity vector")
    return float(u @ v) / norms


def _kendall(u_np: np.ndarray, v_np: np.ndarray) -> float:
    if np.ptp(u_np) == 0 or np.ptp(v_np) == 0:
        raise ValueError("Kendall tau is undefined: one RDM has all off-diagonal dissimilarities equal")
    return float(scipy.stats.kendalltau(u_np, v_np).statistic)


def _compare_condensed_numpy(u: np.ndarray, v: np.ndarray, method: str) -> float:
    if method == "pearson":
        return _pearson_numpy(u, v)
    if method == "spearman":
        return _pearson_numpy(_average_ranks_numpy(u), _average_ranks_numpy(v))
    if method == "cosine":
        return _cosine_numpy(u, v)
    return _kendall(u, v)


def _average_ranks(values: Tensor) -> Tensor:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata 'average')."""
    # Tied values form one group whatever their order, so an unstable sort is fine.
    sorted_values, order = torch.sort(values)
    _, group_of_sorted, group_sizes = torch.unique_consecutive(
        sorted_values, return_inverse=True, return_counts=True
    )
    group_last = torch.cumsum(group_sizes, dim=0).to(values.dtype)
    group_mean_rank = group_last - (group_sizes.to(values.dtype) - 1) / 2
    return torch.empty_like(values).scatter_(0, order, group_mean_rank[group_of_sorted])


def _cosine(u: Tensor, v: Tensor) -> float:
    norms = torch.linalg.vector_norm(u) * torch.linalg.vector_norm(v)
    if float(norms) == 0.0:
        raise ValueError("cosine is undefined for an all-zero dissimilarity vector")
    return float((u @ v) / norms)


def _pearson(u: Tensor, v: Tensor) -> float:
    if bool(u.max() == u.min()) or bool(v.max() == v.min()):
        raise ValueError(_CONSTANT_RDM)
    u = u - u.mean()
    v = v - v.mean()
    if float(torch.linalg.vector_norm(u)) == 0.0 or float(torch.linalg.vector_norm(v)) == 0.0:
        raise ValueError(
            "correlation is undefined: one RDM has all off-diagonal dissimilarities equal"
        )
    return _cosine(u, v)


def compare_rdms(rdm_x: ArrayLike, rdm_y: ArrayLike, method: RDMComparison = "spearman") -> float:
    """Similarity of two RDMs over their upper triangles (diagonal excluded).

    Args:
        rdm_x, rdm_y: (N, N) dissimilarity matrices over the same N samples, N >= 3.
        method:
            * ``"spearman"``: Pearson correlation of the average ranks, in [-1, 1].
            * ``"pearson"``: Pearson correlation, in [-1, 1].
            * ``"kendall"``: Kendall tau-b (ties corrected; scipy.stats.kendalltau,
              computed on CPU in O(M log M) for M = N(N-1)/2 pairs), in [-1, 1].
              Equal to tau-a when there are no ties.
            * ``"cosine"``: <u, v> / (||u|| ||v||) of the raw vectors, in [-1, 1]
              (in [0, 1] for non-negative dissimilarities).

    Returns:
        A similarity (1 = identical ordering/shape). Rank measures are invariant
        to any increasing transform of either RDM; Pearson to positive affine
        transforms; cosine to positive scaling.
    """
    _check_choice(method, RDM_COMPARISONS, "RDM comparison")
    rdm_x, rdm_y = _as_sample_matrices(
        [rdm_x, rdm_y], ["rdm_x", "rdm_y"], measure="compare_rdms", min_samples=3
    )
    for matrix, name in ((rdm_x, "rdm_x"), (rdm_y, "rdm_y")):
        if matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"compare_rdms: {name} must be square (N, N); got {tuple(matrix.shape)}")
        # Only the upper triangle is read: a matrix that is not a dissimilarity matrix would be
        # compared without a word.
        scale = float(matrix.abs().max())
        if float(matrix.diagonal().abs().max()) > 1e-6 * scale or float((matrix - matrix.T).abs().max()) > 1e-6 * scale:
            raise ValueError(
                f"compare_rdms: {name} is not a dissimilarity matrix (it must be symmetric with a zero diagonal, "
                "within 1e-6 of its largest value); "
                "build it with rdm(X, metric)"
            )
    x_np, y_np = _numpy_view(rdm_x), _numpy_view(rdm_y)
    if x_np is not None and y_np is not None:
        return _compare_condensed_numpy(_upper_triangle_numpy(x_np), _upper_triangle_numpy(y_np), method)
    u, v = _upper_triangle(rdm_x), _upper_triangle(rdm_y)
    if method == "pearson":
        return _pearson(u, v)
    if method == "spearman":
        return _pearson(_average_ranks(u), _average_ranks(v))
    if method == "cosine":
        return _cosine(u, v)
    # Kendall tau-b: scipy's O(M log M) algorithm, on CPU.
    return _kendall(u.cpu().numpy(), v.cpu().numpy())


def rsa(
    X: ArrayLike,
    Y: ArrayLike,
    *,
    metric: RDMMetric = "correlation",
    comparison: RDMComparison = "spearman",
) -> float:
    """Representational similarity analysis: ``compare_rdms(rdm(X, metric), rdm(Y, metric), comparison)``.

    Args:
        X: (N, d_x) activations; Y: (N, d_y) activations of the same N inputs, N >= 3.
        metric, comparison: see :func:`rdm` and :func:`compare_rdms`.

    Returns:
        A similarity in [-1, 1] (1 = same dissimilarity structure). Invariances are
        those of the RDM metric (e.g. rotation, shift and isotropic scaling of the
        features for "euclidean"; per-row shift and scale for "correlation")
        combined with those of the comparison. Builds two N x N matrices.
    """
    _check_choice(metric, RDM_METRICS, "RDM metric")
    _check_choice(comparison, RDM_COMPARISONS, "RDM comparison")
    X, Y = _as_sample_matrices([X, Y], ["X", "Y"], measure="rsa", min_samples=3)
    X_np, Y_np = _numpy_view(X), _numpy_view(Y)
    if X_np is not None and Y_np is not None:
        # CPU: only the upper triangles are kept (no N x N RDM is returned).
        u, v = _condensed_rdm_numpy(X_np, metric, "X"), _condensed_rdm_numpy(Y_np, metric, "Y")
        if comparison == "spearman" and u.size >= 100_000 and torch.get_num_threads() >= 2:
            # The two rankings are independent and numpy's sort releases the GIL.
            with ThreadPoolExecutor(max_workers=2) as pool:
                ranks_u, ranks_v = pool.map(_average_ranks_numpy, (u, v))
            return _pearson_numpy(ranks_u, ranks_v)
        return _compare_condensed_numpy(u, v, comparison)
    return compare_rdms(_rdm(X, metric, "X"), _rdm(Y, metric, "Y"), comparison)
