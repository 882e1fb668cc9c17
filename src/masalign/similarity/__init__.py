"""Correlational and dynamical similarity measures between two networks' activations.

These are the baselines that MAS (docs/method.md section 8) is put side by side with:
RSA, CKA (linear, debiased, RBF, angular), Procrustes (Euclidean and angular),
Normalized Bures Similarity, cross-validated ridge regression, and Dynamical
Similarity Analysis (DSA).

Public API (s: similarity, higher = more alike; d: distance, lower = more alike),
one module per family, every name importable from ``masalign.similarity``:
    rsa.py         rdm (N x N dissimilarities), compare_rdms (s), rsa (s)
    cka.py         linear_cka (s), rbf_cka (s), angular_cka_distance (d)
    procrustes.py  procrustes_distance (d), procrustes_angular_distance (d),
                   normalized_bures_similarity (s)
    regression.py  ridge_r2(source, target) (s), one direction per call
    dsa.py         delay_embed, havok_operator, align_operators (d),
                   spectral_wasserstein_distance (d), DSA (d)
    here           compare_all(X, Y) -> dict[str, float], all at once
The input checks and conversions shared by all of them are in _common.py.

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

# Besides __all__, the Literal aliases (RDMMetric, RDMComparison, DSAScoreMethod) and
# their tuples of values (RDM_METRICS, RDM_COMPARISONS, DSA_SCORE_METHODS) are public.
from ._common import ArrayLike, _as_sample_matrices
from .cka import angular_cka_distance, linear_cka, rbf_cka
from .dsa import (
    DSA,
    DSA_SCORE_METHODS,
    DSAScoreMethod,
    OperatorAlignment,
    align_operators,
    delay_embed,
    havok_operator,
    spectral_wasserstein_distance,
)
from .procrustes import normalized_bures_similarity, procrustes_angular_distance, procrustes_distance
from .regression import ridge_r2
from .rsa import RDM_COMPARISONS, RDM_METRICS, RDMComparison, RDMMetric, _rdm, compare_rdms, rdm, rsa

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
    rdm_x, rdm_y = _rdm(X, "correlation", "X"), _rdm(Y, "correlation", "Y")
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
