"""What fit and evaluate read from the frozen models, kept for the next fit or evaluation.

``fit`` reads two things from the models before its first step: the sources'
activations at their sites (the values written into the targets) and, with
prefix caching, the targets' base runs up to their sites. Neither depends on the
alignment, only on the model, the site and the data. A layer sweep fits many
alignments at the same (model, site) on the same pairs (DAS at a layer, MAS for
every layer pair it takes part in, then the evaluation with its floor); with one
:class:`ActivationMemo` passed to each call (``memo=``) each of those reads runs
once. On the pretrained-LM demo, reading 1,000 prompts up to a late layer takes
longer than the 40 steps that follow it.

A memo is keyed by the objects themselves (the adapter, the site name, the
input and position tensors, each tensor of a mapping of inputs) and holds them,
so a key cannot be reused by another object. Editing a tensor in place keeps
its key: do not edit data a memo has read. It is valid while the models' weights do not change: call
:meth:`ActivationMemo.clear` after changing them (fit never does; it freezes the
models while it runs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import Tensor

T = TypeVar("T")


def _identity(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((key, id(item)) for key, item in value.items()))
    return id(value)


class ActivationMemo:
    """Source activations and base prefixes, per (kind, adapter, site, inputs, positions); see the module docstring."""

    def __init__(self) -> None:
        self._entries: dict[tuple[Any, ...], tuple[tuple[Any, ...], Any]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, kind: str, adapter: Any, site: str, inputs: Any, positions: Tensor, compute: Callable[[], T]) -> T:
        """The memoised value of ``compute()`` for this key, computing it the first time."""
        key = (kind, id(adapter), site, _identity(inputs), id(positions))
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            return entry[1]
        self.misses += 1
        value = compute()
        # The keyed objects are held with the value, so their ids stay theirs: a mapping's
        # tensors too, which its owner may replace in it while the memo holds the mapping.
        held_inputs = tuple(inputs.values()) if isinstance(inputs, Mapping) else inputs
        self._entries[key] = ((adapter, held_inputs, positions), value)
        return value

    def clear(self) -> None:
        """Forget everything (after the models' weights changed)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ActivationMemo({len(self)} entries, {self.hits} hits, {self.misses} misses)"


__all__ = ["ActivationMemo"]
