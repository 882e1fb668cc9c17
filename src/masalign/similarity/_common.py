"""Boundary checks, conversions and shared helpers of the similarity measures.

Every public measure converts its inputs here (see the package docstring for the
conventions): one floating dtype, one device, samples as rows, finite values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

ArrayLike = np.ndarray | Tensor


def _to_tensor(
    data: ArrayLike, name: str, device: torch.device | None = None, *, check_finite: bool = True
) -> Tensor:
    """Convert to a floating tensor without copying when possible (never written to).

    With ``check_finite=False`` the caller must check finiteness itself (see
    :func:`_check_finite`), e.g. from a result that is non-finite iff an input is.
    """
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
    if check_finite:
        _check_finite([tensor], [name])
    return tensor


def _check_finite(tensors: Sequence[Tensor], names: Sequence[str]) -> None:
    """Raise the boundary's ValueError for the first tensor with a NaN or infinite value."""
    for tensor, name in zip(tensors, names, strict=True):
        if not _all_finite(tensor):
            raise ValueError(f"{name} contains NaN or infinite values")


def _all_finite(tensor: Tensor) -> bool:
    """torch.isfinite(...).all(); on CPU through numpy, which is ~15x faster for large inputs."""
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(tensor.numpy()).all())
    return bool(torch.isfinite(tensor).all())


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
    check_finite: bool = True,
) -> list[Tensor]:
    """The one boundary check for paired (samples, features) matrices.

    Returns tensors on one device with one floating dtype. Raises ValueError when
    a matrix is not 2-D, has no features, the sample counts differ, a value is not
    finite, or there are fewer than ``min_samples`` rows. With
    ``check_finite=False`` the finiteness check is left to the caller
    (:func:`_check_finite` with the names ``f"{measure}: {name}"``).
    """
    device = _common_device(arrays, names)
    tensors = [
        _to_tensor(a, f"{measure}: {name}", device, check_finite=check_finite)
        for a, name in zip(arrays, names, strict=True)
    ]
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


def _is_constant(X: Tensor) -> bool:
    """Every row of ``X`` equal, exactly. Centring a constant that floats cannot hold (0.1)
    leaves rounding noise, not zeros, so this is checked on the input, not after centring.
    Two rows decide almost every input without a pass over the rest."""
    if X.shape[0] < 2:
        return True
    if not torch.equal(X[0], X[1]):
        return False
    return bool((X == X[:1]).all())


def _check_not_constant(tensors: Sequence[Tensor], names: Sequence[str], measure: str) -> None:
    for tensor, name in zip(tensors, names, strict=True):
        if _is_constant(tensor):
            raise ValueError(f"{measure} is undefined: {name} is constant across samples (every row is the same)")


def _power_of_two_scaled(X: Tensor) -> Tensor:
    """``X`` times the power of two that brings its largest magnitude near 1: exact (barring
    subnormals), so every scale-invariant measure is unchanged, and fourth-order sums of it
    neither overflow nor underflow."""
    largest = float(X.abs().max())
    if largest == 0.0 or not math.isfinite(largest):
        return X
    return X * 2.0 ** -math.frexp(largest)[1]


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
    # ||a||^2 + ||b||^2 - 2<a, b> cancels for points close together far from X[0]: in float32 it
    # loses every digit of their distance, so lower precisions are computed in float64.
    wide = X.to(torch.promote_types(X.dtype, torch.float64))
    shifted = wide - wide[:1]
    gram = shifted @ shifted.T
    row_norms = gram.diagonal()
    squared = row_norms[:, None] + row_norms[None, :] - 2.0 * gram
    squared.clamp_(min=0.0)
    squared.fill_diagonal_(0.0)
    return squared.to(X.dtype)


def _upper_triangle(matrix: Tensor) -> Tensor:
    rows, cols = torch.triu_indices(matrix.shape[0], matrix.shape[1], offset=1, device=matrix.device)
    return matrix[rows, cols]


def _numpy_view(X: Tensor) -> np.ndarray | None:
    """A zero-copy numpy view of a CPU float32/float64 tensor, else None.

    On CPU the dense products go through numpy's BLAS: numpy multiplies A^T A and
    A A^T with a symmetric rank-k update (half the flops of a general product),
    which torch's matmul does not, and on AMD CPUs its OpenBLAS is also faster
    than torch's MKL. Other devices and dtypes stay in torch.
    """
    if X.device.type != "cpu" or X.dtype not in (torch.float32, torch.float64) or X.requires_grad:
        return None
    return X.numpy()


def _upper_triangle_numpy(matrix: np.ndarray) -> np.ndarray:
    """Entries above the diagonal, row by row (scipy's condensed order)."""
    size = matrix.shape[0]
    if size < 2:
        return np.empty(0, dtype=matrix.dtype)
    # Row slices: faster than a boolean mask (no N x N mask to build).
    return np.concatenate([matrix[row, row + 1 :] for row in range(size - 1)])
