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
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .adapters.base import SiteError, tokens_and_mask
from .adapters.resume import check_resume_exact
from .data import CounterfactualData, ModelInputs, batches, index_inputs, inputs_to, view_for
from .memo import ActivationMemo

PREFIX_CACHE_MAX_BYTES = 2 * 2**30  # per model and dataset


def supports_prefix(adapter: Any, site: str) -> bool:
    """Whether ``adapter`` can resume a run at ``site`` (an optional capability of adapters)."""
    supports = getattr(adapter, "supports_prefix", None)
    return callable(supports) and bool(supports(site))


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
) -> Tensor | None:
    """``(N, seq, width)`` states at ``site`` for every row of ``inputs``, on the CPU; ``None`` where not cached.

    ``None``, with a warning that says why, when the cache would exceed
    ``max_bytes`` or resuming at ``site`` does not reproduce the full run's logits
    on the first rows; silently when the adapter cannot resume at ``site``.
    """
    if not supports_prefix(adapter, site):
        return None
    n = positions.shape[0]
    tokens, _ = tokens_and_mask(inputs)
    dtype = next(adapter.model.parameters()).dtype
    size = n * tokens.shape[1] * width * dtype.itemsize
    if size > max_bytes:
        warnings.warn(
            f"prefix cache of model {model_name!r} at {site!r} would take {size / 2**20:.0f} MiB "
            f"(> {max_bytes / 2**20:.0f} MiB) for {n} rows; running the whole model each step instead",
            stacklevel=3,
        )
        return None
    device = adapter.device
    first = index_inputs(inputs, torch.arange(min(n, 2)))
    try:
        check_resume_exact(adapter, inputs_to(first, device), site, positions[: min(n, 2)].to(device), _unchanged)
    except SiteError as error:
        warnings.warn(f"model {model_name!r}: {error}; running the whole model each step instead", stacklevel=3)
        return None
    parts = [adapter.prefix(inputs_to(index_inputs(inputs, index), device), site).cpu() for index in batches(n, batch_size)]
    return torch.cat(parts)


def _unchanged(hidden: Tensor, example_index: Tensor, slot_index: Tensor) -> Tensor:
    return hidden


def dataset_prefixes(
    alignment: Any, data: Mapping[str, CounterfactualData], targets: Sequence[str], memo: ActivationMemo | None = None
) -> dict[str, dict[str, Tensor]]:
    """variable -> target model -> :func:`base_prefixes` of its base inputs; targets that are not cached are left out.

    With a ``memo`` each (model, site, base inputs) is read once across calls.
    """
    cache: dict[str, dict[str, Tensor]] = {}
    for variable, item in data.items():
        cache[variable] = {}
        for target in targets:
            view = view_for(item, target)
            adapter, site = alignment.models[target], alignment.sites[target]

            def read(view=view, adapter=adapter, site=site, target=target) -> Tensor | None:
                return base_prefixes(adapter, site, view.base_inputs, view.base_positions, alignment.widths[target], model_name=target)

            states = read() if memo is None else memo.get("prefix", adapter, site, view.base_inputs, view.base_positions, read)
            if states is not None:
                cache[variable][target] = states
    return cache


def prefix_rows(cache: Mapping[str, Tensor] | None, target: str, index: Tensor, device: torch.device) -> Tensor | None:
    """Rows ``index`` of ``target``'s cached prefix on ``device``, or ``None`` when it has none."""
    states = (cache or {}).get(target)
    return None if states is None else states[index].to(device)
