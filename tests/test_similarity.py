"""Tests for masalign.similarity.

Each measure is checked against an independent textbook computation in float64
(scipy, explicit N x N Gram matrices, loops over index tuples), then for its
invariances, metric axioms, behaviour on known cases and boundary errors.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masalign import similarity as sim
from masalign.similarity import dsa as dsa_module

SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
FAST = settings(max_examples=15, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    """These tests use small matrices, where OpenMP threads only add overhead (and
    stall badly when the CPU is shared); restore the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_pair(rng: np.random.Generator, n: int = 40, d_x: int = 7, d_y: int = 5, noise: float = 1.0):
    """Paired activations with shared structure plus noise."""
    X = rng.standard_normal((n, d_x))
    Y = X @ rng.standard_normal((d_x, d_y)) + noise * rng.standard_normal((n, d_y))
    return X, Y


def random_orthogonal(rng: np.random.Generator, size: int, det: float = 1.0) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((size, size)))
    q = q * np.sign(np.diag(r))
    if np.sign(np.linalg.det(q)) != det:
        q[:, 0] = -q[:, 0]
    return q


def centred_gram(X: np.ndarray) -> np.ndarray:
    Xc = X - X.mean(axis=0)
    return Xc @ Xc.T


# --------------------------------------------------------------------------- #
# RSA
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "metric, scipy_metric",
    [("correlation", "correlation"), ("cosine", "cosine"), ("euclidean", "euclidean"), ("sqeuclidean", "sqeuclidean")],
)
def test_rdm_matches_scipy_pdist(metric, scipy_metric):
    X = np.random.default_rng(0).standard_normal((25, 6)) + 3.0
    ours = sim.rdm(X, metric).numpy()
    reference = scipy.spatial.distance.squareform(scipy.spatial.distance.pdist(X, scipy_metric))
    np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-12)
    assert np.all(np.diag(ours) == 0)


def test_compare_rdms_matches_scipy_stats():
    rng = np.random.default_rng(1)
    X, Y = random_pair(rng, n=30)
    rdm_x = scipy.spatial.distance.squareform(scipy.spatial.distance.pdist(X, "correlation"))
    rdm_y = scipy.spatial.distance.squareform(scipy.spatial.distance.pdist(Y, "correlation"))
    u = scipy.spatial.distance.squareform(rdm_x, checks=False)
    v = scipy.spatial.distance.squareform(rdm_y, checks=False)
    assert sim.compare_rdms(rdm_x, rdm_y, "spearman") == pytest.approx(scipy.stats.spearmanr(u, v).statistic, abs=1e-12)
    assert sim.compare_rdms(rdm_x, rdm_y, "pearson") == pytest.approx(scipy.stats.pearsonr(u, v).statistic, abs=1e-12)
    assert sim.compare_rdms(rdm_x, rdm_y, "kendall") == pytest.approx(scipy.stats.kendalltau(u, v).statistic, abs=1e-12)
    assert sim.compare_rdms(rdm_x, rdm_y, "cosine") == pytest.approx(
        1 - scipy.spatial.distance.cosine(u, v), abs=1e-12
    )
    assert sim.rsa(X, Y) == pytest.approx(scipy.stats.spearmanr(u, v).statistic, abs=1e-10)


@FAST
@given(seed=SEEDS)
def test_spearman_handles_ties_like_scipy(seed):
    # Small integer features give many tied squared distances.
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 3, size=(12, 2))
    Y = rng.integers(0, 3, size=(12, 2))
    u = scipy.spatial.distance.pdist(X, "sqeuclidean")
    v = scipy.spatial.distance.pdist(Y, "sqeuclidean")
    if np.ptp(u) == 0 or np.ptp(v) == 0:
        return
    ours = sim.rsa(X, Y, metric="sqeuclidean", comparison="spearman")
    assert ours == pytest.approx(scipy.stats.spearmanr(u, v).statistic, abs=1e-12)
    ours_tau = sim.rsa(X, Y, metric="sqeuclidean", comparison="kendall")
    assert ours_tau == pytest.approx(scipy.stats.kendalltau(u, v).statistic, abs=1e-12)


def test_kendall_is_fast_for_a_thousand_samples():
    rng = np.random.default_rng(2)
    X, Y = random_pair(rng, n=1000, d_x=20, d_y=10)
    start = time.perf_counter()
    tau = sim.rsa(X, Y, metric="euclidean", comparison="kendall")
    assert time.perf_counter() - start < 10.0
    u = scipy.spatial.distance.pdist(X, "euclidean")
    v = scipy.spatial.distance.pdist(Y, "euclidean")
    assert tau == pytest.approx(scipy.stats.kendalltau(u, v).statistic, abs=1e-10)


# --------------------------------------------------------------------------- #
# CKA
# --------------------------------------------------------------------------- #


def gram_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with HSIC = tr(K H L H)."""
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T

    def hsic(a, b):
        return np.trace(a @ H @ b @ H)

    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def u_statistic_hsic(K: np.ndarray, L: np.ndarray) -> float:
    """Unbiased HSIC as the U-statistic over distinct ordered 4-tuples (Song et al. 2012):
    mean of K_ij L_ij + K_ij L_qr - 2 K_ij L_iq over all distinct (i, j, q, r)."""
    n = K.shape[0]
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
        count += 1
    return total / count


def u_statistic_cka(K: np.ndarray, L: np.ndarray) -> float:
    return u_statistic_hsic(K, L) / math.sqrt(u_statistic_hsic(K, K) * u_statistic_hsic(L, L))


@pytest.mark.parametrize("n, d_x, d_y", [(40, 7, 5), (10, 30, 25)])  # tall, and wide (d > N)
def test_linear_cka_matches_gram_matrix_hsic(n, d_x, d_y):
    X, Y = random_pair(np.random.default_rng(3), n=n, d_x=d_x, d_y=d_y)
    assert sim.linear_cka(X, Y) == pytest.approx(gram_cka(X, Y), abs=1e-12)


@pytest.mark.parametrize("d_x", [3, 12])  # both the plain and the width-reduced route
def test_debiased_linear_cka_matches_u_statistic_loop(d_x):
    X, Y = random_pair(np.random.default_rng(4), n=7, d_x=d_x, d_y=4, noise=0.5)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    expected = u_statistic_cka(Xc @ Xc.T, Yc @ Yc.T)
    assert sim.linear_cka(X, Y, debiased=True) == pytest.approx(expected, abs=1e-12)


def rbf_gram(X: np.ndarray, sigma_fraction: float) -> np.ndarray:
    distances = scipy.spatial.distance.pdist(X)
    sigma = sigma_fraction * np.median(distances)
    return np.exp(-scipy.spatial.distance.squareform(distances) ** 2 / (2 * sigma**2))


def test_rbf_cka_matches_direct_computation():
    X, Y = random_pair(np.random.default_rng(5), n=30)
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    for fraction in (0.5, 1.0, 2.0):
        K, L = H @ rbf_gram(X, fraction) @ H, H @ rbf_gram(Y, fraction) @ H
        expected = np.sum(K * L) / (np.linalg.norm(K) * np.linalg.norm(L))
        assert sim.rbf_cka(X, Y, sigma_fraction=fraction) == pytest.approx(expected, abs=1e-12)


def test_debiased_rbf_cka_matches_u_statistic_loop():
    X, Y = random_pair(np.random.default_rng(6), n=7)
    expected = u_statistic_cka(rbf_gram(X, 1.0), rbf_gram(Y, 1.0))
    assert sim.rbf_cka(X, Y, debiased=True) == pytest.approx(expected, abs=1e-12)


def test_debiased_cka_near_zero_for_independent_wide_data():
    rng = np.random.default_rng(7)
    X, Y = rng.standard_normal((50, 500)), rng.standard_normal((50, 500))
    assert sim.linear_cka(X, Y) > 0.8  # the biased estimator is dominated by d >> N
    assert abs(sim.linear_cka(X, Y, debiased=True)) < 0.05


def test_angular_cka_is_arccos_of_cka():
    X, Y = random_pair(np.random.default_rng(8))
    assert sim.angular_cka_distance(X, Y) == pytest.approx(math.acos(sim.linear_cka(X, Y)), abs=1e-12)


# --------------------------------------------------------------------------- #
# Procrustes and Bures
# --------------------------------------------------------------------------- #


def test_procrustes_distance_matches_scipy_orthogonal_procrustes():
    X, Y = random_pair(np.random.default_rng(9), n=30, d_x=6, d_y=4)
    Xn = X - X.mean(0)
    Yn = Y - Y.mean(0)
    Xn /= np.linalg.norm(Xn)
    Yn /= np.linalg.norm(Yn)
    Yn = np.hstack([Yn, np.zeros((30, 2))])  # zero-pad the narrower matrix
    rotation, _ = scipy.linalg.orthogonal_procrustes(Yn, Xn)
    expected = np.linalg.norm(Xn - Yn @ rotation)
    assert sim.procrustes_distance(X, Y) == pytest.approx(expected, abs=1e-12)
    assert sim.procrustes_distance(Y, X) == pytest.approx(expected, abs=1e-12)
    cosine = np.sum(Xn * (Yn @ rotation))
    assert sim.procrustes_angular_distance(X, Y) == pytest.approx(math.acos(cosine), abs=1e-10)


@pytest.mark.parametrize("n, d_x, d_y", [(15, 4, 6), (8, 20, 12)])
def test_nbs_matches_explicit_matrix_square_roots(n, d_x, d_y):
    X, Y = random_pair(np.random.default_rng(10), n=n, d_x=d_x, d_y=d_y)
    K, L = centred_gram(X), centred_gram(Y)
    root_k = np.real(scipy.linalg.sqrtm(K))
    root_l = np.real(scipy.linalg.sqrtm(L))
    fidelity = np.linalg.norm(root_k @ root_l, ord="nuc")
    expected = fidelity / math.sqrt(np.trace(K) * np.trace(L))
    assert sim.normalized_bures_similarity(X, Y) == pytest.approx(expected, abs=1e-6)
    assert sim.normalized_bures_similarity(X, Y) == pytest.approx(
        math.cos(sim.procrustes_angular_distance(X, Y)), abs=1e-12
    )


# --------------------------------------------------------------------------- #
# Invariances and metric axioms
# --------------------------------------------------------------------------- #

ROTATION_INVARIANT = {
    "linear_cka": sim.linear_cka,
    "debiased_cka": lambda X, Y: sim.linear_cka(X, Y, debiased=True),
    "rbf_cka": sim.rbf_cka,
    "procrustes_angular": sim.procrustes_angular_distance,
    "procrustes_euclidean": sim.procrustes_distance,
    "nbs": sim.normalized_bures_similarity,
    "rsa_euclidean": lambda X, Y: sim.rsa(X, Y, metric="euclidean"),
}


@pytest.mark.parametrize("name", sorted(ROTATION_INVARIANT))
@FAST
@given(seed=SEEDS)
def test_invariant_to_rotation_isotropic_scaling_and_shift(name, seed):
    measure = ROTATION_INVARIANT[name]
    rng = np.random.default_rng(seed)
    X, Y = random_pair(rng, n=20, d_x=5, d_y=4)
    transformed = 3.7 * Y @ random_orthogonal(rng, 4, det=-1.0) + rng.standard_normal(4) * 10
    assert measure(X, transformed) == pytest.approx(measure(X, Y), abs=1e-9)


@pytest.mark.parametrize("name", ["linear_cka", "procrustes_angular", "nbs"])
def test_changed_by_anisotropic_scaling(name):
    measure = ROTATION_INVARIANT[name]
    X, Y = random_pair(np.random.default_rng(11), n=30, d_x=5, d_y=4)
    stretched = Y * np.array([10.0, 1.0, 1.0, 0.1])
    assert abs(measure(X, stretched) - measure(X, Y)) > 1e-3


METRICS = {
    "angular_cka": sim.angular_cka_distance,
    "procrustes_angular": sim.procrustes_angular_distance,
    "procrustes_euclidean": sim.procrustes_distance,
}


@pytest.mark.parametrize("name", sorted(METRICS))
@FAST
@given(seed=SEEDS)
def test_metric_axioms(name, seed):
    distance = METRICS[name]
    rng = np.random.default_rng(seed)
    # Correlated triples, so the triangle inequality is tested away from the maximum.
    base = rng.standard_normal((15, 4))
    X, Y, Z = (base + rng.uniform(0.1, 2.0) * rng.standard_normal((15, 4)) for _ in range(3))
    same_shape = 2.5 * X @ random_orthogonal(rng, 4, det=-1.0) - 4.0
    assert distance(X, same_shape) == pytest.approx(0.0, abs=1e-6)
    assert distance(X, Y) == pytest.approx(distance(Y, X), abs=1e-12)
    assert distance(X, Z) <= distance(X, Y) + distance(Y, Z) + 1e-9


# --------------------------------------------------------------------------- #
# Ridge regression
# --------------------------------------------------------------------------- #


def leave_one_out_ridge_r2(X: np.ndarray, Y: np.ndarray, alpha: float) -> float:
    predictions = np.empty_like(Y)
    for i in range(X.shape[0]):
        train = np.arange(X.shape[0]) != i
        x_mean, y_mean = X[train].mean(0), Y[train].mean(0)
        Xc, Yc = X[train] - x_mean, Y[train] - y_mean
        weights = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ Yc)
        predictions[i] = (X[i] - x_mean) @ weights + y_mean
    return 1 - np.sum((Y - predictions) ** 2) / np.sum((Y - Y.mean(0)) ** 2)


@pytest.mark.parametrize("d_x", [4, 40])  # primal and dual (wide) solvers
def test_ridge_r2_leave_one_out_matches_direct_loop(d_x):
    X, Y = random_pair(np.random.default_rng(12), n=25, d_x=d_x, d_y=3, noise=2.0)
    for alpha in (0.1, 10.0):
        ours = sim.ridge_r2(X, Y, alpha=alpha, n_folds=25)
        assert ours == pytest.approx(leave_one_out_ridge_r2(X, Y, alpha), abs=1e-10)


def test_ridge_r2_is_seeded_and_directional():
    rng = np.random.default_rng(13)
    X = rng.standard_normal((60, 6))
    Y = X[:, :2] @ rng.standard_normal((2, 3))  # Y is a function of two of X's columns
    assert sim.ridge_r2(X, Y, alpha=1e-3, seed=5) == sim.ridge_r2(X, Y, alpha=1e-3, seed=5)
    assert sim.ridge_r2(X, Y, alpha=1e-3) > 0.99
    assert sim.ridge_r2(Y, X, alpha=1e-3) < 0.5
    noisy = Y + rng.standard_normal(Y.shape)
    assert sim.ridge_r2(X, noisy, seed=1) != sim.ridge_r2(X, noisy, seed=2)


# --------------------------------------------------------------------------- #
# DSA
# --------------------------------------------------------------------------- #


def test_delay_embed_builds_the_hankel_matrix():
    trajectory = np.arange(20.0).reshape(10, 2)
    embedded = sim.delay_embed(trajectory, n_delays=3, delay_interval=2).numpy()
    assert embedded.shape == (10 - 4, 6)
    for t in range(embedded.shape[0]):
        expected = np.concatenate([trajectory[t + 4], trajectory[t + 2], trajectory[t]])
        np.testing.assert_array_equal(embedded[t], expected)


def test_havok_operator_recovers_linear_dynamics_and_accepts_ragged_trials():
    rng = np.random.default_rng(14)
    dynamics = np.array([[0.9, -0.3, 0.0], [0.3, 0.9, 0.0], [0.0, 0.0, 0.5]])
    observation = rng.standard_normal((3, 3))  # an invertible, non-orthogonal view
    trials = []
    for length in (30, 45, 60):
        state = rng.standard_normal(3)
        path = []
        for _ in range(length):
            path.append(state)
            state = dynamics @ state
        trials.append(np.array(path) @ observation)
    operator = sim.havok_operator(trials, n_delays=1).numpy()
    # A conjugate of the true dynamics: the same eigenvalues.
    np.testing.assert_allclose(
        np.sort_complex(np.linalg.eigvals(operator)), np.sort_complex(np.linalg.eigvals(dynamics)), atol=1e-8
    )
    # A stacked (trials, T, d) array and the list of its trials give the same operator.
    stacked = rng.standard_normal((4, 30, 3))
    np.testing.assert_allclose(
        sim.havok_operator(stacked, n_delays=2).numpy(),
        sim.havok_operator(list(stacked), n_delays=2).numpy(),
    )


@FAST
@given(seed=SEEDS)
def test_align_operators_matches_closed_form_for_symmetric_operators(seed):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((5, 5))
    B = rng.standard_normal((5, 5))
    A, B = A + A.T, B + B.T
    closed_form = np.linalg.norm(np.sort(np.linalg.eigvalsh(A)) - np.sort(np.linalg.eigvalsh(B)))
    alignment = sim.align_operators(A, B, iters=100)
    assert alignment.euclidean == pytest.approx(closed_form, abs=1e-8)


@pytest.mark.parametrize("det", [1.0, -1.0])
@FAST
@given(seed=SEEDS)
def test_align_operators_finds_conjugate_systems(det, seed):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((6, 6))
    Q = random_orthogonal(rng, 6, det=det)
    B = Q @ A @ Q.T
    alignment = sim.align_operators(A, B, iters=200)
    assert alignment.euclidean < 1e-6 * np.linalg.norm(A)
    assert alignment.angular < 1e-5
    # Even size: C = +-Q^T are the only solutions for generic A, both with det(Q).
    assert np.linalg.det(alignment.orthogonal.numpy()) == pytest.approx(det, abs=1e-9)


def test_align_operators_descent_alone_finds_small_conjugates(monkeypatch):
    # Remove the eigenbasis starts: the identity, the reflection and random starts
    # must then reach the optimum (both components) by Riemannian descent alone.
    # align_operators looks the helper up in its own module, so patch it there.
    calls = []

    def no_eigenbasis_starts(a, b):
        calls.append(a.shape)
        return torch.empty(0, *a.shape, dtype=a.dtype, device=a.device)

    monkeypatch.setattr(dsa_module, "_eigenbasis_starts", no_eigenbasis_starts)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        A = rng.standard_normal((4, 4))
        Q = random_orthogonal(rng, 4, det=1.0 if seed % 2 else -1.0)
        alignment = sim.align_operators(A, Q @ A @ Q.T, n_restarts=8)
        assert alignment.angular < 1e-5
    assert len(calls) == 6  # the patch took effect for every call


def test_align_operators_refines_near_conjugates():
    rng = np.random.default_rng(15)
    A = rng.standard_normal((8, 8))
    perturbation = 0.05 * rng.standard_normal((8, 8))
    Q = random_orthogonal(rng, 8, det=-1.0)
    B = Q @ (A + perturbation) @ Q.T
    alignment = sim.align_operators(A, B)
    # C = Q^T achieves ||perturbation||; the optimum can only be lower, and near it.
    assert alignment.euclidean <= np.linalg.norm(perturbation) + 1e-9
    assert alignment.euclidean > 0.5 * np.linalg.norm(perturbation)
    C = alignment.orthogonal.numpy()
    # First-order optimality on O(r): with G = A C B^T + A^T C B the Euclidean
    # gradient of <A, C B C^T>, C^T G is symmetric at a stationary point.
    gradient = A @ C @ B.T + A.T @ C @ B
    in_frame = C.T @ gradient
    assert np.linalg.norm(in_frame - in_frame.T) < 1e-6 * np.linalg.norm(gradient)
    assert alignment.euclidean == pytest.approx(np.linalg.norm(A - C @ B @ C.T), abs=1e-12)


def test_spectral_wasserstein_distance():
    # Real spectra: the 2-Wasserstein distance pairs sorted eigenvalues.
    a, b = np.array([0.1, 0.5, 0.9]), np.array([-0.2, 0.4, 1.0])
    expected = math.sqrt(np.mean((np.sort(a) - np.sort(b)) ** 2))
    assert sim.spectral_wasserstein_distance(np.diag(a), np.diag(b[::-1])) == pytest.approx(expected)
    # Invariant to any invertible conjugation.
    rng = np.random.default_rng(16)
    A = rng.standard_normal((4, 4))
    M = rng.standard_normal((4, 4)) + 4 * np.eye(4)
    assert sim.spectral_wasserstein_distance(A, np.linalg.inv(M) @ A @ M) == pytest.approx(0.0, abs=1e-7)
    # Unequal counts: the same as the equal-count problem with each point repeated.
    two, four = np.diag([0.0, 1.0]), np.diag([0.2, 0.3, 0.8, 1.5])
    repeated = np.diag([0.0, 0.0, 1.0, 1.0])
    assert sim.spectral_wasserstein_distance(two, four) == pytest.approx(
        sim.spectral_wasserstein_distance(repeated, four), abs=1e-9
    )


def simulate_system(kind: str, seed: int, n_trials: int = 30, n_steps: int = 100) -> np.ndarray:
    """Noisy 2-D trajectories (trials, time, 2) of a point attractor, a line attractor
    or a bistable system, seen through a random rotation and anisotropic scaling."""
    rng = np.random.default_rng(seed)
    dt, substeps, noise = 0.05, 10, 0.3
    state = rng.uniform(-2, 2, size=(n_trials, 2))
    recorded = np.empty((n_trials, n_steps, 2))
    for t in range(n_steps):
        recorded[:, t] = state
        for _ in range(substeps):
            if kind == "point":
                drift = -state
            elif kind == "line":
                drift = np.stack([np.zeros(n_trials), -state[:, 1]], axis=1)
            else:
                drift = np.stack([state[:, 0] - state[:, 0] ** 3, -state[:, 1]], axis=1)
            state = state + dt * drift + noise * math.sqrt(dt) * rng.standard_normal(state.shape)
    geometry = random_orthogonal(rng, 2) @ np.diag([1.0, 2.0]) @ random_orthogonal(rng, 2)
    return recorded @ geometry


@pytest.mark.parametrize("score_method", ["angular", "wasserstein"])
def test_dsa_separates_line_point_and_bistable_attractors(score_method):
    kinds = ("point", "line", "bistable")
    systems = {(kind, i): simulate_system(kind, 100 * k + i) for k, kind in enumerate(kinds) for i in range(3)}
    dsa = sim.DSA(n_delays=2, score_method=score_method, iters=200)
    distances = {(a, b): dsa.score(systems[a], systems[b]) for a, b in itertools.combinations(systems, 2)}
    within = [d for (a, b), d in distances.items() if a[0] == b[0]]
    between = [d for (a, b), d in distances.items() if a[0] != b[0]]
    assert max(within) < min(between)


def test_dsa_is_zero_for_rotated_and_reflected_observations():
    X = simulate_system("bistable", 1, n_trials=10, n_steps=50)
    for det in (1.0, -1.0):
        Q = random_orthogonal(np.random.default_rng(17), 2, det=det)
        dsa = sim.DSA(n_delays=3, rank=6, iters=200).fit(X, X @ Q)
        assert dsa.distance_ < 1e-5
        assert dsa.alignment_ is not None and dsa.alignment_.euclidean < 1e-5


# --------------------------------------------------------------------------- #
# compare_all, inputs, dtypes, devices, errors
# --------------------------------------------------------------------------- #


def test_compare_all_agrees_with_the_individual_functions():
    X, Y = random_pair(np.random.default_rng(18))
    results = sim.compare_all(X, Y)
    assert results["rsa_spearman"] == pytest.approx(sim.rsa(X, Y))
    assert results["rsa_pearson"] == pytest.approx(sim.rsa(X, Y, comparison="pearson"))
    assert results["cka_linear"] == pytest.approx(sim.linear_cka(X, Y))
    assert results["cka_debiased"] == pytest.approx(sim.linear_cka(X, Y, debiased=True))
    assert results["cka_angular"] == pytest.approx(sim.angular_cka_distance(X, Y))
    assert results["procrustes_euclidean"] == pytest.approx(sim.procrustes_distance(X, Y))
    assert results["procrustes_angular"] == pytest.approx(sim.procrustes_angular_distance(X, Y))
    assert results["nbs"] == pytest.approx(sim.normalized_bures_similarity(X, Y))
    assert results["ridge_r2_xy"] == pytest.approx(sim.ridge_r2(X, Y))
    assert results["ridge_r2_yx"] == pytest.approx(sim.ridge_r2(Y, X))
    assert all(isinstance(value, float) for value in results.values())


def test_inputs_are_not_modified():
    rng = np.random.default_rng(19)
    X_np, Y_np = random_pair(rng, n=20)
    X_t, Y_t = torch.tensor(X_np), torch.tensor(Y_np)
    originals = [a.copy() for a in (X_np, Y_np)] + [t.clone() for t in (X_t, Y_t)]
    for X, Y in ((X_np, Y_np), (X_t, Y_t)):
        sim.compare_all(X, Y)
        for metric in ("correlation", "cosine", "euclidean", "sqeuclidean"):
            sim.rsa(X, Y, metric=metric, comparison="kendall")
        sim.rbf_cka(X, Y, debiased=True)
        sim.procrustes_distance(X, Y)
    trajectories = rng.standard_normal((3, 20, 2))
    trajectories_copy = trajectories.copy()
    operator = torch.tensor(rng.standard_normal((4, 4)))
    operator_copy = operator.clone()
    sim.DSA(n_delays=2, iters=5).score(trajectories, list(trajectories))
    sim.align_operators(operator, operator, iters=5)
    sim.spectral_wasserstein_distance(operator, operator)
    np.testing.assert_array_equal(X_np, originals[0])
    np.testing.assert_array_equal(Y_np, originals[1])
    assert torch.equal(X_t, originals[2]) and torch.equal(Y_t, originals[3])
    np.testing.assert_array_equal(trajectories, trajectories_copy)
    assert torch.equal(operator, operator_copy)


def test_dtypes_are_preserved():
    rng = np.random.default_rng(20)
    X64 = torch.tensor(rng.standard_normal((10, 3)))
    assert sim.rdm(X64).dtype == torch.float64
    assert sim.rdm(X64.float()).dtype == torch.float32
    assert sim.rdm(np.arange(30).reshape(10, 3)).dtype == torch.float64  # integers become float64
    trajectories = rng.standard_normal((2, 15, 3))
    assert sim.havok_operator(trajectories, n_delays=2).dtype == torch.float64
    assert sim.delay_embed(trajectories[0], n_delays=2).dtype == torch.float64
    alignment = sim.align_operators(rng.standard_normal((3, 3)), rng.standard_normal((3, 3)), iters=5)
    assert alignment.orthogonal.dtype == torch.float64
    # float32 stays float32 (operators too), with float32-accurate scores.
    X32 = torch.tensor(rng.standard_normal((50, 4)), dtype=torch.float32)
    assert sim.linear_cka(X32, X32 @ torch.eye(4)) == pytest.approx(1.0, abs=1e-5)
    trajectories32 = torch.tensor(trajectories, dtype=torch.float32)
    assert sim.havok_operator(trajectories32, n_delays=2).dtype == torch.float32
    # Mixed float32 / float64 inputs are promoted to float64.
    operator = torch.tensor(rng.standard_normal((3, 3)))
    assert sim.align_operators(operator.float(), operator, iters=5).orthogonal.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    X, Y = random_pair(np.random.default_rng(21), n=50)
    on_gpu = sim.compare_all(torch.tensor(X).cuda(), torch.tensor(Y).cuda())
    on_cpu = sim.compare_all(X, Y)
    for key, value in on_cpu.items():
        assert on_gpu[key] == pytest.approx(value, abs=1e-8), key
    trajectories = np.random.default_rng(22).standard_normal((3, 30, 2))
    dsa_gpu = sim.DSA(n_delays=2, iters=50).score(torch.tensor(trajectories).cuda(), torch.tensor(trajectories).cuda())
    assert dsa_gpu < 1e-6


def test_clear_errors():
    rng = np.random.default_rng(23)
    X = rng.standard_normal((10, 3))
    with pytest.raises(ValueError, match=r"X must be a 2-D \(samples, features\) matrix; got shape \(10,\)"):
        sim.linear_cka(X[:, 0], X)
    with pytest.raises(ValueError, match=r"Y must be a 2-D .* got shape \(2, 5, 3\)"):
        sim.procrustes_distance(X, rng.standard_normal((2, 5, 3)))
    with pytest.raises(ValueError, match=r"same number of samples .* X has 10, Y has 9"):
        sim.linear_cka(X, X[:9])
    with pytest.raises(ValueError, match=r"source has 10, target has 8"):
        sim.ridge_r2(X, X[:8])
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="X contains NaN or infinite values"):
        sim.rsa(bad, X)
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="Y contains NaN or infinite values"):
        sim.normalized_bures_similarity(X, bad)
    with pytest.raises(ValueError, match="at least 2 samples; got 1"):
        sim.linear_cka(X[:1], X[:1])
    with pytest.raises(ValueError, match="at least 4 samples; got 3"):
        sim.linear_cka(X[:3], X[:3], debiased=True)
    with pytest.raises(ValueError, match="at least 3 samples; got 2"):
        sim.rsa(X[:2], X[:2])
    with pytest.raises(ValueError, match="constant across samples"):
        sim.procrustes_distance(np.ones((10, 3)), X)
    with pytest.raises(ValueError, match="constant rows"):
        sim.rdm(np.ones((10, 3)))
    with pytest.raises(ValueError, match="unknown RDM metric"):
        sim.rdm(X, "manhattan")  # type: ignore[arg-type]
    for alpha in (0.0, math.inf):
        with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
            sim.ridge_r2(X, X, alpha=alpha)
    with pytest.raises(ValueError, match=r"n_folds must be in \[2, N=10\]; got 11"):
        sim.ridge_r2(X, X, n_folds=11)
    with pytest.raises(ValueError, match="too short for 10 delays"):
        sim.havok_operator(rng.standard_normal((5, 2)), n_delays=10)
    with pytest.raises(ValueError, match=r"same number of features; got \[2, 3\]"):
        sim.havok_operator([rng.standard_normal((20, 2)), rng.standard_normal((20, 3))], n_delays=2)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 4\]"):
        sim.havok_operator(rng.standard_normal((20, 2)), n_delays=2, rank=5)
    with pytest.raises(ValueError, match="operators have different sizes"):
        sim.DSA(n_delays=2).fit(rng.standard_normal((20, 2)), rng.standard_normal((20, 3)))
    with pytest.raises(ValueError, match="sigma_fraction must be a finite number > 0; got inf"):
        sim.rbf_cka(X, X, sigma_fraction=math.inf)
    with pytest.raises(ValueError, match="ridge must be a finite number >= 0; got nan"):
        sim.havok_operator(rng.standard_normal((20, 2)), n_delays=2, ridge=math.nan)
    with pytest.raises(ValueError, match="n_delays must be a whole number >= 1; got 2.5"):
        sim.havok_operator(rng.standard_normal((20, 2)), n_delays=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown score_method"):
        sim.DSA(score_method="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same size"):
        sim.align_operators(np.eye(3), np.eye(4))


@pytest.mark.parametrize("value", [0.1, 1 / 3, 1000.1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constants_floats_cannot_hold_are_still_constant(value, dtype):
    """Centring a column of 0.1s leaves rounding noise, not zeros: each measure must still refuse
    it rather than return a number (5e-33, 0.0, -9e-10 or 1.41 before)."""
    rng = np.random.default_rng(31)
    Y = rng.standard_normal((40, 5)).astype(dtype)
    constant = np.full((40, 6), value, dtype=dtype)
    for measure in (
        lambda: sim.linear_cka(constant, Y),
        lambda: sim.linear_cka(Y, constant, debiased=True),
        lambda: sim.rbf_cka(constant, Y),
        lambda: sim.normalized_bures_similarity(constant, Y),
        lambda: sim.procrustes_distance(Y, constant),
        lambda: sim.procrustes_angular_distance(constant, Y),
    ):
        with pytest.raises(ValueError, match="is constant across samples"):
            measure()
    with pytest.raises(ValueError, match="target is constant across samples"):
        sim.ridge_r2(Y, constant)
    one_constant_row = Y.copy()
    one_constant_row[7] = value
    with pytest.raises(ValueError, match="constant rows; Y has 1 such rows"):
        sim.rsa(Y, one_constant_row)
    with pytest.raises(ValueError, match="constant rows; Y has 1 such rows"):
        sim.compare_all(Y, one_constant_row)


@pytest.mark.parametrize("comparison", ["pearson", "spearman", "kendall"])
@pytest.mark.parametrize("metric", ["euclidean", "correlation"])
def test_an_rdm_of_equal_dissimilarities_has_no_correlation(metric, comparison):
    """eye(6): every distance is sqrt(2), which centred on its float mean is noise, not zero."""
    Y = np.random.default_rng(32).standard_normal((6, 4))
    with pytest.raises(ValueError, match="all off-diagonal dissimilarities equal"):
        sim.rsa(np.eye(6), Y, metric=metric, comparison=comparison)
    with pytest.raises(ValueError, match="all off-diagonal dissimilarities equal"):
        sim.compare_rdms(torch.as_tensor(Y @ Y.T * 0 + 1 - np.eye(6)), torch.as_tensor(sim.rdm(Y).numpy()), comparison)


def test_compare_rdms_refuses_matrices_that_are_not_dissimilarities():
    rdm = sim.rdm(np.random.default_rng(33).standard_normal((8, 3)), "euclidean")
    asymmetric = rdm.clone()
    asymmetric[1, 4] += 1.0
    with_diagonal = rdm + torch.eye(8)
    for bad in (asymmetric, with_diagonal):
        with pytest.raises(ValueError, match="rdm_y is not a dissimilarity matrix .*symmetric with a zero diagonal"):
            sim.compare_rdms(rdm, bad)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize(("dtype", "scales"), [(np.float32, [1e9, 1e-12, 1e15]), (np.float64, [1e80, 1e-90])])
def test_linear_cka_is_scale_invariant_where_its_sums_leave_the_float_range(debiased, dtype, scales):
    """Its sums are fourth powers of the data: 0.0, NaN or a wrong value came back at these scales."""
    rng = np.random.default_rng(34)
    X = rng.standard_normal((200, 16))
    Y = X @ rng.standard_normal((16, 12)) + rng.standard_normal((200, 12))
    expected = sim.linear_cka(X, Y, debiased=debiased)
    for scale in scales:
        got = sim.linear_cka((X * scale).astype(dtype), Y.astype(dtype), debiased=debiased)
        assert got == pytest.approx(expected, rel=1e-5 if dtype == np.float32 else 1e-12), scale
        on_torch = sim.linear_cka(torch.as_tensor((X * scale).astype(dtype)).requires_grad_(), torch.as_tensor(Y.astype(dtype)), debiased=debiased)
        assert on_torch == pytest.approx(expected, rel=1e-5 if dtype == np.float32 else 1e-12), scale


# --------------------------------------------------------------------------- #
# Fast paths (CPU numpy routes, large-operator search) equal the plain formulas
# --------------------------------------------------------------------------- #


def test_integer_key_ranks_match_scipy_rankdata():
    from masalign.similarity.rsa import _average_ranks_numpy

    rng = np.random.default_rng(24)
    cases = [
        rng.standard_normal(5000),
        rng.integers(-3, 4, 3000).astype(float),  # many ties, negatives
        1.0 + 1e-12 * rng.standard_normal(4000),  # values that agree in their leading bits
        np.array([0.0, -0.0, 1e-300, -1e-300, 2.0, 2.0, -5.0]),
        np.array([3.0]),
    ]
    for values in cases:
        np.testing.assert_array_equal(_average_ranks_numpy(values), scipy.stats.rankdata(values))


@pytest.mark.parametrize(
    "n, d_x, d_y, offset",
    [(300, 20, 30, 0.0), (300, 20, 30, 10.0), (40, 7, 5, 1e4), (30, 40, 25, 3.0)],  # raw, raw, centred, n x n
)
def test_linear_cka_fast_path_equals_plain_formula(n, d_x, d_y, offset):
    rng = np.random.default_rng(25)
    X, Y = random_pair(rng, n=n, d_x=d_x, d_y=d_y)
    X, Y = X + offset, Y - offset
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    plain = np.linalg.norm(Xc.T @ Yc) ** 2 / (np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc))
    assert sim.linear_cka(X, Y) == pytest.approx(plain, abs=1e-10)
    # Tensors take the same route (zero-copy numpy views) and agree.
    assert sim.linear_cka(torch.tensor(X), torch.tensor(Y)) == pytest.approx(plain, abs=1e-10)


@pytest.mark.parametrize("threads", [1, 2])
def test_rsa_condensed_path_equals_full_rdms(threads):
    rng = np.random.default_rng(26)
    X, Y = random_pair(rng, n=460, d_x=12, d_y=9)  # 105,570 pairs: the threaded ranking runs at 2 threads
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for metric in ("correlation", "cosine", "euclidean", "sqeuclidean"):
            u = scipy.spatial.distance.pdist(X, metric)
            v = scipy.spatial.distance.pdist(Y, metric)
            assert sim.rsa(X, Y, metric=metric) == pytest.approx(scipy.stats.spearmanr(u, v).statistic, abs=1e-10)
            full = sim.compare_rdms(sim.rdm(X, metric), sim.rdm(Y, metric), "pearson")
            assert sim.rsa(X, Y, metric=metric, comparison="pearson") == pytest.approx(full, abs=1e-10)
    finally:
        torch.set_num_threads(previous)


def test_align_operators_large_operator_path():
    # r >= 16: float32 search with successive halving, then float64 polish.
    rng = np.random.default_rng(27)
    A = rng.standard_normal((20, 20))
    Q = random_orthogonal(rng, 20, det=-1.0)
    alignment = sim.align_operators(A, Q @ A @ Q.T, iters=100)
    assert alignment.orthogonal.dtype == torch.float64
    assert alignment.euclidean < 1e-6 * np.linalg.norm(A)
    perturbation = 0.05 * rng.standard_normal((20, 20))
    near = sim.align_operators(A, Q @ (A + perturbation) @ Q.T, iters=200)
    assert near.euclidean <= np.linalg.norm(perturbation) + 1e-9
    symmetric_a, symmetric_b = A + A.T, perturbation + perturbation.T
    closed_form = np.linalg.norm(np.sort(np.linalg.eigvalsh(symmetric_a)) - np.sort(np.linalg.eigvalsh(symmetric_b)))
    assert sim.align_operators(symmetric_a, symmetric_b, iters=50).euclidean == pytest.approx(closed_form, abs=1e-8)


@pytest.mark.parametrize("n, d_x, d_y", [(300, 20, 30), (30, 40, 25)])  # feature-space and N x N routes
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_linear_cka_fast_path_rejects_non_finite_inputs(n, d_x, d_y, value):
    # The CPU route checks finiteness from its results (a NaN or inf makes ||X_c^T X_c||_F
    # non-finite); the error must be the boundary's, naming the argument.
    rng = np.random.default_rng(28)
    X, Y = random_pair(rng, n=n, d_x=d_x, d_y=d_y)
    bad = X.copy()
    bad[n // 2, 3] = value
    with pytest.raises(ValueError, match="linear_cka: X contains NaN or infinite values"):
        sim.linear_cka(bad, Y)
    bad = Y.copy()
    bad[1, 0] = value
    with pytest.raises(ValueError, match="linear_cka: Y contains NaN or infinite values"):
        sim.linear_cka(torch.tensor(X), torch.tensor(bad))
    with pytest.raises(ValueError, match="linear_cka: Y contains NaN or infinite values"):
        sim.linear_cka(X, bad, debiased=True)


def _unit_pair_with_starts(A: np.ndarray, B: np.ndarray, n_restarts: int = 4):
    a = torch.tensor(A / np.linalg.norm(A))
    b = torch.tensor(B / np.linalg.norm(B))
    size = a.shape[0]
    identity = torch.eye(size, dtype=torch.float64)
    reflection = identity.clone()
    reflection[-1, -1] = -1.0
    generator = torch.Generator().manual_seed(0)
    starts = torch.cat(
        [identity[None], reflection[None], dsa_module._eigenbasis_starts(a, b),
         dsa_module._random_orthogonal(size, n_restarts, generator, torch.float64)]
    )
    return starts, a, b


@pytest.mark.parametrize("size, iters", [(6, 60), (20, 40)])
def test_align_operators_cpu_search_equals_torch_search(size, iters):
    # The CPU search (scipy BLAS/LAPACK, numpy) runs the same steps as the torch search
    # used off CPU; in float64 (no float32 phase) they agree to rounding.
    rng = np.random.default_rng(29)
    A, B = rng.standard_normal((size, size)), rng.standard_normal((size, size))
    starts, a, b = _unit_pair_with_starts(A, B)
    settings_ = {"iters": iters, "lr": 0.1, "prune_steps": {12: 4, 24: 2}, "polish_step": 1}
    best_C_cpu, best_inner_cpu = dsa_module._search_cpu(
        starts.numpy(), a.numpy(), b.numpy(), work_dtype=np.dtype(np.float64), **settings_
    )
    best_C_torch, best_inner_torch = dsa_module._search_torch(starts, a, b, work_dtype=torch.float64, **settings_)
    np.testing.assert_allclose(best_inner_cpu, best_inner_torch.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(best_C_cpu, best_C_torch.numpy(), rtol=0, atol=1e-8)
    # The float32 search with a float64 polish (the large-operator settings) reaches the same optimum.
    settings_ = {"iters": 200, "lr": 0.1, "prune_steps": {60: 4, 120: 2}, "polish_step": 181}
    _, best_cpu = dsa_module._search_cpu(
        starts.numpy(), a.numpy(), b.numpy(), work_dtype=np.dtype(np.float32), **settings_
    )
    _, best_torch = dsa_module._search_torch(starts, a, b, work_dtype=torch.float32, **settings_)
    assert best_cpu.dtype == np.float64
    assert best_cpu.max() == pytest.approx(float(best_torch.max()), abs=1e-6)


def test_align_operators_skips_the_search_for_exact_conjugates(monkeypatch):
    # An eigenbasis start that recovers C to rounding ends the search (nothing can be
    # lower than 0); the result equals that of the full search.
    rng = np.random.default_rng(30)
    A = rng.standard_normal((20, 20))
    Q = random_orthogonal(rng, 20, det=-1.0)
    calls = []
    original = dsa_module._search_cpu
    monkeypatch.setattr(dsa_module, "_search_cpu", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    quick = sim.align_operators(A, Q @ A @ Q.T)
    assert calls == []
    assert quick.angular < 1e-12 and quick.euclidean < 1e-12 * np.linalg.norm(A)
    monkeypatch.setattr(dsa_module, "_CONJUGATE_TOLERANCE", 0.0)
    searched = sim.align_operators(A, Q @ A @ Q.T)
    assert calls == [1]
    assert searched.angular < 1e-12
    assert quick.euclidean <= searched.euclidean + 1e-12 * np.linalg.norm(A)
    # Near-conjugate operators are searched as before.
    near = sim.align_operators(A, Q @ (A + 1e-6 * rng.standard_normal((20, 20))) @ Q.T, iters=50)
    assert calls == [1, 1]
    assert near.euclidean < 1e-5 * np.linalg.norm(A)


def test_float32_euclidean_rdms_keep_the_distances_of_close_points():
    """||a||^2 + ||b||^2 - 2<a, b> in float32 gave 0 for most pairs 0.01 apart in clusters 100 apart."""
    rng = np.random.default_rng(35)
    centres = rng.standard_normal((10, 8)) * 100
    X = np.repeat(centres, 3, axis=0) + rng.standard_normal((30, 8)) * 0.01
    X32 = X.astype(np.float32)
    exact = scipy.spatial.distance.squareform(scipy.spatial.distance.pdist(X32.astype(np.float64)))
    within = np.kron(np.eye(10), np.ones((3, 3))).astype(bool) & ~np.eye(30, dtype=bool)
    for got in (sim.rdm(X32, "euclidean").numpy(), sim.rdm(torch.as_tensor(X32).requires_grad_(), "euclidean").detach().numpy()):
        assert got.dtype == np.float32
        assert np.abs(got[within] / exact[within] - 1).max() < 1e-4
    Y = X @ rng.standard_normal((8, 8))
    ours = sim.rsa(X32, Y.astype(np.float32), metric="euclidean", comparison="spearman")
    assert ours == pytest.approx(sim.rsa(X, Y, metric="euclidean", comparison="spearman"), abs=1e-6)


def test_havok_keeps_the_components_above_rounding():
    """A 2-D rotation seen through 6 features has a Hankel matrix of rank 2: fitting its 16
    rounding-noise components gave a rotated copy of the system a DSA distance of 0.35."""
    rng = np.random.default_rng(36)
    angle = 0.3
    dynamics = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    states = [rng.standard_normal(2)]
    for _ in range(99):
        states.append(dynamics @ states[-1])
    X = np.stack(states) @ rng.standard_normal((2, 6))
    Q = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    assert sim.havok_operator(X, n_delays=3).shape == (2, 2)
    assert sim.DSA(n_delays=3, iters=200).score(X, X @ Q) < 1e-6
    with pytest.raises(ValueError, match=r"numerical rank 2, below rank=5: .*pass rank <= 2"):
        sim.havok_operator(X, n_delays=3, rank=5)
    short = rng.standard_normal((10, 5))  # 8 rows embedded, 7 transitions, rank 8
    assert sim.havok_operator(short, n_delays=3).shape == (7, 7)
    with pytest.raises(ValueError, match=r"7 time steps to fit but rank=8: .*underdetermined"):
        sim.havok_operator(short, n_delays=3, rank=8)
    assert sim.havok_operator(short, n_delays=3, rank=8, ridge=1e-3).shape == (8, 8)
