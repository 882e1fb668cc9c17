"""Prefix caching for training and evaluation: each base input's run up to the site, computed once.

The base run up to the target's site does not depend on the alignment, so when
the site is a block's output (``blocks.{i}.hook_resid_post``,
``model.layers.{i}.output``; see :mod:`masalign.adapters.resume`), :func:`base_prefixes`
computes the states there for every row of a dataset once, and each training or
evaluation step runs only the blocks after the site
(:meth:`ModelAlignment.intervened_logits` with ``base_prefix=``). The logits are
those of the full run: the first rows are checked against it, and a model that
fails the check (or an adapter without the capability) falls back to full runs.

Memory: ``N x seq x width`` floats of the model's dtype per target model and
dataset, kept on the CPU (2,000 pairs of 24 tokens at width 640 in float32: 123 MB).
Beyond ``max_bytes`` the prefix is not cached, with a warning.

Positions before the first one a dataset writes or labels (:func:`suffix_start`)
are the same in every step, at every layer. Where the adapter can
(``supports_key_values``: a Hugging Face model through nnsight or a TransformerLens bridge, or a
``HookedTransformer``), the
prefix also keeps the later blocks' keys and values there
(:class:`masalign.adapters.resume.KeyValuePrefix`), and each step runs only the
positions from that one on: for an interchange at the last token, one position
instead of the whole prompt. It is checked against the full run like the plain
prefix, and costs ``N x later blocks x 2 x start x kv width`` floats more. Rows
whose prompts begin alike run those positions once
(:mod:`masalign.adapters.shared_prefix`); the check reads its rows in two segments,
so that it covers that too.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .adapters.base import SiteError, parameter_devices, tokens_and_mask
from .adapters.resume import KeyValuePrefix, check_resume_exact
from .data import IGNORE_INDEX, CounterfactualData, ModelInputs, index_inputs, inputs_to, view_for
from .memo import ActivationMemo
from .rowcache import RowCache, first_rows_alike

PREFIX_CACHE_MAX_BYTES = 2 * 2**30  # per model and dataset


def supports_prefix(adapter: Any, site: str) -> bool:
    """Whether ``adapter`` can resume a run at ``site`` (an optional capability of adapters)."""
    supports = getattr(adapter, "supports_prefix", None)
    return callable(supports) and bool(supports(site))


def supports_key_values(adapter: Any, site: str) -> bool:
    """Whether ``adapter`` can also skip the positions before the first changed one (optional capability)."""
    supports = getattr(adapter, "supports_key_values", None)
    return callable(supports) and bool(supports(site))


def suffix_start(positions: Tensor, labels: Tensor | None) -> int:
    """The first position a dataset's interchange writes or its labels read: no step needs anything
    computed anew before it. ``positions`` ``(rows, slots)`` (empty slots, -1, ignored), ``labels``
    ``(rows, seq)`` with ``IGNORE_INDEX`` where there is none."""
    written = positions[positions >= 0]
    first = int(written.min()) if written.numel() else 0
    if labels is not None:
        labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
        first = min(first, int(labelled.min()) if labelled.numel() else 0)
    return first


@torch.no_grad()
def base_prefixes(
    adapter: Any,
    site: str,
    inputs: ModelInputs,
    positions: Tensor,
    width: int,
    batch_size: int = 256,
    max_bytes: int = PREFIX_CACHE_MAX_BYTES,
    model_name: str = "model",
    start: int = 0,
) -> Tensor | KeyValuePrefix | None:
    """``(N, seq, width)`` states at ``site`` for every row of ``inputs``, on the CPU; ``None`` where not cached.

    With ``start > 0`` (:func:`suffix_start` of the dataset) and an adapter that
    supports it, a :class:`KeyValuePrefix`: the states and the later blocks' keys
    and values before ``start``, so that steps run positions ``start..`` only.
    ``None``, with a warning that says why, when the cache would exceed
    ``max_bytes`` or resuming at ``site`` does not reproduce the full run's logits
    on the first rows; silently when the adapter cannot resume at ``site``.
    """
    rows = prefix_row_cache(adapter, site, inputs, positions, width, batch_size, max_bytes, model_name, start)
    return None if rows is None else rows.full()


@torch.no_grad()
def prefix_row_cache(
    adapter: Any,
    site: str,
    inputs: ModelInputs,
    positions: Tensor,
    width: int,
    batch_size: int = 256,
    max_bytes: int = PREFIX_CACHE_MAX_BYTES,
    model_name: str = "model",
    start: int = 0,
) -> RowCache | None:
    """:func:`base_prefixes` as a :class:`RowCache`: checked now (exactness and size, on the first
    rows), each row computed when a step first reads it."""
    if not supports_prefix(adapter, site):
        return None
    if len(parameter_devices(adapter.model)) > 1:
        # A model sharded across devices: its later blocks' states and keys would need
        # each block's own device. Each step runs the whole model instead (exact, slower).
        return None
    n, device = positions.shape[0], adapter.device
    first = inputs_to(index_inputs(inputs, torch.arange(min(n, 2))), device)
    first_positions = positions[: min(n, 2)].to(device)
    if start > 0 and supports_key_values(adapter, site):
        try:
            sample = _check_key_values_exact(adapter, first, site, first_positions, start)
        except SiteError as error:
            warnings.warn(f"model {model_name!r}: {error}; each step runs every position instead", stacklevel=4)
        else:
            size = sample.nbytes * n // sample.states.shape[0]
            if size <= max_bytes:
                return RowCache(
                    n,
                    lambda rows: adapter.key_value_prefix(inputs_to(index_inputs(inputs, rows), device), site, start).to("cpu"),
                    batch_size,
                    first_alike=first_rows_alike(inputs),
                )
            warnings.warn(
                f"keys and values of model {model_name!r} before position {start} would take {size / 2**20:.0f} MiB "
                f"(> {max_bytes / 2**20:.0f} MiB) for {n} rows; each step runs every position instead",
                stacklevel=4,
            )
    tokens, _ = tokens_and_mask(inputs)
    dtype = next(adapter.model.parameters()).dtype
    size = n * tokens.shape[1] * width * dtype.itemsize
    if size > max_bytes:
        warnings.warn(
            f"prefix cache of model {model_name!r} at {site!r} would take {size / 2**20:.0f} MiB "
            f"(> {max_bytes / 2**20:.0f} MiB) for {n} rows; running the whole model each step instead",
            stacklevel=4,
        )
        return None
    try:
        check_resume_exact(adapter, first, site, first_positions, _unchanged)
    except SiteError as error:
        warnings.warn(f"model {model_name!r}: {error}; running the whole model each step instead", stacklevel=4)
        return None
    return RowCache(
        n, lambda rows: adapter.prefix(inputs_to(index_inputs(inputs, rows), device), site).cpu(), batch_size, first_alike=first_rows_alike(inputs)
    )


def _unchanged(hidden: Tensor, example_index: Tensor, slot_index: Tensor) -> Tensor:
    return hidden


def _check_key_values_exact(
    adapter: Any, inputs: ModelInputs, site: str, positions: Tensor, start: int, tolerance: float = 1e-4
) -> KeyValuePrefix:
    """Raise :class:`SiteError` unless the run from cached keys and values gives the full run's logits
    at every real token (attention mask 1) from ``start`` on, with an interchange that changes the
    written rows; returns the prefix of ``inputs`` (to size the cache from). Padding's logits are
    left out: nothing reads them, and a bridge's padding queries, which attend to nothing, give
    states that depend on the run's length."""

    def shifted(hidden: Tensor, example_index: Tensor, slot_index: Tensor) -> Tensor:
        return hidden + 1.0  # a change that must reach the later positions, as an interchange's does

    full = adapter.run_with_replacement(inputs, site, positions, shifted)[:, start:].detach()
    try:
        prefix = adapter.key_value_prefix(inputs, site, start, **_split_in_two(adapter, inputs, start))
        resumed = adapter.run_from_prefix(inputs, site, prefix, positions, shifted)[:, start:].detach()
    except (TypeError, ValueError, RuntimeError, AttributeError, IndexError) as error:
        raise SiteError(f"running positions {start}.. from cached keys and values failed ({type(error).__name__}: {error})") from error
    if full.shape != resumed.shape:
        raise SiteError(f"running positions {start}.. from cached keys and values gives logits of shape {tuple(resumed.shape)}, not {tuple(full.shape)}")
    mask = tokens_and_mask(inputs)[1]
    if mask is not None and mask.dim() == 2 and mask.shape[1] == start + full.shape[1]:
        real = mask[:, start:].to(full.device).bool()
        full, resumed = full[real], resumed[real]
    if not full.numel():
        return prefix  # only padding from start on: nothing to compare, and nothing reads it
    difference = float((full.float() - resumed.float()).abs().max())
    scale = max(1.0, float(full.float().abs().max()))
    if not difference <= tolerance * scale:
        raise SiteError(
            f"running positions {start}.. from cached keys and values gives logits {difference:.3g} away from the full run's"
        )
    return prefix


def _split_in_two(adapter: Any, inputs: ModelInputs, start: int) -> dict[str, list[int]]:
    """``cuts`` that make an adapter which reads shared prompt prefixes in segments
    (:mod:`masalign.adapters.shared_prefix`) read these rows in two, so that the check covers
    its segments' keys and values as well; nothing for other adapters."""
    if start < 2 or "cuts" not in inspect.signature(adapter.key_value_prefix).parameters:
        return {}
    return {"cuts": [0, start // 2, tokens_and_mask(inputs)[0].shape[1]]}


class SourceReader:
    """An adapter's activations at a site, read by :meth:`key_value_activations` where the adapter
    has it (a Hugging Face model through nnsight or a TransformerLens bridge, at a block output): the positions before
    the first read one run only until the site block has stored their keys and values.

    The first call checks its shorter read of the first two rows against :meth:`activations`
    of them; if they differ by more than float rounding (``tolerance`` of the largest value),
    or the shorter read fails, this reader warns once and reads by :meth:`activations` from
    then on.
    """

    def __init__(self, adapter: Any, site: str, model_name: str = "model", tolerance: float = 1e-4) -> None:
        self.adapter, self.site, self.model_name, self.tolerance = adapter, site, model_name, tolerance
        self.by_key_values: bool | None = (
            None
            if supports_key_values(adapter, site)
            and callable(getattr(adapter, "key_value_activations", None))
            and len(parameter_devices(adapter.model)) == 1
            else False
        )

    def __call__(self, inputs: ModelInputs, positions: Tensor) -> Tensor:
        if self.by_key_values is None:
            shorter = self._checked(inputs, positions)
            self.by_key_values = shorter is not None
            if shorter is not None:
                return shorter
        if self.by_key_values:
            return self.adapter.key_value_activations(inputs, self.site, positions)
        return self.adapter.activations(inputs, self.site, positions)

    def _checked(self, inputs: ModelInputs, positions: Tensor) -> Tensor | None:
        """The shorter read of every row, if its first two rows pass the check; else ``None``."""
        try:
            shorter = self.adapter.key_value_activations(inputs, self.site, positions)
        except (SiteError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as error:
            warnings.warn(
                f"model {self.model_name!r}: reading {self.site!r} after cached keys and values failed "
                f"({type(error).__name__}: {error}); reading every position instead",
                stacklevel=4,
            )
            return None
        first = torch.arange(min(2, positions.shape[0]))
        full = self.adapter.activations(index_inputs(inputs, first), self.site, positions[first.to(positions.device)])
        shorter_first = shorter[first.to(shorter.device)]
        difference = float((full.float() - shorter_first.float()).abs().max()) if full.shape == shorter_first.shape else float("inf")
        if not difference <= self.tolerance * max(1.0, float(full.float().abs().max())):
            warnings.warn(
                f"model {self.model_name!r}: reading {self.site!r} after cached keys and values gives activations "
                f"{difference:.3g} away from the full run's; reading every position instead",
                stacklevel=4,
            )
            return None
        return shorter


def dataset_prefixes(
    alignment: Any, data: Mapping[str, CounterfactualData], targets: Sequence[str], memo: ActivationMemo | None = None
) -> dict[str, dict[str, RowCache]]:
    """variable -> target model -> :func:`prefix_row_cache` of its base inputs; targets that are not cached are left out.

    With a ``memo`` each (model, site, base inputs) is read once across calls.
    """
    cache: dict[str, dict[str, RowCache]] = {}
    for variable, item in data.items():
        cache[variable] = {}
        for target in targets:
            view = view_for(item, target)
            adapter, site = alignment.models[target], alignment.sites[target]

            start = suffix_start(view.base_positions, view.labels)

            def read(view=view, adapter=adapter, site=site, target=target, start=start) -> RowCache | None:
                return prefix_row_cache(
                    adapter, site, view.base_inputs, view.base_positions, alignment.widths[target], model_name=target, start=start
                )

            # Where keys and values are kept, the labels set where steps start: part of the key.
            kind = f"prefix from {start}" if supports_key_values(adapter, site) else "prefix"
            states = read() if memo is None else memo.get(kind, adapter, site, view.base_inputs, view.base_positions, read)
            if states is not None:
                cache[variable][target] = states
    return cache


def prefix_rows(
    cache: Mapping[str, RowCache | Tensor] | None, target: str, index: Tensor, device: torch.device
) -> Tensor | KeyValuePrefix | None:
    """Rows ``index`` of ``target``'s cached prefix on ``device``, or ``None`` when it has none."""
    states = (cache or {}).get(target)
    return None if states is None else states[index].to(device)
