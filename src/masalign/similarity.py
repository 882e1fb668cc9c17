"""Correlational and dynamical similarity measures between two networks' activations.

These are the baselines that MAS (METHOD.md section 8) is put side by side with:
RSA, CKA (linear, debiased, RBF, angular), Procrustes (Euclidean and angular),
Normalized Bures Similarity, cross-validated ridge regression, and Dynamical
Similarity Analysis (DSA).

Public API (s: similarity, higher = more alike; d: distance, lower = more alike)
    RSA          rdm (N x N dissimilarities), compare_rdms (s), rsa (s)
    CKA          linear_cka (s), rbf_cka (s), angular_cka_distance (d)
    Procrustes   procrustes_distance (d), procrustes_angular_distance (d),
                 normalized_bures_similarity (s)
    Regression   ridge_r2(source, target) (s), one direction per call
    DSA          delay_embed, havok_operator, align_operators (d),
                 spectral_wasserstein_distance (d), DSA (d)
    All at once  compare_all(X, Y) -> dict[str, float]

Conventions (checked at the boundary of every public function)
----------------------------------------------------------------
* Activations are matrices with **samples as rows**: ``X`` is ``(N, d_x)`` and
  ``Y`` is ``(N, d_y)``. Row ``i`` of ``X`` and row ``i`` of ``Y`` are the same
  input seen by the two networks (the data are *paired*); widths may differ.
* Inputs may be numpy arrays or torch tensors (CPU or CUDA). Computation happens
  on the tensors' device; numpy inputs join the device of a tensor argument.
  Floating dtypes are kept (float64 stays float64; float16/bfloat16 are promoted
  to float32); integer and boolean inputs become float64. Two inputs of
  different floating dtypes are promoted to the wider one.
* Inputs are never modified, and gradients are not tracked (inputs are detached).
* Scalar measures are returned as Python floats. Each docstring states whether
  the result is a similarity or a distance, its range and its invariances.
* Errors are ``ValueError`` with the offending shape or count in the message:
  wrong number of dimensions, unequal sample counts, NaN/inf, too few samples.

DSA is the exception to pairing: it compares two dynamical systems, so each
system is given as its own trials, ``(trials, T, d)`` or a list of ``(T_i, d)``
arrays, and the two systems need not share trials, lengths or widths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import scipy.optimize
import scipy.sparse
import scipy.stats
import torch
from torch import Tensor

ArrayLike = np.ndarray | Tensor
RDMMetric = Literal["correlation", "cosine", "euclidean", "sqeuclidean"]
RDMComparison = Literal["spearman", "pearson", "kendall", "cosine"]
DSAScoreMethod = Literal["angular", "euclidean", "wasserstein"]
RDM_METRICS: tuple[RDMMetric, ...] = get_args(RDMMetric)
RDM_COMPARISONS: tuple[RDMComparison, ...] = get_args(RDMComparison)
DSA_SCORE_METHODS: tuple[DSAScoreMethod, ...] = get_args(DSAScoreMethod)

__all__ = [
    "ArrayLike",
    "rdm",
    "compare_rdms",
    "rsa",
    "linear_cka",
    "rbf_cka",
    "angular_cka_distance",
    "procrustes_distance",
    "procrustes_angular_distance",
    "normalized_bures_similarity",
    "ridge_r2",
    "delay_embed",
    "havok_operator",
    "OperatorAlignment",
    "align_operators",
    "spectral_wasserstein_distance",
    "DSA",
    "compare_all",
]


# --------------------------------------------------------------------------- #
# Boundary checks and conversions
# --------------------------------------------------------------------------- #


def _to_tensor(data: ArrayLike, name: str, device: torch.device | None = None) -> Tensor:
    """Convert to a floating tensor without copying when possible (never written to)."""
    if isinstance(data, Tensor):
        tensor = data.detach()
    else:
        tensor = torch.as_tensor(np.asarray(data), device=device)
    if tensor.is_complex():
        raise ValueError(f"{name} must be real-valued; got dtype {tensor.dtype}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float64)
    elif tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def _common_device(arrays: Sequence[ArrayLike], names: Sequence[str]) -> torch.device | None:
    devices = {(name, a.device) for name, a in zip(names, arrays, strict=True) if isinstance(a, Tensor)}
    distinct = {device for _, device in devices}
    if len(distinct) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in sorted(devices, key=str))
        raise ValueError(f"inputs are on different devices ({listed}); move them to one device")
    return distinct.pop() if distinct else None


def _as_sample_matrices(
    arrays: Sequence[ArrayLike],
    names: Sequence[str],
    *,
    measure: str,
    min_samples: int = 2,
) -> list[Tensor]:
    """The one boundary check for paired (samples, features) matrices.

    Returns tensors on one device with one floating dtype. Raises ValueError when
    a matrix is not 2-D, has no features, the sample counts differ, a value is not
    finite, or there are fewer than ``min_samples`` rows.
    """
    device = _common_device(arrays, names)
    tensors = [_to_tensor(a, f"{measure}: {name}", device) for a, name in zip(arrays, names, strict=True)]
    for tensor, name in zip(tensors, names, strict=True):
        if tensor.ndim != 2:
            raise ValueError(
                f"{measure}: {name} must be a 2-D (samples, features) matrix; "
                f"got shape {tuple(tensor.shape)}"
            )
        if tensor.shape[1] == 0:
            raise ValueError(f"{measure}: {name} has no features (shape {tuple(tensor.shape)})")
    counts = [t.shape[0] for t in tensors]
    if len(set(counts)) > 1:
        listed = ", ".join(f"{name} has {n}" for name, n in zip(names, counts, strict=True))
        raise ValueError(
            f"{measure}: inputs must have the same number of samples (rows), "
            f"paired row by row; {listed}"
        )
    if counts[0] < min_samples:
        raise ValueError(f"{measure} needs at least {min_samples} samples; got {counts[0]}")
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return [t.to(dtype) for t in tensors]


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(map(repr, allowed))}")


def _centre_columns(X: Tensor) -> Tensor:
    return X - X.mean(dim=0, keepdim=True)


def _reduce_width(X: Tensor) -> Tensor:
    """Rotate a wide matrix (N < d) onto an N-column basis: returns X Q with Q^T Q = I.

    X Q has the same Gram matrix X X^T, so every measure that only sees X through
    X X^T (linear CKA, Procrustes, NBS) is unchanged, while d x d products shrink
    to N x N. This keeps the feature-space formulas cheap for every shape.
    """
    n_samples, width = X.shape
    if width <= n_samples:
        return X
    # QR of X^T (d x N): X^T = Q R, so X Q = R^T, an (N x N) matrix.
    _, r_factor = torch.linalg.qr(X.T, mode="reduced")
    return r_factor.T


def _squared_distances(X: Tensor) -> Tensor:
    """Squared Euclidean distances between rows, (N, N), exact zeros on the diagonal."""
    # Translating by one sample leaves the distances unchanged, reduces cancellation
    # for data far from the origin and keeps small integer-valued data exact (so
    # tied distances stay tied for the rank comparisons).
    shifted = X - X[:1]
    gram = shifted @ shifted.T
    row_norms = gram.diagonal()
    squared = row_norms[:, None] + row_norms[None, :] - 2.0 * gram
    squared.clamp_(min=0.0)
    squared.fill_diagonal_(0.0)
    return squared


def _upper_triangle(matrix: Tensor) -> Tensor:
    rows, cols = torch.triu_indices(matrix.shape[0], matrix.shape[1], offset=1, device=matrix.device)
    return matrix[rows, cols]


def _median(values: Tensor) -> Tensor:
    """Median with the two middle values averaged for even counts (as numpy does)."""
    count = values.numel()
    lower = torch.kthvalue(values, (count + 1) // 2).values
    upper = torch.kthvalue(values, count // 2 + 1).values
    return (lower + upper) / 2


# --------------------------------------------------------------------------- #
# RSA
# --------------------------------------------------------------------------- #


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
    if metric in ("correlation", "cosine"):
        rows = X - X.mean(dim=1, keepdim=True) if metric == "correlation" else X
        norms = torch.linalg.vector_norm(rows, dim=1)
        degenerate = int((norms == 0).sum())
        if degenerate:
            kind = "constant" if metric == "correlation" else "all-zero"
            raise ValueError(
                f"rdm(metric={metric!r}) is undefined for {kind} rows; X has {degenerate} such rows"
            )
        unit_rows = rows / norms[:, None]
        dissimilarity = 1.0 - unit_rows @ unit_rows.T
        dissimilarity = 0.5 * (dissimilarity + dissimilarity.T)
        dissimilarity.fill_diagonal_(0.0)
        return dissimilarity
    if metric == "sqeuclidean":
        return _squared_distances(X)
    return _squared_distances(X).sqrt()  # "euclidean"


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
    u, v = _upper_triangle(rdm_x), _upper_triangle(rdm_y)
    if method == "pearson":
        return _pearson(u, v)
    if method == "spearman":
        return _pearson(_average_ranks(u), _average_ranks(v))
    if method == "cosine":
        return _cosine(u, v)
    # Kendall tau-b: scipy's O(M log M) algorithm, on CPU.
    u_np, v_np = u.cpu().numpy(), v.cpu().numpy()
    if np.ptp(u_np) == 0 or np.ptp(v_np) == 0:
        raise ValueError("Kendall tau is undefined: one RDM has all off-diagonal dissimilarities equal")
    return float(scipy.stats.kendalltau(u_np, v_np).statistic)


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
    return compare_rdms(rdm(X, metric), rdm(Y, metric), comparison)


# --------------------------------------------------------------------------- #
# CKA
# --------------------------------------------------------------------------- #


def _unbiased_hsic_from_parts(
    cross: Tensor,
    diag_x: Tensor,
    diag_y: Tensor,
    row_sums_x: Tensor,
    row_sums_y: Tensor,
) -> Tensor:
    """Song et al. (2012) unbiased HSIC from the pieces of two kernel matrices K, L.

    With K~, L~ the kernels with zeroed diagonals and n samples:
        HSIC_1 = [tr(K~ L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))
    Args: cross = tr(K L) = sum_ij K_ij L_ij; diag_x, diag_y: (n,) diagonals of K, L;
    row_sums_x, row_sums_y: (n,) row sums K 1, L 1.
    """
    n = diag_x.shape[0]
    trace_term = cross - (diag_x * diag_y).sum()
    offdiag_row_sums_x = row_sums_x - diag_x
    offdiag_row_sums_y = row_sums_y - diag_y
    total_x = offdiag_row_sums_x.sum()
    total_y = offdiag_row_sums_y.sum()
    return (
        trace_term
        + total_x * total_y / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (offdiag_row_sums_x @ offdiag_row_sums_y)
    ) / (n * (n - 3))


def _linear_unbiased_hsic(X: Tensor, Y: Tensor) -> Tensor:
    """Unbiased HSIC for the linear kernels X X^T, Y Y^T without forming them (O(N d) memory)."""
    cross = (Y.T @ X).square().sum()
    row_sums_x = X @ X.sum(dim=0)
    row_sums_y = Y @ Y.sum(dim=0)
    return _unbiased_hsic_from_parts(
        cross, (X * X).sum(dim=1), (Y * Y).sum(dim=1), row_sums_x, row_sums_y
    )


def _cka_ratio(cross: Tensor, self_x: Tensor, self_y: Tensor, measure: str) -> float:
    for value, name in ((self_x, "X"), (self_y, "Y")):
        if float(value) <= 0.0:
            raise ValueError(
                f"{measure} is undefined: the HSIC of {name} with itself is {float(value):.3g} "
                f"(constant {name}, or too few samples for the debiased estimator)"
            )
    return float(cross / torch.sqrt(self_x * self_y))


def linear_cka(X: ArrayLike, Y: ArrayLike, *, debiased: bool = False) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019).

    On column-centred X (N, d_x) and Y (N, d_y):
        CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
            = HSIC(XX^T, YY^T) / sqrt(HSIC(XX^T, XX^T) HSIC(YY^T, YY^T)),
    computed in feature space (no N x N Gram matrix; wide inputs with d > N are
    first rotated onto N columns, which leaves every term unchanged).

    Args:
        X, Y: paired activations, N >= 2 (N >= 4 when debiased).
        debiased: replace each HSIC by the unbiased estimator of Song et al. (2012),
            also evaluated in feature space. Removes the upward bias of CKA when d
            is large relative to N (independent data then score near 0).

    Returns:
        A similarity. Biased: in [0, 1]. Debiased: in [-1, 1] (the unbiased HSIC is
        an inner product of U-centred kernels), near 0 for independent data.
        Invariant to orthogonal transforms, isotropic scaling and shifts of either
        X or Y; not invariant to anisotropic scaling or general invertible maps.
    """
    n_needed = 4 if debiased else 2
    X, Y = _as_sample_matrices([X, Y], ["X", "Y"], measure="linear_cka", min_samples=n_needed)
    Xc = _reduce_width(_centre_columns(X))
    Yc = _reduce_width(_centre_columns(Y))
    if debiased:
        return _cka_ratio(
            _linear_unbiased_hsic(Xc, Yc),
            _linear_unbiased_hsic(Xc, Xc),
            _linear_unbiased_hsic(Yc, Yc),
            "debiased linear_cka",
        )
    cross = (Yc.T @ Xc).square().sum()
    self_x = (Xc.T @ Xc).square().sum()
    self_y = (Yc.T @ Yc).square().sum()
    return _cka_ratio(cross, self_x, self_y, "linear_cka")


def _rbf_gram(X: Tensor, sigma_fraction: float) -> Tensor:
    squared = _squared_distances(X)
    median_distance = _median(_upper_triangle(squared).sqrt())
    if float(median_distance) == 0.0:
        raise ValueError("rbf_cka: the median distance between samples is 0 (mostly repeated rows)")
    sigma = sigma_fraction * median_distance
    return torch.exp(-squared / (2.0 * sigma * sigma))


def rbf_cka(
    X: ArrayLike, Y: ArrayLike, *, sigma_fraction: float = 1.0, debiased: bool = False
) -> float:
    """CKA with Gaussian (RBF) kernels.

    K_ij = exp(-||x_i - x_j||^2 / (2 sigma_X^2)) with sigma_X = sigma_fraction times
    the median distance between distinct samples of X (likewise L for Y), and
        CKA = <HKH, HLH>_F / (||HKH||_F ||HLH||_F),  H = I - 11^T / N.

    Args:
        X, Y: paired activations, N >= 2 (N >= 4 when debiased).
        sigma_fraction: bandwidth as a fraction of the median distance (> 0).
        debiased: use the unbiased HSIC estimator (Song et al. 2012).

    Returns:
        A similarity in [0, 1] (debiased: in [-1, 1], near 0 for independent data).
        Invariant to orthogonal transforms, shifts and isotropic scaling (the
        bandwidth follows the median distance). Builds N x N matrices.
    """
    if not sigma_fraction > 0:
        raise ValueError(f"rbf_cka: sigma_fraction must be > 0; got {sigma_fraction}")
    n_needed = 4 if debiased else 2
    X, Y = _as_sample_matrices([X, Y], ["X", "Y"], measure="rbf_cka", min_samples=n_needed)
    K, L = _rbf_gram(X, sigma_fraction), _rbf_gram(Y, sigma_fraction)
    if debiased:

        def hsic(a: Tensor, b: Tensor) -> Tensor:
            return _unbiased_hsic_from_parts(
                (a * b).sum(), a.diagonal(), b.diagonal(), a.sum(dim=1), b.sum(dim=1)
            )

        return _cka_ratio(hsic(K, L), hsic(K, K), hsic(L, L), "debiased rbf_cka")

    def double_centre(gram: Tensor) -> Tensor:
        return gram - gram.mean(dim=0, keepdim=True) - gram.mean(dim=1, keepdim=True) + gram.mean()

    Kc, Lc = double_centre(K), double_centre(L)
    return _cka_ratio((Kc * Lc).sum(), Kc.square().sum(), Lc.square().sum(), "rbf_cka")


def angular_cka_distance(X: ArrayLike, Y: ArrayLike) -> float:
    """arccos(linear CKA): the angle between the centred Gram matrices XX^T and YY^T.

    Args:
        X, Y: paired activations (N, d_x), (N, d_y), N >= 2.

    Returns:
        A distance in [0, pi/2]; a metric on representations up to rotation,
        isotropic scaling and shift (Williams et al. 2021): symmetric, satisfies the
        triangle inequality, and is 0 for X, Y that differ only by those transforms.
        Near 0 it is accurate to about 1e-7 (arccos of a value rounded near 1).
    """
    similarity = linear_cka(X, Y)
    return math.acos(min(1.0, max(-1.0, similarity)))


# --------------------------------------------------------------------------- #
# Procrustes and Bures
# --------------------------------------------------------------------------- #


def _nuclear_cosine(X: ArrayLike, Y: ArrayLike, measure: str) -> float:
    """||X^T Y||_* / (||X||_F ||Y||_F) on column-centred data, in [0, 1]."""
    X, Y = _as_sample_matrices([X, Y], ["X", "Y"], measure=measure, min_samples=2)
    Xc = _reduce_width(_centre_columns(X))
    Yc = _reduce_width(_centre_columns(Y))
    norm_x, norm_y = torch.linalg.matrix_norm(Xc), torch.linalg.matrix_norm(Yc)
    for norm, name in ((norm_x, "X"), (norm_y, "Y")):
        if float(norm) == 0.0:
            raise ValueError(f"{measure} is undefined: {name} is constant across samples")
    nuclear = torch.linalg.svdvals(Xc.T @ Yc).sum()
    return min(1.0, float(nuclear / (norm_x * norm_y)))


def normalized_bures_similarity(X: ArrayLike, Y: ArrayLike) -> float:
    """Normalized Bures Similarity of the centred linear kernels K_X = XX^T, K_Y = YY^T.

        NBS = ||K_X^{1/2} K_Y^{1/2}||_* / sqrt(tr K_X tr K_Y)
            = ||X^T Y||_* / (||X||_F ||Y||_F)      (X, Y column-centred)

    The second form (used here, in feature space) holds because the fidelity of
    XX^T and YY^T equals the nuclear norm of X^T Y (Harvey et al. 2023); it makes
    NBS = cos(procrustes_angular_distance).

    Args:
        X, Y: paired activations (N, d_x), (N, d_y), N >= 2.

    Returns:
        A similarity in [0, 1]. Invariant to orthogonal transforms, isotropic
        scaling and shifts of either input; not to anisotropic scaling.
    """
    return _nuclear_cosine(X, Y, "normalized_bures_similarity")


def procrustes_angular_distance(X: ArrayLike, Y: ArrayLike) -> float:
    """Angular Procrustes (shape) distance, arccos(||X^T Y||_* / (||X||_F ||Y||_F)).

    X, Y are column-centred first. Equals the angle between X and Y R* where R* is
    the best orthogonal alignment (widths are zero-padded to match).

    Args:
        X, Y: paired activations (N, d_x), (N, d_y), N >= 2.

    Returns:
        A distance in [0, pi/2]; a metric on representations up to rotation,
        reflection, isotropic scaling and shift (Williams et al. 2021). Near 0 it is
        accurate to about 1e-7 (arccos of a value rounded near 1).
    """
    return math.acos(_nuclear_cosine(X, Y, "procrustes_angular_distance"))


def procrustes_distance(X: ArrayLike, Y: ArrayLike) -> float:
    """Euclidean Procrustes distance min_R ||X~ - Y~ R||_F over orthogonal R.

    X~, Y~ are X, Y column-centred and scaled to unit Frobenius norm; the narrower
    one is zero-padded to the same width. The minimum has the closed form
        sqrt(2 - 2 ||X~^T Y~||_*)   (orthogonal Procrustes, Schoenemann 1966).

    Args:
        X, Y: paired activations (N, d_x), (N, d_y), N >= 2.

    Returns:
        A distance (not squared) in [0, sqrt(2)]; a metric up to rotation,
        reflection, isotropic scaling and shift; equals 2 sin(theta / 2) for the
        angular distance theta. Near 0 it is accurate to about 1e-7.
    """
    cosine = _nuclear_cosine(X, Y, "procrustes_distance")
    return math.sqrt(max(0.0, 2.0 - 2.0 * cosine))


# --------------------------------------------------------------------------- #
# Cross-validated ridge regression
# --------------------------------------------------------------------------- #


def _ridge_fit_predict(X_train: Tensor, Y_train: Tensor, X_test: Tensor, alpha: float) -> Tensor:
    """Ridge with an unpenalised intercept: centre on training means, then solve."""
    x_mean, y_mean = X_train.mean(dim=0), Y_train.mean(dim=0)
    Xc, Yc = X_train - x_mean, Y_train - y_mean
    n_train, width = Xc.shape
    if width <= n_train:
        # Primal: W = (X^T X + alpha I)^{-1} X^T Y, a (d_x x d_x) system.
        system = Xc.T @ Xc + alpha * torch.eye(width, dtype=Xc.dtype, device=Xc.device)
        weights = torch.linalg.solve(system, Xc.T @ Yc)
    else:
        # Dual: W = X^T (X X^T + alpha I)^{-1} Y, an (n x n) system, for wide X.
        system = Xc @ Xc.T + alpha * torch.eye(n_train, dtype=Xc.dtype, device=Xc.device)
        weights = Xc.T @ torch.linalg.solve(system, Yc)
    return (X_test - x_mean) @ weights + y_mean


def ridge_r2(
    source: ArrayLike,
    target: ArrayLike,
    *,
    alpha: float = 1.0,
    n_folds: int = 5,
    seed: int = 0,
) -> float:
    """Cross-validated R^2 of predicting ``target`` from ``source`` by ridge regression.

    Samples are shuffled with ``seed`` and split into ``n_folds`` folds. Each fold's
    targets are predicted by ridge (intercept unpenalised) fitted on the others:
        W = argmin ||Y_c - X_c W||_F^2 + alpha ||W||_F^2   (X_c, Y_c training-centred)
    and the held-out predictions of all folds are pooled into
        R^2 = 1 - sum ||Y - Y_hat||^2 / sum ||Y - mean(Y)||^2
    (summed over all target columns, i.e. variance-weighted, like scikit-learn's
    ``r2_score(Y, cross_val_predict(Ridge(alpha), X, Y), multioutput="variance_weighted")``).

    Not symmetric: ``ridge_r2(X, Y)`` is X -> Y, ``ridge_r2(Y, X)`` is Y -> X.

    Args:
        source: (N, d_x) predictors. target: (N, d_y) responses, same N rows.
        alpha: ridge penalty (> 0), on the scale of X^T X summed over samples.
        n_folds: number of folds, 2 <= n_folds <= N (n_folds = N is leave-one-out).
        seed: seed of the fold assignment.

    Returns:
        A similarity in (-inf, 1]; 1 = perfectly predicted, 0 = no better than the
        mean. Invariant to rotation, isotropic scaling and shift of the target, and
        to rotation and shift of the source; the penalty makes it depend on the
        source's scale (alpha -> 0 approaches ordinary least squares).
    """
    if not alpha > 0:
        raise ValueError(f"ridge_r2: alpha must be > 0; got {alpha}")
    source_t, target_t = _as_sample_matrices(
        [source, target], ["source", "target"], measure="ridge_r2", min_samples=3
    )
    n_samples = source_t.shape[0]
    if not 2 <= n_folds <= n_samples:
        raise ValueError(f"ridge_r2: n_folds must be in [2, N={n_samples}]; got {n_folds}")
    total = (target_t - target_t.mean(dim=0)).square().sum()
    if float(total) == 0.0:
        raise ValueError("ridge_r2 is undefined: target is constant across samples")
    # A CPU generator makes the folds identical on every device for a given seed.
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_samples, generator=generator).to(source_t.device)
    residual = torch.zeros((), dtype=source_t.dtype, device=source_t.device)
    for test_index in torch.tensor_split(order, n_folds):
        train_mask = torch.ones(n_samples, dtype=torch.bool, device=source_t.device)
        train_mask[test_index] = False
        predicted = _ridge_fit_predict(
            source_t[train_mask], target_t[train_mask], source_t[test_index], alpha
        )
        residual = residual + (target_t[test_index] - predicted).square().sum()
    return float(1.0 - residual / total)


# --------------------------------------------------------------------------- #
# DSA: delay embedding, HAVOK operator, Procrustes over vector fields
# --------------------------------------------------------------------------- #


def _as_trials(data: ArrayLike | Sequence[ArrayLike], name: str) -> list[Tensor]:
    """Boundary check for one dynamical system's trials: a list of (T_i, d) tensors.

    Accepts (trials, T, d), a single (T, d) trajectory, or a sequence of (T_i, d)
    arrays of possibly different lengths T_i (same d).
    """
    if isinstance(data, (np.ndarray, Tensor)):
        if data.ndim == 3:
            pieces: Sequence[ArrayLike] = list(data)
        elif data.ndim == 2:
            pieces = [data]
        else:
            raise ValueError(
                f"{name} must be (trials, time, features), (time, features) or a list of "
                f"(time, features) arrays; got shape {tuple(data.shape)}"
            )
    else:
        pieces = list(data)
    if not pieces:
        raise ValueError(f"{name} contains no trials")
    device = _common_device(pieces, [f"{name}[{i}]" for i in range(len(pieces))])
    trials = [_to_tensor(p, f"{name}[{i}]", device) for i, p in enumerate(pieces)]
    for i, trial in enumerate(trials):
        if trial.ndim != 2:
            raise ValueError(f"{name}[{i}] must be (time, features); got shape {tuple(trial.shape)}")
    widths = {t.shape[1] for t in trials}
    if len(widths) > 1:
        raise ValueError(f"all trials of {name} must have the same number of features; got {sorted(widths)}")
    dtype = trials[0].dtype
    for trial in trials[1:]:
        dtype = torch.promote_types(dtype, trial.dtype)
    return [t.to(dtype) for t in trials]


def delay_embed(trajectory: ArrayLike, n_delays: int, delay_interval: int = 1) -> Tensor:
    """Hankel (delay) embedding of one trajectory.

    Row t is [x_{t + (n_delays-1) tau}, ..., x_{t + tau}, x_t] (most recent first,
    the DSA package's order), tau = delay_interval.

    Args:
        trajectory: (T, d) states over time.
        n_delays: number of delayed copies (>= 1; 1 = no embedding).
        delay_interval: time steps between copies (>= 1).

    Returns:
        (T - (n_delays - 1) * delay_interval, n_delays * d) tensor.
    """
    (trial,) = _as_trials([trajectory], "trajectory")
    return _delay_embed_tensor(trial, n_delays, delay_interval)


def _delay_embed_tensor(trial: Tensor, n_delays: int, delay_interval: int) -> Tensor:
    if n_delays < 1 or delay_interval < 1:
        raise ValueError(
            f"n_delays and delay_interval must be >= 1; got {n_delays} and {delay_interval}"
        )
    span = (n_delays - 1) * delay_interval
    n_rows = trial.shape[0] - span
    if n_rows < 2:
        raise ValueError(
            f"a trajectory of {trial.shape[0]} time steps is too short for {n_delays} delays "
            f"at interval {delay_interval}: needs at least {span + 2}"
        )
    blocks = [
        trial[(n_delays - 1 - k) * delay_interval : (n_delays - 1 - k) * delay_interval + n_rows]
        for k in range(n_delays)
    ]
    return torch.cat(blocks, dim=1)


def havok_operator(
    trajectories: ArrayLike | Sequence[ArrayLike],
    n_delays: int,
    delay_interval: int = 1,
    rank: int | None = None,
    ridge: float = 0.0,
) -> Tensor:
    """Linear operator of Hankel DMD / HAVOK (principal component regression), as in DSA.

    Each trial is delay-embedded (:func:`delay_embed`); the embeddings of all trials
    are stacked into H (M, n_delays * d) and decomposed H = U S V^T. The first
    ``rank`` columns of U are the eigen-time-delay coordinates z_t (unit-norm
    columns, not centred, as in the DSA package). The operator A (rank, rank) is
    the ridge least-squares fit of z_{t+1} = A z_t over consecutive steps within
    each trial:
        A^T = (Z_-^T Z_- + ridge I)^{-1} Z_-^T Z_+.
    A is defined up to the sign of each coordinate (A -> D A D, D = diag(+-1)),
    which orthogonal similarity measures ignore.

    Args:
        trajectories: (trials, T, d), (T, d), or a list of (T_i, d) arrays.
        n_delays, delay_interval: see :func:`delay_embed`.
        rank: number of SVD components kept (None = all, min(M, n_delays * d)).
        ridge: ridge penalty >= 0 on the scale of the unit-norm coordinates.

    Returns:
        (rank, rank) tensor in the trajectories' dtype and device.
    """
    return _havok_from_trials(
        _as_trials(trajectories, "trajectories"), n_delays, delay_interval, rank, ridge
    )


def _havok_from_trials(
    trials: list[Tensor], n_delays: int, delay_interval: int, rank: int | None, ridge: float
) -> Tensor:
    if ridge < 0:
        raise ValueError(f"havok_operator: ridge must be >= 0; got {ridge}")
    embedded = [_delay_embed_tensor(t, n_delays, delay_interval) for t in trials]
    hankel = torch.cat(embedded, dim=0)
    max_rank = min(hankel.shape)
    if rank is None:
        rank = max_rank
    if not 1 <= rank <= max_rank:
        raise ValueError(
            f"havok_operator: rank must be in [1, {max_rank}] for a Hankel matrix of shape "
            f"{tuple(hankel.shape)}; got {rank}"
        )
    time_coordinates = torch.linalg.svd(hankel, full_matrices=False).U[:, :rank]
    per_trial = torch.split(time_coordinates, [e.shape[0] for e in embedded], dim=0)
    before = torch.cat([z[:-1] for z in per_trial], dim=0)
    after = torch.cat([z[1:] for z in per_trial], dim=0)
    gram = before.T @ before + ridge * torch.eye(rank, dtype=before.dtype, device=before.device)
    return torch.linalg.solve(gram, before.T @ after).T


def _as_square_operators(A: ArrayLike, B: ArrayLike, measure: str) -> list[Tensor]:
    """Boundary check for two linear operators: square, finite, one device and dtype."""
    device = _common_device([A, B], ["A", "B"])
    operators = [_to_tensor(A, f"{measure}: A", device), _to_tensor(B, f"{measure}: B", device)]
    for operator, name in zip(operators, ("A", "B"), strict=True):
        if operator.ndim != 2 or operator.shape[0] != operator.shape[1] or operator.shape[0] == 0:
            raise ValueError(f"{measure}: {name} must be a square (r, r) matrix; got shape {tuple(operator.shape)}")
    dtype = torch.promote_types(operators[0].dtype, operators[1].dtype)
    return [operator.to(dtype) for operator in operators]


@dataclass(frozen=True)
class OperatorAlignment:
    """Result of :func:`align_operators`.

    Attributes:
        orthogonal: (r, r) orthogonal C found for A ~ C B C^T (det +1 or -1).
        euclidean: ||A - C B C^T||_F (not squared, not normalised).
        angular: arccos(<A, C B C^T>_F / (||A||_F ||B||_F)), in [0, pi].
    """

    orthogonal: Tensor
    euclidean: float
    angular: float


def _random_orthogonal(size: int, count: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Haar-random orthogonal matrices (count, size, size), determinants alternating +1, -1."""
    gaussian = torch.randn(count, size, size, generator=generator, dtype=dtype)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    wanted = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(count)], dtype=dtype)
    flip = torch.sign(torch.linalg.det(q)) != wanted
    q[flip, :, 0] = -q[flip, :, 0]
    return q


def _paired_basis_starts(a: Tensor, b: Tensor, basis_a: Tensor, basis_b: Tensor) -> Tensor:
    """Two starts C = U_a D U_b^T from orthonormal bases paired column by column.

    The signs D = diag(d), d_i = +-1, should maximise <a, C b C^T> = d^T P d with
    P = (U_a^T a U_a) * (U_b^T b U_b) (elementwise): each column's sign is fixed in
    turn, most strongly coupled first, to agree with the signs already fixed, then
    single flips polish the result. The second start flips the cheapest sign, so
    the two starts lie in the two components of O(r) (det +1 and det -1).
    """
    coupling = (basis_a.T @ a @ basis_a) * (basis_b.T @ b @ basis_b)
    coupling = (coupling + coupling.T) / 2
    coupling = coupling - torch.diag(torch.diagonal(coupling))
    size = a.shape[0]
    signs = torch.zeros(size, dtype=a.dtype, device=a.device)
    # field[i] = sum_j P_ij d_j over the signs fixed so far (unfixed d_j are 0).
    field = torch.zeros(size, dtype=a.dtype, device=a.device)
    unfixed = torch.ones(size, dtype=torch.bool, device=a.device)
    next_index = int(torch.argmax(coupling.abs().sum(dim=1)))
    for _ in range(size):
        sign = 1.0 if float(field[next_index]) >= 0 else -1.0
        signs[next_index] = sign
        unfixed[next_index] = False
        field = field + sign * coupling[:, next_index]
        if not bool(unfixed.any()):
            break
        strength = torch.where(unfixed, field.abs(), torch.full_like(field, -1.0))
        next_index = int(torch.argmax(strength))
    for _ in range(4 * size):
        # Flipping sign i changes the objective by -4 d_i sum_{j != i} P_ij d_j.
        gains = -4.0 * signs * (coupling @ signs)
        best = int(torch.argmax(gains))
        if float(gains[best]) <= 1e-12:
            break
        signs[best] = -signs[best]
    gains = -4.0 * signs * (coupling @ signs)
    other_component = signs.clone()
    cheapest = int(torch.argmax(gains))
    other_component[cheapest] = -other_component[cheapest]
    return torch.stack([basis_a @ torch.diag(d) @ basis_b.T for d in (signs, other_component)])


def _eigenbasis_starts(a: Tensor, b: Tensor) -> Tensor:
    """Six starts pairing the sorted eigenvectors of symmetric forms of a and b.

    The forms sym(M) = (M + M^T)/2, M^T M and M M^T are equivariant: for
    b = Q a Q^T each form of b is Q (form of a) Q^T, so pairing sorted eigenvectors
    (with the right signs) recovers C = Q^T exactly when the eigenvalues are
    distinct. For symmetric operators the sym-form start is the exact optimum
    (Hoffman-Wielandt); the other forms cover operators whose symmetric part is
    degenerate (e.g. normal operators, rotations). Returns (6, r, r).
    """
    starts = []
    for form_a, form_b in (((a + a.T) / 2, (b + b.T) / 2), (a.T @ a, b.T @ b), (a @ a.T, b @ b.T)):
        basis_a = torch.linalg.eigh(form_a).eigenvectors
        basis_b = torch.linalg.eigh(form_b).eigenvectors
        starts.append(_paired_basis_starts(a, b, basis_a, basis_b))
    return torch.cat(starts, dim=0)


def align_operators(
    A: ArrayLike,
    B: ArrayLike,
    *,
    iters: int = 500,
    lr: float = 0.1,
    n_restarts: int = 4,
    seed: int = 0,
) -> OperatorAlignment:
    """Procrustes analysis over vector fields: min over orthogonal C of ||A - C B C^T||_F.

    Equivalently maximises <A, C B C^T>_F. C ranges over the whole orthogonal group
    O(r), rotations and reflections (det +1 and -1). The search runs from the
    identity, from a reflection, from pairings of the sorted eigenvectors of
    sym(A), A^T A and A A^T with those of B, in both components (these recover C
    exactly for conjugate operators with distinct eigenvalues), and from
    ``n_restarts`` Haar-random orthogonal matrices of alternating determinant.
    All starts are optimised together by Riemannian Adam on O(r): the gradient is
    mapped to the Lie algebra (skew-symmetric matrices), Adam-scaled there and
    applied by the Cayley retraction, so C stays exactly orthogonal; the step
    size follows a cosine decay from ``lr`` to 0. The best iterate over all starts
    is returned. The objective is nonconvex, so the result is an upper bound on the
    true minimum; it is exact for symmetric A and B, where the optimum pairs sorted
    eigenvalues: min = ||sort eig(A) - sort eig(B)||_2.

    Args:
        A, B: (r, r) operators of the same size.
        iters: optimisation steps per start.
        lr: initial step size in radians (the objective is normalised by ||A|| ||B||).
        n_restarts: number of random starts, in addition to the eight fixed ones.
        seed: seed of the random starts.

    Returns:
        :class:`OperatorAlignment` with C, the Euclidean distance (in [0, ||A|| + ||B||],
        0 iff A and B are orthogonally conjugate) and the angular distance (in
        [0, pi]). Both are invariant to orthogonal conjugation of A or B; the
        angular one also to scaling either operator.
    """
    if iters < 0 or n_restarts < 0 or not lr > 0:
        raise ValueError(
            f"align_operators: need iters >= 0, n_restarts >= 0 and lr > 0; got {iters}, {n_restarts}, {lr}"
        )
    A_t, B_t = _as_square_operators(A, B, "align_operators")
    if A_t.shape != B_t.shape:
        raise ValueError(
            f"align_operators: A and B must have the same size; got {tuple(A_t.shape)} and {tuple(B_t.shape)}"
        )
    norm_a, norm_b = torch.linalg.matrix_norm(A_t), torch.linalg.matrix_norm(B_t)
    if float(norm_a) == 0.0 or float(norm_b) == 0.0:
        raise ValueError("align_operators: A and B must be nonzero")
    # Working on unit-norm copies makes lr mean the same thing for every pair.
    a, b = A_t / norm_a, B_t / norm_b
    size, dtype, device = a.shape[0], a.dtype, a.device
    identity = torch.eye(size, dtype=dtype, device=device)
    reflection = identity.clone()
    reflection[-1, -1] = -1.0
    generator = torch.Generator().manual_seed(seed)
    starts = [identity[None], reflection[None], _eigenbasis_starts(a, b)]
    if n_restarts > 0:
        starts.append(_random_orthogonal(size, n_restarts, generator, dtype).to(device))
    C = torch.cat(starts, dim=0)

    first_moment = torch.zeros_like(C)
    second_moment = torch.zeros_like(C)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    # Adam keeps stepping near an optimum, so keep each start's best iterate.
    best_C = C.clone()
    best_inner = torch.full((C.shape[0],), -math.inf, dtype=dtype, device=device)
    for step in range(1, iters + 2):
        # f(C) = <a, C b C^T> = <C^T a C, b>; its Riemannian gradient at C, written in
        # the Lie algebra (C Omega), is Omega = skew(a_C b^T + a_C^T b), a_C = C^T a C.
        a_in_frame = C.transpose(-1, -2) @ a @ C
        inner = (a_in_frame * b).sum(dim=(-2, -1))
        improved = inner > best_inner
        best_inner = torch.where(improved, inner, best_inner)
        best_C = torch.where(improved[:, None, None], C, best_C)
        if step == iters + 1:
            break
        euclidean_part = a_in_frame @ b.T + a_in_frame.transpose(-1, -2) @ b
        omega = (euclidean_part - euclidean_part.transpose(-1, -2)) / 2
        first_moment = beta1 * first_moment + (1 - beta1) * omega
        second_moment = beta2 * second_moment + (1 - beta2) * omega.square()
        # Elementwise Adam keeps the step skew-symmetric (|omega_ij| = |omega_ji|).
        direction = (first_moment / (1 - beta1**step)) / (
            (second_moment / (1 - beta2**step)).sqrt() + eps
        )
        step_size = 0.5 * lr * (1 + math.cos(math.pi * (step - 1) / iters))
        half_step = 0.5 * step_size * direction
        # Cayley retraction (ascent): C <- C (I - W/2)^{-1} (I + W/2), exactly orthogonal.
        C = C @ torch.linalg.solve(identity - half_step, identity + half_step)

    best = int(torch.argmax(best_inner))
    # One polar step removes rounding drift accumulated over the Cayley updates.
    u, _, vh = torch.linalg.svd(best_C[best])
    orthogonal = u @ vh
    aligned_b = orthogonal @ B_t @ orthogonal.T
    cosine = float((A_t * aligned_b).sum() / (norm_a * norm_b))
    return OperatorAlignment(
        orthogonal=orthogonal,
        euclidean=float(torch.linalg.matrix_norm(A_t - aligned_b)),
        angular=math.acos(min(1.0, max(-1.0, cosine))),
    )


def spectral_wasserstein_distance(A: ArrayLike, B: ArrayLike) -> float:
    """2-Wasserstein distance between the eigenvalue spectra of two operators.

    Each spectrum is the uniform distribution over the eigenvalues of the operator,
    seen as points (Re, Im) in the plane:
        W_2 = (min over couplings sum_ij P_ij |lambda_i - mu_j|^2)^{1/2}.
    With equal counts the optimal coupling is a matching (scipy's
    linear_sum_assignment); otherwise the transport linear program is solved.

    Args:
        A: (r_a, r_a) operator. B: (r_b, r_b) operator (sizes may differ).

    Returns:
        A distance in [0, inf), in the units of the eigenvalues (not squared; the
        DSA package's "wasserstein" score is this squared). Invariant to any
        similarity transform (invertible conjugation) of A or B.
    """
    spectra = []
    for operator in _as_square_operators(A, B, "spectral_wasserstein_distance"):
        eigenvalues = torch.linalg.eigvals(operator).cpu().numpy()
        spectra.append(np.stack([eigenvalues.real, eigenvalues.imag], axis=1))
    points_a, points_b = spectra
    cost = ((points_a[:, None, :] - points_b[None, :, :]) ** 2).sum(axis=-1)
    count_a, count_b = cost.shape
    if count_a == count_b:
        rows, cols = scipy.optimize.linear_sum_assignment(cost)
        return math.sqrt(float(cost[rows, cols].mean()))
    # Transport plan P >= 0 with row sums 1/count_a and column sums 1/count_b.
    row_constraints = scipy.sparse.kron(scipy.sparse.eye(count_a), np.ones((1, count_b)))
    col_constraints = scipy.sparse.kron(np.ones((1, count_a)), scipy.sparse.eye(count_b))
    solution = scipy.optimize.linprog(
        cost.ravel(),
        A_eq=scipy.sparse.vstack([row_constraints, col_constraints]).tocsc(),
        b_eq=np.concatenate([np.full(count_a, 1.0 / count_a), np.full(count_b, 1.0 / count_b)]),
        bounds=(0, None),
        method="highs",
    )
    if not solution.success:
        raise RuntimeError(f"spectral_wasserstein_distance: transport LP failed ({solution.message})")
    return math.sqrt(max(0.0, float(solution.fun)))


class DSA:
    """Dynamical Similarity Analysis (Ostrow et al. 2023).

    Fits a HAVOK operator to each system's delay-embedded trajectories
    (:func:`havok_operator`) and compares the two operators A_x, A_y:
        * ``"angular"``:   arccos(max_C <A_x, C A_y C^T> / (||A_x|| ||A_y||)), in [0, pi];
        * ``"euclidean"``: min_C ||A_x - C A_y C^T||_F, in [0, inf);
        * ``"wasserstein"``: W_2 between the eigenvalue spectra, in [0, inf).
    C ranges over all orthogonal matrices (:func:`align_operators`). All three are
    distances, 0 for systems whose operators are orthogonally conjugate (same
    dynamics, rotated or reflected state space); the Wasserstein form is also 0
    for any invertible conjugation.

    The two systems are not paired: each is given as its own trials,
    ``(trials, T, d)``, ``(T, d)`` or a list of ``(T_i, d)`` arrays; trial counts,
    lengths and widths may differ between X and Y. The Procrustes scores need
    operators of equal size, so ``rank`` must be set (or both embeddings must have
    the same width) for them.

    Usage: ``DSA(n_delays=10, rank=20).score(X, Y)``; after ``fit(X, Y)`` the
    operators, the alignment and the distance are in ``operator_x_``,
    ``operator_y_``, ``alignment_`` (None for "wasserstein") and ``distance_``.

    Args:
        n_delays, delay_interval: delay embedding (:func:`delay_embed`).
        rank: HAVOK rank (:func:`havok_operator`); None keeps all components.
        ridge: ridge penalty of the operator fit.
        score_method: "angular", "euclidean" or "wasserstein".
        iters, lr, n_restarts, seed: optimiser settings (:func:`align_operators`).
    """

    def __init__(
        self,
        n_delays: int = 10,
        delay_interval: int = 1,
        rank: int | None = None,
        ridge: float = 0.0,
        score_method: DSAScoreMethod = "angular",
        iters: int = 500,
        lr: float = 0.1,
        n_restarts: int = 4,
        seed: int = 0,
    ) -> None:
        _check_choice(score_method, DSA_SCORE_METHODS, "score_method")
        self.n_delays = n_delays
        self.delay_interval = delay_interval
        self.rank = rank
        self.ridge = ridge
        self.score_method = score_method
        self.iters = iters
        self.lr = lr
        self.n_restarts = n_restarts
        self.seed = seed

    def fit(
        self, X: ArrayLike | Sequence[ArrayLike], Y: ArrayLike | Sequence[ArrayLike]
    ) -> DSA:
        """Fit both operators and compare them; returns self (see class docstring)."""
        trials_x, trials_y = _as_trials(X, "X"), _as_trials(Y, "Y")
        self.operator_x_ = _havok_from_trials(trials_x, self.n_delays, self.delay_interval, self.rank, self.ridge)
        self.operator_y_ = _havok_from_trials(trials_y, self.n_delays, self.delay_interval, self.rank, self.ridge)
        if self.score_method == "wasserstein":
            self.alignment_: OperatorAlignment | None = None
            self.distance_ = spectral_wasserstein_distance(self.operator_x_, self.operator_y_)
            return self
        if self.operator_x_.shape != self.operator_y_.shape:
            raise ValueError(
                f"DSA: operators have different sizes {tuple(self.operator_x_.shape)} and "
                f"{tuple(self.operator_y_.shape)}; set rank, or use score_method='wasserstein'"
            )
        self.alignment_ = align_operators(
            self.operator_x_,
            self.operator_y_,
            iters=self.iters,
            lr=self.lr,
            n_restarts=self.n_restarts,
            seed=self.seed,
        )
        self.distance_ = (
            self.alignment_.angular if self.score_method == "angular" else self.alignment_.euclidean
        )
        return self

    def score(
        self, X: ArrayLike | Sequence[ArrayLike], Y: ArrayLike | Sequence[ArrayLike]
    ) -> float:
        """DSA distance between systems X and Y: ``self.fit(X, Y).distance_``."""
        return self.fit(X, Y).distance_


# --------------------------------------------------------------------------- #
# All measures at once
# --------------------------------------------------------------------------- #


def compare_all(
    X: ArrayLike,
    Y: ArrayLike,
    *,
    ridge_alpha: float = 1.0,
    n_folds: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """The main correlational measures between paired activations X (N, d_x) and Y (N, d_y).

    Keys (s = similarity, higher = more alike; d = distance, lower = more alike):
        rsa_spearman (s), rsa_pearson (s): RSA with 1 - Pearson RDMs.
        cka_linear (s), cka_debiased (s), cka_angular (d): linear CKA.
        procrustes_euclidean (d), procrustes_angular (d), nbs (s).
        ridge_r2_xy (s): R^2 predicting Y from X; ridge_r2_yx (s): X from Y.
    Needs N >= 4 (debiased CKA). RSA builds N x N matrices; the rest do not.
    DSA needs trajectories and is not included (use :class:`DSA`).
    """
    X, Y = _as_sample_matrices([X, Y], ["X", "Y"], measure="compare_all", min_samples=4)
    rdm_x, rdm_y = rdm(X, "correlation"), rdm(Y, "correlation")
    nuclear_cosine = normalized_bures_similarity(X, Y)
    cka = linear_cka(X, Y)
    return {
        "rsa_spearman": compare_rdms(rdm_x, rdm_y, "spearman"),
        "rsa_pearson": compare_rdms(rdm_x, rdm_y, "pearson"),
        "cka_linear": cka,
        "cka_debiased": linear_cka(X, Y, debiased=True),
        "cka_angular": math.acos(min(1.0, max(-1.0, cka))),
        "procrustes_euclidean": math.sqrt(max(0.0, 2.0 - 2.0 * nuclear_cosine)),
        "procrustes_angular": math.acos(nuclear_cosine),
        "nbs": nuclear_cosine,
        "ridge_r2_xy": ridge_r2(X, Y, alpha=ridge_alpha, n_folds=n_folds, seed=seed),
        "ridge_r2_yx": ridge_r2(Y, X, alpha=ridge_alpha, n_folds=n_folds, seed=seed),
    }
