"""Per-row results computed on first use: the caches ``fit`` reads, filled as it reads them.

``fit`` reads each training row's source activations and base prefix once.
Computing them all before the first step delays it by a pass of the models over
the whole training set, though a fit that converges in a few dozen steps reads
a fraction of it. A :class:`RowCache` computes the rows a batch asks for that it
has not computed yet, keeps them, and returns the kept rows: after one epoch it
holds every row, as an eager cache would, for the same total work.

Told the rows the next batches will ask for (:meth:`RowCache.read_ahead`), a
request that must run the model also reads the first of those, up to 256 rows
in one run (``fit``'s setting): a run's fixed cost is a large share of a small
batch's (a 2-layer, 64-wide GPT-2: 1.4 ms of 7.5 for 64 rows), so one run for
four batches' rows costs 20-25% less than four.

The value of a row block is a tensor ``(rows, ...)`` or anything with
``tensors()`` / ``with_tensors(parts)`` over such tensors
(:class:`masalign.adapters.resume.KeyValuePrefix`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class RowCache:
    """Rows ``0..n_rows-1`` of ``compute(index)``, each computed once, on first use.

    ``cache[index]`` (a 1-d long tensor of row numbers) returns the rows in that
    order, computing the missing ones in chunks of ``batch_size``; :meth:`full`
    returns every row. ``compute`` must give the same row whatever rows it is
    asked for with (a model's rows do not depend on each other in eval mode).
    """

    def __init__(self, n_rows: int, compute: Callable[[Tensor], Any], batch_size: int = 512) -> None:
        self.n_rows = n_rows
        self._compute = compute
        self._batch_size = batch_size
        self._filled = torch.zeros(n_rows, dtype=torch.bool)
        self._storage: list[Tensor] | None = None
        self._template: Any = None
        self._upcoming: Tensor | None = None
        self._read_ahead_rows = 0

    def read_ahead(self, upcoming: Tensor, rows: int = 256) -> None:
        """The rows the next requests will ask for, in order: a request that must compute rows
        also computes the first of these not computed yet, up to ``rows`` in all (at most
        ``batch_size``). Only the order of reading changes; every row is the same."""
        self._upcoming = torch.as_tensor(upcoming, dtype=torch.long).cpu()
        self._read_ahead_rows = min(rows, self._batch_size)

    def __len__(self) -> int:
        return self.n_rows

    @property
    def complete(self) -> bool:
        return bool(self._filled.all())

    @property
    def n_computed(self) -> int:
        return int(self._filled.sum())

    def __getitem__(self, index: Tensor) -> Any:
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        missing = index[~self._filled[index]].unique()
        if 0 < missing.numel() < self._read_ahead_rows and self._upcoming is not None:
            ahead = self._upcoming[~self._filled[self._upcoming]]
            ahead = ahead[~torch.isin(ahead, missing)][: self._read_ahead_rows - missing.numel()]
            missing = torch.cat([missing, ahead])
        for chunk in missing.split(self._batch_size) if missing.numel() else ():
            self._store(chunk, self._compute(chunk))
        assert self._storage is not None
        return self._rebuild([part[index.to(part.device)] for part in self._storage])

    def full(self) -> Any:
        """Every row (computing those not computed yet), without a copy once all are kept."""
        if not self.complete:
            self[torch.arange(self.n_rows)]
        assert self._storage is not None
        return self._rebuild(self._storage)

    def _store(self, rows: Tensor, value: Any) -> None:
        parts = [value] if isinstance(value, Tensor) else list(value.tensors())
        if self._storage is None:
            self._template = None if isinstance(value, Tensor) else value
            self._storage = [part.new_empty((self.n_rows, *part.shape[1:])) for part in parts]
        for stored, part in zip(self._storage, parts, strict=True):
            if part.shape[1:] != stored.shape[1:]:
                raise RuntimeError(f"rows computed for the cache changed shape: {tuple(part.shape[1:])}, not {tuple(stored.shape[1:])}")
            stored[rows.to(stored.device)] = part
        self._filled[rows] = True

    def _rebuild(self, parts: list[Tensor]) -> Any:
        return parts[0] if self._template is None else self._template.with_tensors(parts)

    def __repr__(self) -> str:
        return f"RowCache({self.n_computed}/{self.n_rows} rows computed)"


__all__ = ["RowCache"]
