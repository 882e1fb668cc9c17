"""Cross-validated ridge regression R^2 from one network's activations to another's (docs/method.md section 8)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import ArrayLike, _as_sample_matrices, _is_constant


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
    if not 0 < alpha < math.inf:
        raise ValueError(f"ridge_r2: alpha must be a finite number > 0; got {alpha}")
    source_t, target_t = _as_sample_matrices(
        [source, target], ["source", "target"], measure="ridge_r2", min_samples=3
    )
    n_samples = source_t.shape[0]
    if not 2 <= n_folds <= n_samples:
        raise ValueError(f"ridge_r2: n_folds must be in [2, N={n_samples}]; got {n_folds}")
    # Centring a constant floats cannot hold (0.1) leaves rounding noise: test the input itself.
    if _is_constant(target_t):
        raise ValueError("ridge_r2 is undefined: target is constant across samples (every row is the same)")
    total = (target_t - target_t.mean(dim=0)).square().sum()
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
