"""Procrustes distances (Euclidean, angular) and Normalized Bures Similarity (docs/method.md section 8).

All three are functions of one number, the nuclear cosine
||X^T Y||_* / (||X||_F ||Y||_F) of the column-centred activations.
"""

from __future__ import annotations

import math

import torch

from ._common import ArrayLike, _as_sample_matrices, _centre_columns, _check_not_constant, _reduce_width


def _nuclear_cosine(X: ArrayLike, Y: ArrayLike, measure: str) -> float:
    """||X^T Y||_* / (||X||_F ||Y||_F) on column-centred data, in [0, 1]."""
    X, Y = _as_sample_matrices([X, Y], ["X", "Y"], measure=measure, min_samples=2)
    _check_not_constant([X, Y], ["X", "Y"], measure)  # centring 0.1s leaves rounding noise, not zeros
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
