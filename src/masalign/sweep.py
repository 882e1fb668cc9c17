"""Sweeps: one fit and one evaluation per setting, on the same pairs.

- :func:`iia_by_subspace_dim`: IIA against the subspace size ``k`` (docs/method.md section 6);
- :func:`iia_by_site`: IIA per site (a layer sweep: where a model holds the variable,
  or which layer of one model aligns with which of another).

Each setting reads the same source activations and base prefixes (they depend on
the models, sites and pairs, not on the alignment), so a sweep passes one
:class:`masalign.memo.ActivationMemo` to every fit and evaluation and each (model,
site, data) is read once. The memo it makes itself is cleared whenever ``build``
returns other model objects than the setting before (nothing could be reused).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

from .data import CounterfactualData, LabelledSequences
from .evaluate import IIAReport, evaluate
from .mas import ModelAlignment
from .memo import ActivationMemo
from .objectives import Direction
from .train import fit

Setting = TypeVar("Setting")
Key = TypeVar("Key", bound=Hashable)
# A site for every model (one name), or one per model.
Sites = str | Mapping[str, str]


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
    memo: ActivationMemo | None = None,
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
        memo: shared by every fit and evaluation (default: one for this sweep).

    Returns ``{k: IIAReport}``; each report's ``extra["fit"]`` holds the fit summary.
    """
    sizes = list(subspace_dims)
    if not sizes:
        raise ValueError("subspace_dims is empty; give the sizes k to sweep, e.g. [2, 4, 8, 16]")
    for k in sizes:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every subspace size must be a positive integer; got {k!r} in {sizes}")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"subspace_dims lists a size more than once: {[k for k in sizes if sizes.count(k) > 1][0]}")
    return _sweep(build, sizes, sizes, train, valid, test, fit_options, ceiling_data, directions, progress, memo)


def iia_by_site(
    build: Callable[[Sites], ModelAlignment],
    sites: Sequence[Sites],
    train: CounterfactualData | Sequence[CounterfactualData],
    valid: CounterfactualData | Sequence[CounterfactualData],
    test: CounterfactualData,
    fit_options: Mapping[str, Any] | None = None,
    ceiling_data: LabelledSequences | Mapping[str, LabelledSequences] | None = None,
    directions: Sequence[Direction] | None = None,
    progress: Callable[[Sites, IIAReport], None] | None = None,
    memo: ActivationMemo | None = None,
) -> dict[Hashable, IIAReport]:
    """Fit and evaluate one alignment per site: a layer sweep.

    Args:
        build: ``build(sites)`` returns a fresh :class:`ModelAlignment` at ``sites``, e.g.
            ``lambda site: ModelAlignment({"gpt": adapter}, site, 8)`` (DAS per layer) or
            ``lambda sites: ModelAlignment(models, sites, 16)`` (MAS per pair of layers).
        sites: the settings to try: site names, or mappings from model name to site
            (``{"A": "blocks.3.hook_resid_post", "B": "model.layers.5.output"}``).
        fit_options, ceiling_data, directions, memo: as in :func:`iia_by_subspace_dim`.
        progress: called with ``(sites, report)`` after each setting.

    Returns ``{key: IIAReport}`` in the order given, keyed by the site name, or for a
    mapping by the tuple of its ``(model, site)`` items in order; each report's
    ``extra["sites"]`` holds the alignment's sites per model and ``extra["fit"]`` the
    fit summary.
    """
    settings = list(sites)
    if not settings:
        raise ValueError("sites is empty; give the sites to sweep, e.g. [f'blocks.{i}.hook_resid_post' for i in range(4)]")
    keys: list[Hashable] = []
    for setting in settings:
        if isinstance(setting, str):
            keys.append(setting)
        elif isinstance(setting, Mapping) and setting and all(isinstance(s, str) for s in setting.values()):
            keys.append(tuple(setting.items()))
        else:
            raise ValueError(f"each entry of sites must be a site name or a non-empty mapping of model name to site name; got {setting!r}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"sites lists a setting more than once: {[k for k in keys if keys.count(k) > 1][0]!r}")
    return _sweep(build, settings, keys, train, valid, test, fit_options, ceiling_data, directions, progress, memo)


def _sweep(
    build: Callable[[Setting], ModelAlignment],
    settings: list[Setting],
    keys: Sequence[Key],
    train: CounterfactualData | Sequence[CounterfactualData],
    valid: CounterfactualData | Sequence[CounterfactualData],
    test: CounterfactualData,
    fit_options: Mapping[str, Any] | None,
    ceiling_data: LabelledSequences | Mapping[str, LabelledSequences] | None,
    directions: Sequence[Direction] | None,
    progress: Callable[[Setting, IIAReport], None] | None,
    memo: ActivationMemo | None,
) -> dict[Key, IIAReport]:
    """Fit and evaluate ``build(setting)`` for each setting, one memo shared by all; the reports
    under ``keys`` (one per setting), ``progress(setting, report)`` after each."""
    options = dict(fit_options or {})
    for name in ("directions", "memo"):
        if name in options:
            raise ValueError(f"pass {name} as the {name} argument, not inside fit_options")
    own_memo = memo is None
    memo = ActivationMemo() if memo is None else memo
    models_before: list[int] | None = None
    reports: dict[Key, IIAReport] = {}
    for setting, key in zip(settings, keys, strict=True):
        alignment = build(setting)
        _check_built(alignment, setting)
        models_now = sorted(id(adapter) for adapter in alignment.models.values())
        if own_memo and models_before is not None and models_now != models_before:
            memo.clear()  # other model objects: nothing read so far can be reused, only held
        models_before = models_now
        result = fit(alignment, train, valid, directions=directions, memo=memo, **options)
        report = evaluate(alignment, test, ceiling_data=ceiling_data, directions=directions, memo=memo)
        report.extra["fit"] = result.summary()
        report.extra["sites"] = dict(alignment.sites)
        reports[key] = report
        if progress is not None:
            progress(setting, report)
    return reports


def _check_built(alignment: Any, setting: Setting) -> None:
    """``build(setting)`` made what ``setting`` asks for: its report is filed under that setting."""
    if not isinstance(alignment, ModelAlignment):
        raise TypeError(f"build({setting!r}) returned {type(alignment).__name__}; it must return a ModelAlignment")
    if isinstance(setting, int):
        if setting not in alignment.subspace_dim.values() and alignment.n_aligned != setting:
            raise ValueError(
                f"build({setting}) returned an alignment with subspace_dim {alignment.subspace_dim}; build(k) must "
                "use its argument as the subspace size, e.g. lambda k: ModelAlignment(models, site, k)"
            )
        return
    # One site name may be swept in one model against fixed sites in the others: some model must be there.
    placed = setting in alignment.sites.values() if isinstance(setting, str) else all(
        alignment.sites.get(name) == site for name, site in setting.items()
    )
    if not placed:
        raise ValueError(
            f"build({setting!r}) returned an alignment at sites {alignment.sites}; build(sites) must place the "
            "alignment at its argument, e.g. lambda site: ModelAlignment(models, site, 8)"
        )
