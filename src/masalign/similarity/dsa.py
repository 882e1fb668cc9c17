"""Dynamical Similarity Analysis: delay embedding, HAVOK operator, Procrustes over vector fields.

DSA (Ostrow et al. 2023; docs/method.md section 8) is the exception to pairing: it
compares two dynamical systems, so each system is given as its own trials,
``(trials, T, d)`` or a list of ``(T_i, d)`` arrays, and the two systems need not
share trials, lengths or widths.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.sparse
import torch
from torch import Tensor

from ._common import ArrayLike, _check_choice, _common_device, _to_tensor

DSAScoreMethod = Literal["angular", "euclidean", "wasserstein"]
DSA_SCORE_METHODS: tuple[DSAScoreMethod, ...] = get_args(DSAScoreMethod)


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
    for name, value in (("n_delays", n_delays), ("delay_interval", delay_interval)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number >= 1; got {value!r}")
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
        rank: number of SVD components kept; None keeps all above rounding (the
            numerical rank of H, as numpy's ``matrix_rank`` counts it; with ``ridge=0``
            at most the number of transitions). A rank above the numerical rank, or
            above the transitions without a ridge, is an error: those components
            would make the operator arbitrary.
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
    if not 0 <= ridge < math.inf:
        raise ValueError(f"havok_operator: ridge must be a finite number >= 0; got {ridge}")
    embedded = [_delay_embed_tensor(t, n_delays, delay_interval) for t in trials]
    hankel = torch.cat(embedded, dim=0)
    max_rank = min(hankel.shape)
    if rank is not None and not 1 <= rank <= max_rank:
        raise ValueError(
            f"havok_operator: rank must be in [1, {max_rank}] for a Hankel matrix of shape "
            f"{tuple(hankel.shape)}; got {rank}"
        )
    left, singular_values, _ = torch.linalg.svd(hankel, full_matrices=False)
    # Components below rounding (numpy's matrix_rank tolerance) are noise: fitted, they make the
    # operator arbitrary (a rotated copy of a system then scores far from 0).
    tolerance = max(hankel.shape) * torch.finfo(hankel.dtype).eps * float(singular_values[0])
    numerical_rank = int((singular_values > tolerance).sum())
    transitions = hankel.shape[0] - len(embedded)
    if rank is None:
        rank = numerical_rank if ridge > 0 else min(numerical_rank, transitions)
        if rank < 1:
            raise ValueError("havok_operator: the trajectories are all zero; there is nothing to fit")
    elif rank > numerical_rank:
        raise ValueError(
            f"havok_operator: the Hankel matrix {tuple(hankel.shape)} has numerical rank {numerical_rank}, below "
            f"rank={rank}: the components past it are rounding noise and would make the operator arbitrary; pass "
            f"rank <= {numerical_rank} (or rank=None)"
        )
    if ridge == 0 and rank > transitions:
        raise ValueError(
            f"havok_operator: {transitions} time steps to fit but rank={rank}: the least-squares fit is "
            f"underdetermined; pass rank <= {transitions}, ridge > 0, or longer trajectories"
        )
    time_coordinates = left[:, :rank]
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


# align_operators on large operators (r >= _LARGE_OPERATOR, float64): float32 search,
# successive halving (keep the best _PRUNING[i][1] starts after _PRUNING[i][0] of the
# steps), and the last _POLISH_FRACTION of the steps in float64.
_LARGE_OPERATOR = 16
_PRUNING = ((0.3, 4), (0.6, 2))
_POLISH_FRACTION = 0.1


# Exactly conjugate operators (residual ||a - C b C^T||_F of the best start, unit-norm a
# and b, at most this many units of eps * r): the start is a global optimum to rounding.
_CONJUGATE_TOLERANCE = 1000.0


def _cayley_update(C: Tensor, half_step: Tensor, identity: Tensor) -> Tensor:
    """C (I - W)^{-1} (I + W) for skew W (batched), exactly orthogonal for orthogonal C.

    Written as 2 Z - C with Z = C (I - W)^{-1}, i.e. (I + W) Z^T = C^T (as
    (I - W)^T = I + W): one solve and no product. (The torch search, used off CPU.)
    """
    solved = torch.linalg.solve(identity + half_step, C.transpose(-1, -2))
    return 2.0 * solved.transpose(-1, -2) - C


def _blas_lapack(example: np.ndarray) -> tuple[Callable[..., np.ndarray], Callable[..., tuple]]:
    """scipy's BLAS gemm and LAPACK gesv for the dtype of ``example``."""
    (gemm,) = scipy.linalg.get_blas_funcs(("gemm",), (example,))
    (gesv,) = scipy.linalg.get_lapack_funcs(("gesv",), (example,))
    return gemm, gesv


def _frames_cpu(C: np.ndarray, a: np.ndarray, gemm: Callable[..., np.ndarray]) -> np.ndarray:
    """C_i^T a C_i for a (k, r, r) stack of C_i: one (r x r) by (r x kr) product, then one per start.

    BLAS is column-major, so a C-ordered array X reaches it (as X.T, no copy) as X^T;
    each call below computes the transpose of the product it is named after.
    """
    count, size = C.shape[0], C.shape[1]
    transposed = np.ascontiguousarray(C.transpose(0, 2, 1)).reshape(count * size, size)
    # Column-major [a C_1 | ... | a C_k]; read row-major it is the stack of (a C_i)^T.
    a_times_c = gemm(1.0, a.T, transposed.T, trans_a=1).T.reshape(count, size, size)
    # (a C_i)^T C_i = (C_i^T a C_i)^T.
    return np.stack([gemm(1.0, p.T, c.T, trans_a=1, trans_b=1).T for p, c in zip(a_times_c, C, strict=True)])


def _polar(C: np.ndarray) -> np.ndarray:
    u, _, vh = np.linalg.svd(C)
    return u @ vh


def _search_cpu(
    C: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    *,
    iters: int,
    lr: float,
    prune_steps: dict[int, int],
    polish_step: int,
    work_dtype: np.dtype,
) -> tuple[np.ndarray, np.ndarray]:
    """The Riemannian Adam search of :func:`align_operators` on CPU, in numpy and scipy.

    The products with a and b are one BLAS call for all starts (a (r x r) by
    (r x k r) product), only C_i^T (a C_i) and the Cayley solve are per start; all
    go to one BLAS (scipy's) and the elementwise work is numpy's, so no two thread
    pools (torch's OpenMP, numpy's and scipy's OpenBLAS) compete for the cores,
    which made the torch loop slower at 2 threads than at 1. Returns each
    remaining start's best iterate and its objective, in the dtype of ``a``.
    """
    dtype = a.dtype
    a_work, b_work = a.astype(work_dtype), b.astype(work_dtype)
    C = C.astype(work_dtype)
    gemm, gesv = _blas_lapack(a_work)
    identity = np.eye(a.shape[0], dtype=work_dtype)
    first_moment = np.zeros_like(C)
    second_moment = np.zeros_like(C)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    best_C = C.copy()
    best_inner = np.full(C.shape[0], -np.inf, dtype=work_dtype)
    for step in range(1, iters + 2):
        if step == polish_step and work_dtype != dtype:
            # Back to the input's dtype: re-orthonormalise (polar factor) and re-score the bests.
            work_dtype, a_work, b_work = dtype, a, b
            gemm, gesv = _blas_lapack(a)
            identity = np.eye(a.shape[0], dtype=dtype)
            C, best_C = _polar(C.astype(dtype)), _polar(best_C.astype(dtype))
            best_inner = np.einsum("kij,ij->k", _frames_cpu(best_C, a, gemm), b)
            first_moment, second_moment = first_moment.astype(dtype), second_moment.astype(dtype)
        # f(C) = <a, C b C^T> = <C^T a C, b>; its Riemannian gradient at C, written in
        # the Lie algebra (C Omega), is Omega = skew(a_C b^T + a_C^T b), a_C = C^T a C.
        a_in_frame = _frames_cpu(C, a_work, gemm)
        inner = np.einsum("kij,ij->k", a_in_frame, b_work)
        improved = inner > best_inner
        best_inner = np.where(improved, inner, best_inner)
        best_C[improved] = C[improved]
        if step == iters + 1:
            break
        if step in prune_steps and C.shape[0] > prune_steps[step]:
            # Successive halving: continue the leading starts from their current state.
            keep = np.argsort(-inner, kind="stable")[: prune_steps[step]]
            C, a_in_frame, best_C, best_inner = C[keep], a_in_frame[keep], best_C[keep], best_inner[keep]
            first_moment, second_moment = first_moment[keep], second_moment[keep]
        count, size = C.shape[0], C.shape[1]
        # a_C b^T + a_C^T b for all starts: two products with b, accumulated in one buffer.
        stacked = a_in_frame.reshape(count * size, size)
        stacked_transposed = np.ascontiguousarray(a_in_frame.transpose(0, 2, 1)).reshape(count * size, size)
        euclidean_part = gemm(1.0, b_work.T, stacked.T, trans_a=1)
        euclidean_part = gemm(1.0, b_work.T, stacked_transposed.T, beta=1.0, c=euclidean_part, overwrite_c=1)
        euclidean_part = euclidean_part.T.reshape(count, size, size)
        omega = euclidean_part - euclidean_part.transpose(0, 2, 1)
        omega *= 0.5
        # Adam, in place: m <- beta1 m + (1 - beta1) omega, v <- beta2 v + (1 - beta2) omega^2,
        # direction = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps); elementwise,
        # so the step stays skew-symmetric (|omega_ij| = |omega_ji|).
        first_moment *= beta1
        first_moment += (1 - beta1) * omega
        omega *= omega
        second_moment *= beta2
        second_moment += (1 - beta2) * omega
        denominator = np.sqrt(second_moment)
        denominator *= 1.0 / math.sqrt(1 - beta2**step)
        denominator += eps
        step_size = 0.5 * lr * (1 + math.cos(math.pi * (step - 1) / iters))
        # I - W, W = half the Adam step. The Cayley update C (I - W)^{-1} (I + W) is
        # 2 Z - C with (I + W) Z^T = C^T, one solve: gesv gets (I - W)^T = I + W and
        # C^T as the transposed views of the row-major I - W and C (and overwrites I - W).
        minus_half_step = first_moment / denominator
        minus_half_step *= -0.5 * step_size / (1 - beta1**step)
        minus_half_step += identity
        updated = np.empty_like(C)
        for index in range(count):
            _, _, z_transposed, info = gesv(minus_half_step[index].T, C[index].T, overwrite_a=True)
            if info != 0:  # I + W with W skew is never singular
                raise RuntimeError(f"align_operators: Cayley solve failed (LAPACK info {info})")
            np.subtract(2.0 * z_transposed.T, C[index], out=updated[index])
        C = updated
    return best_C, best_inner


def _search_torch(
    C: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    iters: int,
    lr: float,
    prune_steps: dict[int, int],
    polish_step: int,
    work_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """The Riemannian Adam search of :func:`align_operators` in torch (off CPU).

    The same steps as :func:`_search_cpu`; returns each remaining start's best
    iterate and its objective.
    """
    dtype, device = a.dtype, a.device
    identity = torch.eye(a.shape[0], dtype=dtype, device=device)
    a_work, b_work, identity_work = a.to(work_dtype), b.to(work_dtype), identity.to(work_dtype)
    C = C.to(work_dtype)
    first_moment = torch.zeros_like(C)
    second_moment = torch.zeros_like(C)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    # Adam keeps stepping near an optimum, so keep each start's best iterate.
    best_C = C.clone()
    best_inner = torch.full((C.shape[0],), -math.inf, dtype=work_dtype, device=device)
    for step in range(1, iters + 2):
        if step == polish_step and work_dtype != dtype:
            # Back to the input's dtype: re-orthonormalise (polar factor) and re-score the bests.
            u, _, vh = torch.linalg.svd(C.to(dtype))
            C = u @ vh
            u, _, vh = torch.linalg.svd(best_C.to(dtype))
            best_C = u @ vh
            best_inner = ((best_C.transpose(-1, -2) @ a @ best_C) * b).sum(dim=(-2, -1))
            first_moment, second_moment = first_moment.to(dtype), second_moment.to(dtype)
            work_dtype, a_work, b_work, identity_work = dtype, a, b, identity
        # f(C) = <a, C b C^T> = <C^T a C, b>; its Riemannian gradient at C, written in
        # the Lie algebra (C Omega), is Omega = skew(a_C b^T + a_C^T b), a_C = C^T a C.
        a_in_frame = C.transpose(-1, -2) @ a_work @ C
        inner = (a_in_frame * b_work).sum(dim=(-2, -1))
        improved = inner > best_inner
        best_inner = torch.where(improved, inner, best_inner)
        best_C = torch.where(improved[:, None, None], C, best_C)
        if step == iters + 1:
            break
        if step in prune_steps and C.shape[0] > prune_steps[step]:
            # Successive halving: continue the leading starts from their current state.
            keep = torch.argsort(inner, descending=True)[: prune_steps[step]]
            C, a_in_frame, best_C, best_inner = C[keep], a_in_frame[keep], best_C[keep], best_inner[keep]
            first_moment, second_moment = first_moment[keep], second_moment[keep]
        euclidean_part = torch.baddbmm(
            a_in_frame @ b_work.T, a_in_frame.transpose(-1, -2), b_work.expand_as(a_in_frame)
        )
        omega = euclidean_part - euclidean_part.transpose(-1, -2)
        omega *= 0.5
        # Adam, in place (the elementwise work costs as much as the products at r = 100):
        # m <- beta1 m + (1 - beta1) omega, v <- beta2 v + (1 - beta2) omega^2,
        # direction = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps).
        first_moment.mul_(beta1).add_(omega, alpha=1 - beta1)
        second_moment.mul_(beta2).addcmul_(omega, omega, value=1 - beta2)
        # Elementwise Adam keeps the step skew-symmetric (|omega_ij| = |omega_ji|).
        denominator = second_moment.sqrt().div_(math.sqrt(1 - beta2**step)).add_(eps)
        step_size = 0.5 * lr * (1 + math.cos(math.pi * (step - 1) / iters))
        half_step = torch.div(first_moment, denominator).mul_(0.5 * step_size / (1 - beta1**step))
        C = _cayley_update(C, half_step, identity_work)
    return best_C, best_inner


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

    # Large operators: search in float32 (half the cost of every product), keep the
    # best 4 starts after 30% of the steps and the best 2 after 60%, continuing them
    # from where they are (successive halving), and run the last _POLISH_FRACTION of the steps in the
    # input's dtype, so the optimum is as precise as a search in that dtype.
    large = size >= _LARGE_OPERATOR and dtype == torch.float64
    prune_steps = {max(1, math.ceil(fraction * iters)): keep for fraction, keep in _PRUNING} if large else {}
    polish_step = iters + 1 - max(1, math.ceil(_POLISH_FRACTION * iters)) if large else 1
    work_dtype = torch.float32 if large else dtype
    # The starts, scored in the input's dtype: the eigenbasis starts are exact for
    # conjugate operators, which a float32 search would round.
    start_inner = ((C.transpose(-1, -2) @ a @ C) * b).sum(dim=(-2, -1))
    best_start = int(torch.argmax(start_inner))
    best_start_C, best_start_inner = C[best_start], start_inner[best_start]
    residual = float(torch.linalg.matrix_norm(a - best_start_C @ b @ best_start_C.T))
    if residual <= _CONJUGATE_TOLERANCE * size * torch.finfo(dtype).eps:
        # Conjugate to rounding (an eigenbasis start recovered C): the distance is 0 up
        # to this residual, so no search can lower it by more than that; skip the search.
        found = best_start_C
    else:
        search_settings = {"iters": iters, "lr": lr, "prune_steps": prune_steps, "polish_step": polish_step}
        if device.type == "cpu" and dtype in (torch.float32, torch.float64):
            best_C_np, best_inner_np = _search_cpu(
                C.numpy(), a.numpy(), b.numpy(), work_dtype=np.dtype(str(work_dtype).removeprefix("torch.")),
                **search_settings,
            )
            best_C, best_inner = torch.from_numpy(best_C_np), torch.from_numpy(best_inner_np)
        else:
            best_C, best_inner = _search_torch(C, a, b, work_dtype=work_dtype, **search_settings)
        best = int(torch.argmax(best_inner))
        found = best_C[best].to(dtype)
        if bool(best_start_inner > ((found.T @ a @ found) * b).sum()):
            found = best_start_C
    # One polar step removes rounding drift accumulated over the Cayley updates.
    u, _, vh = torch.linalg.svd(found)
    orthogonal = u @ vh
    aligned_b = orthogonal @ B_t @ orthogonal.T
    # arccos(cosine) as 2 arcsin(|a - b| / 2) of the unit-norm operators: the same angle, but
    # exact near 0, where arccos turns a cosine's last-bit rounding (1 - 2e-16) into 2e-8.
    chord = float(torch.linalg.matrix_norm(A_t / norm_a - aligned_b / norm_b))
    return OperatorAlignment(
        orthogonal=orthogonal,
        euclidean=float(torch.linalg.matrix_norm(A_t - aligned_b)),
        angular=2.0 * math.asin(min(1.0, chord / 2.0)),
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
    the same numerical rank) for them.

    Usage: ``DSA(n_delays=10, rank=20).score(X, Y)``; after ``fit(X, Y)`` the
    operators, the alignment and the distance are in ``operator_x_``,
    ``operator_y_``, ``alignment_`` (None for "wasserstein") and ``distance_``.

    Args:
        n_delays, delay_interval: delay embedding (:func:`delay_embed`).
        rank: HAVOK rank (:func:`havok_operator`); None keeps every component above
            rounding (each system's numerical rank).
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
