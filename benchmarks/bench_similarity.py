"""Timings and agreement of masalign.similarity against peer packages.

Run:  PYTHONPATH=src python benchmarks/bench_similarity.py [--quick] [--threads 1 2] [--json PATH]

With ``--threads``, each thread count runs in its own process with
OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and MKL_NUM_THREADS set to it (so numpy's and
scipy's BLAS, used by the peers and by our CPU paths, get the same number of threads
as torch), and a side-by-side summary of the headline rows follows the tables.
``--json PATH`` writes every row, the machine facts and the thread counts.

Peers, used only when they import: rsatoolbox (RDMs, RDM comparison, Bures
similarity of RDM kernels) and the DSA authors' package ``dsa-metric`` (import
name ``DSA``). Numpy/scipy textbook formulas stand in where no peer package
exists (linear CKA, Procrustes). Every row prints our time, the peer's time,
their ratio, and both values. All data are float64 and seeded.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch


def load_similarity_module() -> Any:
    """Import masalign.similarity; if the package's __init__ needs modules this
    environment lacks (model adapters), load the similarity subpackage on its own:
    it needs only numpy, scipy and torch."""
    try:
        from masalign import similarity

        return similarity
    except ImportError as error:
        path = Path(__file__).resolve().parents[1] / "src" / "masalign" / "similarity"
        print(f"note: `import masalign` failed ({error}); loading {path} directly")
        spec = importlib.util.spec_from_file_location(
            "masalign_similarity", path / "__init__.py", submodule_search_locations=[str(path)]
        )
        if spec is None or spec.loader is None:
            raise
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


sim = load_similarity_module()

try:
    import rsatoolbox
except ImportError:
    rsatoolbox = None

try:
    import DSA as dsa_package
except ImportError:
    dsa_package = None


def installed_version(distribution: str, module: Any) -> str:
    if module is None:
        return "peer not installed"
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "installed (version unknown)"


def best_time(function: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best wall time over ``repeats`` calls, and the last result."""
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


ROWS: list[tuple[str, str, float, float | None, float, float | None]] = []


def record(measure: str, data: str, ours: tuple[float, float], peer: tuple[float, float] | None) -> None:
    ROWS.append((measure, data, ours[0], None if peer is None else peer[0], ours[1], None if peer is None else peer[1]))


def print_table(peer_names: dict[str, str]) -> None:
    header = (
        f"{'measure':<38} {'data':<22} {'ours s':>8} {'peer s':>8} {'ours/peer':>9}  "
        f"{'ours value':>12} {'peer value':>12}  peer"
    )
    print(header)
    print("-" * len(header))
    for measure, data, ours_t, peer_t, ours_v, peer_v in ROWS:
        if peer_t is None:
            peer_cols = f"{'-':>8} {'-':>9}  {ours_v:>12.6g} {'-':>12}"
            peer_name = "peer not installed" if measure in peer_names else ""
        else:
            peer_cols = f"{peer_t:>8.3f} {ours_t / peer_t:>9.3g}  {ours_v:>12.6g} {peer_v:>12.6g}"
            peer_name = peer_names.get(measure, "")
        print(f"{measure:<38} {data:<22} {ours_t:>8.3f} {peer_cols}  {peer_name}")


# --------------------------------------------------------------------------- #
# Reference formulas (numpy/scipy), for agreement where no peer package exists
# --------------------------------------------------------------------------- #


def numpy_linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Kornblith et al.'s feature-space formula."""
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    return np.linalg.norm(X.T @ Y) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


def scipy_procrustes_distance(X: np.ndarray, Y: np.ndarray) -> float:
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    X = X / np.linalg.norm(X)
    Y = Y / np.linalg.norm(Y)
    rotation, _ = scipy.linalg.orthogonal_procrustes(Y, X)
    return float(np.linalg.norm(X - Y @ rotation))


# --------------------------------------------------------------------------- #
# Benchmarks
# --------------------------------------------------------------------------- #


def paired_data(rng: np.random.Generator, n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    X = rng.standard_normal((n, width))
    mixing = rng.standard_normal((width, width)) / math.sqrt(width)
    Y = np.tanh(X @ mixing) + 0.5 * rng.standard_normal((n, width))
    return X, Y


def bench_closed_form(X: np.ndarray, Y: np.ndarray, repeats: int) -> None:
    label = f"{X.shape[0]} x {X.shape[1]}"
    record("linear CKA", label, best_time(lambda: sim.linear_cka(X, Y), repeats),
           best_time(lambda: numpy_linear_cka(X, Y), repeats))
    record("debiased linear CKA", label, best_time(lambda: sim.linear_cka(X, Y, debiased=True), repeats), None)
    record("NBS", label, best_time(lambda: sim.normalized_bures_similarity(X, Y), repeats), None)
    record("Procrustes (Euclidean)", label, best_time(lambda: sim.procrustes_distance(X, Y), repeats),
           best_time(lambda: scipy_procrustes_distance(X, Y), repeats))
    record("Procrustes (angular)", label, best_time(lambda: sim.procrustes_angular_distance(X, Y), repeats), None)
    record("ridge R^2 X->Y (5-fold)", label, best_time(lambda: sim.ridge_r2(X, Y), 1), None)
    X32, Y32 = torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)
    record("linear CKA (float32)", label, best_time(lambda: sim.linear_cka(X32, Y32), repeats), None)


def rsatoolbox_rsa(X: np.ndarray, Y: np.ndarray, method: str) -> float:
    rdm_x = rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(X), method="correlation")
    rdm_y = rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(Y), method="correlation")
    return float(rsatoolbox.rdm.compare(rdm_x, rdm_y, method=method)[0, 0])


def bench_rsa(X: np.ndarray, Y: np.ndarray, repeats: int) -> None:
    label = f"{X.shape[0]} x {X.shape[1]}"
    for comparison, peer_method in (("spearman", "spearman"), ("pearson", "corr"), ("kendall", "kendall")):
        ours = best_time(partial(sim.rsa, X, Y, metric="correlation", comparison=comparison), repeats)
        peer = None
        if rsatoolbox is not None:
            peer = best_time(partial(rsatoolbox_rsa, X, Y, peer_method), repeats)
        record(f"RSA 1-Pearson RDM, {comparison}", label, ours, peer)
    ours = best_time(lambda: sim.normalized_bures_similarity(X, Y), repeats)
    peer = None
    if rsatoolbox is not None:

        def peer_bures() -> float:
            rdm_x = rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(X), method="euclidean")
            rdm_y = rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(Y), method="euclidean")
            return float(rsatoolbox.rdm.compare(rdm_x, rdm_y, method="bures")[0, 0])

        peer = best_time(peer_bures, 1)
    record("NBS vs Bures of RDM kernels", label, ours, peer)


def linear_system_trajectories(
    rng: np.random.Generator, dynamics: np.ndarray, n_trials: int, n_steps: int, noise: float
) -> np.ndarray:
    """(trials, time, d) trajectories of x_{t+1} = dynamics x_t + noise."""
    width = dynamics.shape[0]
    states = np.empty((n_trials, n_steps, width))
    state = rng.standard_normal((n_trials, width))
    for t in range(n_steps):
        states[:, t] = state
        state = state @ dynamics.T + noise * rng.standard_normal((n_trials, width))
    return states


def random_stable_dynamics(rng: np.random.Generator, width: int, radius: float) -> np.ndarray:
    matrix = rng.standard_normal((width, width))
    return radius * matrix / np.max(np.abs(np.linalg.eigvals(matrix)))


def dsa_package_score(X: np.ndarray, Y: np.ndarray, n_delays: int, rank: int, method: str) -> float:
    """The DSA authors' pipeline with their default optimiser settings (1500 steps, lr 5e-3)."""
    model = dsa_package.DSA(X, Y, n_delays=n_delays, rank=rank, lamb=0.0, score_method=method, iters=1500, lr=5e-3)
    return float(model.fit_score())


def bench_dsa(rank: int, n_delays: int, repeats: int) -> None:
    rng = np.random.default_rng(1)
    width, n_trials, n_steps = 10, 20, 400
    system_a = linear_system_trajectories(rng, random_stable_dynamics(rng, width, 0.95), n_trials, n_steps, 0.1)
    system_b = linear_system_trajectories(rng, random_stable_dynamics(rng, width, 0.95), n_trials, n_steps, 0.1)
    rotation, _ = np.linalg.qr(rng.standard_normal((width, width)))
    pairs = {
        "different systems": (system_a, system_b),
        "same system, rotated": (system_a, system_a @ rotation),
    }
    label = f"{n_trials}x{n_steps}x{width}, r={rank}"

    def spectral_radius(matrix: torch.Tensor) -> float:
        return float(np.max(np.abs(np.linalg.eigvals(matrix.double().numpy()))))

    ours_time, operator = best_time(lambda: sim.havok_operator(system_a, n_delays, rank=rank), repeats)
    peer = None
    if dsa_package is not None:

        def peer_operator() -> torch.Tensor:
            model = dsa_package.DMD(system_a, n_delays=n_delays, rank=rank, lamb=0.0)
            model.fit()
            return model.A_v.clone()

        peer_time, peer_operator_matrix = best_time(peer_operator, repeats)
        peer = (peer_time, spectral_radius(peer_operator_matrix))
        # Same construction: the whole spectra must agree (up to the peer's float32).
        ours_eigs = np.sort_complex(np.linalg.eigvals(operator.numpy()))
        peer_eigs = np.sort_complex(np.linalg.eigvals(peer_operator_matrix.double().numpy()))
        difference = np.max(np.abs(ours_eigs - peer_eigs))
        print(f"HAVOK spectra, ours vs DSA.DMD: max |eigenvalue difference| = {difference:.2e}")
    record("HAVOK operator (spectral radius)", label, (ours_time, spectral_radius(operator)), peer)

    for pair_name, (X, Y) in pairs.items():
        for method in ("angular", "wasserstein"):
            ours_model = sim.DSA(n_delays=n_delays, rank=rank, score_method=method)
            ours = best_time(partial(ours_model.score, X, Y), 1)
            peer = None
            if dsa_package is not None:
                peer = best_time(partial(dsa_package_score, X, Y, n_delays, rank, method), 1)
                if method == "wasserstein":
                    # The peer reports the squared 2-Wasserstein distance; compare like with like.
                    peer = (peer[0], math.sqrt(peer[1]))
            record(f"DSA {method}: {pair_name}", label, ours, peer)

    if dsa_package is not None:
        # Same operators, both optimisers: isolates the Procrustes-over-vector-fields search.
        A = sim.havok_operator(system_a, n_delays, rank=rank)
        B = sim.havok_operator(system_b, n_delays, rank=rank)
        ours = best_time(lambda: sim.align_operators(A, B).angular, 1)

        def peer_align() -> float:
            metric = dsa_package.SimilarityTransformDist(iters=1500, score_method="angular", lr=5e-3)
            return float(metric.fit_score(A.float().clone(), B.float().clone()))

        record("align_operators, same A, B", f"{rank} x {rank}", ours, best_time(peer_align, 1))


PEER_NAMES = {
    "linear CKA": "numpy (Kornblith formula)",
    "Procrustes (Euclidean)": "scipy orthogonal_procrustes",
    "RSA 1-Pearson RDM, spearman": "rsatoolbox",
    "RSA 1-Pearson RDM, pearson": "rsatoolbox",
    "RSA 1-Pearson RDM, kendall": "rsatoolbox (tau-b)",
    "NBS vs Bures of RDM kernels": "rsatoolbox bures",
    "HAVOK operator (spectral radius)": "DSA.DMD (float32)",
    "DSA angular: different systems": "DSA package",
    "DSA angular: same system, rotated": "DSA package",
    "DSA wasserstein: different systems": "DSA package (sqrt of its W2^2)",
    "DSA wasserstein: same system, rotated": "DSA package (sqrt of its W2^2)",
    "align_operators, same A, B": "DSA SimilarityTransformDist",
}


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
SUMMARY_ROWS = (
    "linear CKA",
    "RSA 1-Pearson RDM, spearman",
    "DSA angular: different systems",
    "DSA angular: same system, rotated",
    "align_operators, same A, B",
)


def machine_facts() -> dict[str, Any]:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "rsatoolbox": installed_version("rsatoolbox", rsatoolbox),
        "dsa-metric": installed_version("dsa-metric", dsa_package),
        "torch_threads": torch.get_num_threads(),
        "thread_variables": {name: os.environ.get(name) for name in THREAD_VARIABLES},
    }


def rows_as_dicts() -> list[dict[str, Any]]:
    keys = ("measure", "data", "ours_s", "peer_s", "ours_value", "peer_value")
    rows = [dict(zip(keys, row, strict=True)) for row in ROWS]
    for row in rows:
        row["ours_over_peer"] = None if row["peer_s"] is None else row["ours_s"] / row["peer_s"]
        row["peer"] = PEER_NAMES.get(row["measure"], "")
    return rows


def run_thread_counts(thread_counts: list[int], quick: bool, json_path: str | None) -> None:
    """Each thread count in a fresh process (BLAS thread counts are fixed at load time)."""
    results = []
    for threads in thread_counts:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            child_json = handle.name
        command = [sys.executable, __file__, "--threads", str(threads), "--child", "--json", child_json]
        if quick:
            command.append("--quick")
        environment = dict(os.environ, **{name: str(threads) for name in THREAD_VARIABLES})
        print(f"=== {threads} thread(s) ===", flush=True)
        subprocess.run(command, check=True, env=environment)
        with open(child_json) as handle:
            results.append(json.load(handle))
        os.unlink(child_json)
        print(flush=True)
    print("Side by side (ours/peer < 1: ours is faster; peer/ours = speed-up):")
    header = f"{'measure':<38}" + "".join(f" {f'{t} thr ours/peer':>16} {'peer/ours':>9}" for t in thread_counts)
    print(header)
    print("-" * len(header))
    for measure in SUMMARY_ROWS:
        cells = []
        for result in results:
            row = next((r for r in result["rows"] if r["measure"] == measure), None)
            ratio = None if row is None else row["ours_over_peer"]
            cells.append(f" {'-':>16} {'-':>9}" if ratio is None else f" {ratio:>16.3g} {1 / ratio:>9.3g}")
        print(f"{measure:<38}" + "".join(cells))
    if json_path is not None:
        with open(json_path, "w") as handle:
            json.dump({"thread_counts": thread_counts, "runs": results}, handle, indent=1)
        print(f"wrote {json_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller data, one repeat (a smoke test)")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=None,
        help="thread counts for ours and the peers, each run in its own process (e.g. 1 2)",
    )
    parser.add_argument("--json", default=None, help="write the rows, machine facts and thread counts here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None and not args.child:
        run_thread_counts(args.threads, args.quick, args.json)
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads[0])
    repeats = 1 if args.quick else 3
    n_large, n_rsa, width = (2000, 500, 128) if args.quick else (10_000, 2000, 512)
    rank, n_delays = (20, 5) if args.quick else (100, 20)

    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"scipy {scipy.__version__}, torch threads {torch.get_num_threads()}")
    print(f"cpu: {machine_facts()['cpu']} ({os.cpu_count()} cores); BLAS thread variables: "
          f"{ {name: os.environ.get(name) for name in THREAD_VARIABLES} }")
    print(f"rsatoolbox: {installed_version('rsatoolbox', rsatoolbox)}; "
          f"dsa-metric (import DSA): {installed_version('dsa-metric', dsa_package)}")

    rng = np.random.default_rng(0)
    X, Y = paired_data(rng, n_large, width)
    bench_closed_form(X, Y, repeats)
    bench_rsa(X[:n_rsa], Y[:n_rsa], repeats)
    bench_dsa(rank, n_delays, repeats)
    print()
    print_table(PEER_NAMES)
    if args.json is not None:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine_facts(), "quick": args.quick, "rows": rows_as_dicts()}, handle, indent=1)


if __name__ == "__main__":
    main()
