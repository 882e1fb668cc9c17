"""Centred kernel alignment: linear, debiased, RBF and angular CKA (docs/method.md section 8)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ._common import (
    ArrayLike,
    _as_sample_matrices,
    _centre_columns,
    _check_finite,
    _check_not_constant,
    _numpy_view,
    _power_of_two_scaled,
    _reduce_width,
    _squared_distances,
    _upper_triangle,
)


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


def _frobenius_sq(matrix: np.ndarray) -> float:
    flat = matrix.reshape(-1)
    return float(flat @ flat)


def _centred_feature_gram(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred Gram X_c^T X_c, the column means and the raw Gram X^T X.

    The centred Gram is X^T X - n m m^T (no centred copy of X is made); this
    subtracts n m m^T from X^T X, which loses about eps * tr(X^T X) / tr(X_c^T X_c)
    relative accuracy, so callers check that ratio (:func:`_raw_gram_is_exact`).
    """
    means = X.mean(axis=0)
    raw = X.T @ X  # numpy uses a symmetric rank-k update here
    return raw - X.shape[0] * np.outer(means, means), means, raw


def _raw_gram_is_exact(raw: np.ndarray, centred: np.ndarray) -> bool:
    """True when forming X_c^T X_c as X^T X - n m m^T costs < ~1e-12 relative accuracy."""
    trace_raw, trace_centred = float(np.trace(raw)), float(np.trace(centred))
    if trace_centred <= 0.0:
        return False
    return trace_raw / trace_centred <= 1e-12 / float(np.finfo(raw.dtype).eps)


def _linear_cka_terms_numpy(X: np.ndarray, Y: np.ndarray) -> tuple[float, float, float]:
    """||X_c^T Y_c||_F^2, ||X_c^T X_c||_F^2, ||Y_c^T Y_c||_F^2 with the cheaper Gram form.

    Feature space (d x d products) costs about n (d_x + d_y)^2 multiply-adds with
    symmetric updates for the self terms; sample space (n x n Gram matrices
    K = X_c X_c^T, where ||X_c^T Y_c||_F^2 = <K, L>_F) costs about n^2 (d_x + d_y).
    The smaller of the two is used; both are exact.
    """
    n, d_x = X.shape
    d_y = Y.shape[1]
    if n < d_x + d_y:
        Xc = X - X.mean(axis=0)
        Yc = Y - Y.mean(axis=0)
        K = Xc @ Xc.T  # symmetric rank-k updates
        L = Yc @ Yc.T
        return float(K.reshape(-1) @ L.reshape(-1)), _frobenius_sq(K), _frobenius_sq(L)
    gram_x, mean_x, raw_x = _centred_feature_gram(X)
    gram_y, mean_y, raw_y = _centred_feature_gram(Y)
    if _raw_gram_is_exact(raw_x, gram_x) and _raw_gram_is_exact(raw_y, gram_y):
        cross = X.T @ Y - n * np.outer(mean_x, mean_y)
    else:
        # Large offsets: centre explicitly (one copy of each input).
        Xc = X - mean_x
        Yc = Y - mean_y
        gram_x, gram_y, cross = Xc.T @ Xc, Yc.T @ Yc, Xc.T @ Yc
    return _frobenius_sq(cross), _frobenius_sq(gram_x), _frobenius_sq(gram_y)


def _cka_ratio(cross: Tensor, self_x: Tensor, self_y: Tensor, measure: str) -> float:
    for value, name in ((self_x, "X"), (self_y, "Y")):
        if float(value) <= 0.0:
            raise ValueError(
                f"{measure} is undefined: the HSIC of {name} with itself is {float(value):.3g} "
                f"(constant {name}, or too few samples for the debiased estimator)"
            )
    ratio = float(cross / torch.sqrt(self_x * self_y))
    if not math.isfinite(ratio):
        raise ValueError(f"{measure} could not be computed in {self_x.dtype} (a sum of fourth powers overflowed)")
    return ratio


def linear_cka(X: ArrayLike, Y: ArrayLike, *, debiased: bool = False) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019).

    On column-centred X (N, d_x) and Y (N, d_y):
        CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
            = HSIC(XX^T, YY^T) / sqrt(HSIC(XX^T, XX^T) HSIC(YY^T, YY^T)),
    computed with whichever Gram form is cheaper for the shape: the d x d form
    above when N >= d_x + d_y, else the N x N Gram matrices (both exact). On CPU
    the products use numpy's BLAS (symmetric rank-k updates for the self terms).

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
    X, Y = _as_sample_matrices(
        [X, Y], ["X", "Y"], measure="linear_cka", min_samples=n_needed, check_finite=False
    )
    measure = "debiased linear_cka" if debiased else "linear_cka"
    _check_not_constant([X, Y], ["X", "Y"], measure)
    terms = _linear_cka_terms(X, Y, debiased)
    if not _terms_in_range(terms, X.dtype):
        # The sums are fourth powers of the data: at extreme scales they overflow or lose
        # their digits to subnormals. CKA is scale-invariant: scale by powers of two and redo.
        _check_finite([X, Y], ["linear_cka: X", "linear_cka: Y"])
        terms = _linear_cka_terms(_power_of_two_scaled(X), _power_of_two_scaled(Y), debiased)
    return _cka_ratio(*terms, measure)


def _terms_in_range(terms: tuple[Tensor, Tensor, Tensor], dtype: torch.dtype) -> bool:
    """All three sums finite, and the two self terms above the subnormal range of ``dtype``."""
    smallest = torch.finfo(dtype).tiny / torch.finfo(dtype).eps
    cross, self_x, self_y = (float(t) for t in terms)
    return all(math.isfinite(v) for v in (cross, self_x, self_y)) and self_x > smallest and self_y > smallest


def _linear_cka_terms(X: Tensor, Y: Tensor, debiased: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(cross, self X, self Y): the HSIC terms of linear CKA, in float64 where numpy computes them."""
    X_np, Y_np = _numpy_view(X), _numpy_view(Y)
    if debiased or X_np is None or Y_np is None:
        _check_finite([X, Y], ["linear_cka: X", "linear_cka: Y"])
        Xc = _reduce_width(_centre_columns(X))
        Yc = _reduce_width(_centre_columns(Y))
        if debiased:
            return _linear_unbiased_hsic(Xc, Yc), _linear_unbiased_hsic(Xc, Xc), _linear_unbiased_hsic(Yc, Yc)
        return (Yc.T @ Xc).square().sum(), (Xc.T @ Xc).square().sum(), (Yc.T @ Yc).square().sum()
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):  # reported by _terms_in_range
        cross_np, self_x_np, self_y_np = _linear_cka_terms_numpy(X_np, Y_np)
    if not all(math.isfinite(v) for v in (cross_np, self_x_np, self_y_np)):
        # A NaN or inf in X (or Y) makes ||X_c^T X_c||_F (or ||Y_c^T Y_c||_F) non-finite,
        # through the diagonal (the column sums of squares), so the boundary check runs
        # only here, saving a pass over the inputs; finite values whose products overflow
        # pass it and are scaled by linear_cka.
        _check_finite([X, Y], ["linear_cka: X", "linear_cka: Y"])
    return tuple(torch.tensor(v, dtype=torch.float64) for v in (cross_np, self_x_np, self_y_np))  # type: ignore[return-value]


def _median(values: Tensor) -> Tensor:
    """Median with the two middle values averaged for even counts (as numpy does)."""
    count = values.numel()
    lower = torch.kthvalue(values, (count + 1) // 2).values
    upper = torch.kthvalue(values, count // 2 + 1).values
    return (lower + upper) / 2


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
    if not 0 < sigma_fraction < math.inf:
        raise ValueError(f"rbf_cka: sigma_fraction must be a finite number > 0; got {sigma_fraction}")
    n_needed = 4 if debiased else 2
    X, Y = _as_sample_matrices([X, Y], ["X", "Y"], measure="rbf_cka", min_samples=n_needed)
    _check_not_constant([X, Y], ["X", "Y"], "debiased rbf_cka" if debiased else "rbf_cka")
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
