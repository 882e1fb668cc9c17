"""IIA against subspace size ``k`` (docs/method.md section 6): one fit and one evaluation per ``k``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .data import CounterfactualData, LabelledSequences
from .evaluate import IIAReport, evaluate
from .mas import ModelAlignment
from .objectives import Direction
from .train import fit


def iia_by_subspace_dim(
    build: Callable[[int], ModelAlignment],
    subspace_dims: Sequence[int],
    train: CounterfactualData | Sequence[CounterfactualData],
    valid: CounterfactualData | Sequence[CounterfactualData],
    test: CounterfactualData,
    fit_options: Mapping[str, Any] | None = None,
    ceiling_data: LabelledSequences | Mapping[str, LabelledSequences] | None = None,
    directions: Sequence[Direction] | None = None,
    progress: Callable[[int, IIAReport], None] | None = None,
) -> dict[int, IIAReport]:
    """Fit and evaluate one alignment per subspace size: the IIA-against-``k`` curve.

    Args:
        build: ``build(k)`` returns a fresh :class:`ModelAlignment` with subspace size
            ``k`` (MAS, DAS with one model, stitching with ``keep_complement=False``).
        subspace_dims: the sizes ``k`` to try, each a positive integer.
        fit_options: keyword arguments for :func:`masalign.fit` (steps, lr, ...);
            ``directions`` is added to them.
        directions: trained and evaluated directions; default all ``n^2``.
        progress: called with ``(k, report)`` after each size, e.g. to print a line.

    Returns ``{k: IIAReport}``; each report's ``extra["fit"]`` holds the fit summary.
    """
    sizes = list(subspace_dims)
    if not sizes:
        raise ValueError("subspace_dims is empty; give the sizes k to sweep, e.g. [2, 4, 8, 16]")
    for k in sizes:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every subspace size must be a positive integer; got {k!r} in {sizes}")
    options = dict(fit_options or {})
    if "directions" in options:
        raise ValueError("pass directions as the directions argument, not inside fit_options")
    reports: dict[int, IIAReport] = {}
    for k in sizes:
        alignment = build(k)
        result = fit(alignment, train, valid, directions=directions, **options)
        report = evaluate(alignment, test, ceiling_data=ceiling_data, directions=directions)
        report.extra["fit"] = result.summary()
        reports[k] = report
        if progress is not None:
            progress(k, report)
    return reports
