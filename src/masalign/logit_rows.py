"""Logits only where there are labels: the loss and the accuracy need nothing else.

A language model's unembedding maps every position's state to the vocabulary,
but the interchange loss reads only the positions with a label (the answer's
tokens: 1 to 4 of a 20-token prompt). With Gemma-3's 262,144-token vocabulary the
unembedding of the whole sequence costs several times the blocks after a late
site, forward and backward. :func:`label_slots` turns ``(batch, seq)`` labels
into the ``(batch, n)`` positions that carry one and the labels there; an adapter
with an ``output_module()`` then unembeds only those rows
(:func:`masalign.adapters.base.logits_only_at`), and others have their full
logits gathered at them, so the scores are the same either way.

Exactness is checked once per adapter (:func:`restricts_logits`): restricted
logits must equal the full run's at the same positions, or the adapter runs in
full (with a warning), since a model whose head mixes positions would otherwise
give silently wrong losses.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .adapters.base import ModelInputs, logits_only_at
from .data import IGNORE_INDEX, index_inputs, inputs_to

_CHECKED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def label_slots(labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(positions, slot_labels)``, both ``(batch, n)``: each row's labelled positions in order.

    ``n`` is the most labels any row has (at least 1); a row with fewer is padded
    with its position 0 and the label ``IGNORE_INDEX`` there, which no score counts.
    """
    labelled = labels != IGNORE_INDEX
    n = max(int(labelled.sum(dim=1).max()) if labels.numel() else 0, 1)
    # A stable sort of "not labelled" puts each row's labelled positions first, in order.
    order = torch.sort((~labelled).to(torch.int8), dim=1, stable=True).indices[:, :n]
    kept = labelled.gather(1, order)
    positions = torch.where(kept, order, torch.zeros_like(order))
    slot_labels = torch.where(kept, labels.gather(1, order), torch.full_like(order, IGNORE_INDEX))
    return positions, slot_labels


def restricts_logits(adapter: Any, inputs: ModelInputs, tolerance: float = 1e-5) -> bool:
    """Whether ``adapter`` can unembed chosen positions only, exactly; checked once per adapter.

    On the first row of ``inputs``: the restricted logits at its first and last
    positions against the full run's there, relative to the logits' scale.
    """
    try:
        return _CHECKED[adapter]
    except (KeyError, TypeError):
        pass
    get_module = getattr(adapter, "output_module", None)
    module = get_module() if callable(get_module) else None
    exact = False
    if module is not None:
        row = index_inputs(inputs, torch.arange(1))
        tokens = row if isinstance(row, Tensor) else next(iter(row.values()))
        positions = torch.tensor([[tokens.shape[1] - 1, 0]], device=adapter.device)
        with torch.no_grad():
            full = adapter.logits(inputs_to(row, adapter.device))
            try:
                with logits_only_at(module, positions):
                    restricted = adapter.logits(inputs_to(row, adapter.device))
            except Exception as error:  # noqa: BLE001 - any failure means: run in full
                warnings.warn(f"logits at the label positions only do not work on this model ({error}); unembedding every position", stacklevel=3)
                restricted = None
        if restricted is not None:
            expected = full[:, positions[0]]
            scale = max(1.0, float(full.float().abs().max()))
            exact = restricted.shape == expected.shape and float((restricted.float() - expected.float()).abs().max()) <= tolerance * scale
            if not exact:
                warnings.warn(
                    "this model's logits at chosen positions differ from the full run's (its head mixes positions); "
                    "unembedding every position",
                    stacklevel=3,
                )
    with contextlib.suppress(TypeError):
        _CHECKED[adapter] = exact
    return exact


def logits_at(adapter: Any, positions: Tensor, inputs: ModelInputs, run: Callable[[], Tensor]) -> Tensor:
    """``run()``'s logits at ``positions`` ``(batch, n)``: ``(batch, n, vocab)``.

    ``run`` is one forward of ``adapter`` on ``inputs`` (plain, replaced or
    resumed); where the adapter restricts its unembedding exactly only those rows
    are computed, else the full logits are gathered.
    """
    if restricts_logits(adapter, inputs):
        with logits_only_at(adapter.output_module(), positions):
            logits = run()
        if logits.shape[:2] != positions.shape:
            raise RuntimeError(
                f"logits at {tuple(positions.shape)} positions came back {tuple(logits.shape)}; the model changed "
                "its output after the unembedding"
            )
        return logits
    logits = run()
    return logits[torch.arange(logits.shape[0], device=logits.device)[:, None], positions.to(logits.device)]
