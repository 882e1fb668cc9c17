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

Rows with the same inputs have the same value: given the tensors a row's value
is computed from (:func:`first_rows_alike`), a cache computes one row of each kind
and copies it to the others. Counterfactual pairs built from a template repeat
inputs often (the DAS race's 4,096 base prompts hold 2,237 distinct ones), and
a copy costs nothing beside a model run.

The value of a row block is a tensor ``(rows, ...)`` or anything with
``tensors()`` / ``with_tensors(parts)`` over such tensors
(:class:`masalign.adapters.resume.KeyValuePrefix`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor


def first_rows_alike(*tensors: Tensor | Mapping[str, Tensor]) -> Callable[[], Tensor]:
    """For rows ``0..n-1`` of ``tensors`` (each ``(n, ...)``, or a mapping of such), a function that
    gives each row's first row with the same bits in every tensor (itself if none comes before);
    computed when first called."""

    def first() -> Tensor:
        parts = [t for item in tensors for t in (item.values() if isinstance(item, Mapping) else (item,))]
        n = parts[0].shape[0]
        bits = torch.cat([_row_bits(t, n) for t in parts], dim=1)  # (n, columns) int64
        # Rows grouped by a hash, then each row checked against its group's first: a
        # collision only loses a copy, never gives a wrong one. The hash is a random
        # projection of the rows' 32-bit halves (exact in float64): one product, where
        # torch.unique over whole rows takes 9 ms for 4,096 rows of 13 tokens.
        small = bits.numel() == 0 or (int(bits.min()) >= 0 and int(bits.max()) < 2**32)  # token ids
        halves = (bits if small else torch.cat([bits & 0xFFFFFFFF, (bits >> 32) & 0xFFFFFFFF], dim=1)).double()
        weights = torch.rand(halves.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        _, kind = torch.unique(halves @ weights, return_inverse=True)
        first_of_kind = torch.full((int(kind.max()) + 1 if n else 0,), n, dtype=torch.long)
        first_of_kind.scatter_reduce_(0, kind, torch.arange(n), reduce="amin")
        first = first_of_kind[kind]
        repeat = (first != torch.arange(n)).nonzero()[:, 0]
        collided = repeat[(bits[repeat] != bits[first[repeat]]).any(dim=1)]
        first[collided] = collided
        return first

    return first


def _row_bits(tensor: Tensor, n: int) -> Tensor:
    """``(n, m)`` int64 holding the bits of each row of ``tensor`` (floats by their bit patterns)."""
    rows = tensor.detach().reshape(n, -1).cpu().contiguous()
    if rows.dtype == torch.bool:
        rows = rows.to(torch.uint8)
    elif rows.is_floating_point() or rows.is_complex():
        rows = rows.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}[rows.element_size()])
    return rows.long()


class RowCache:
    """Rows ``0..n_rows-1`` of ``compute(index)``, each computed once, on first use.

    ``cache[index]`` (a 1-d long tensor of row numbers) returns the rows in that
    order, computing the missing ones in chunks of ``batch_size``; :meth:`full`
    returns every row. ``compute`` must give the same row whatever rows it is
    asked for with (a model's rows do not depend on each other in eval mode).
    With ``first_alike`` (:func:`first_rows_alike` of the tensors ``compute``
    reads), a row whose inputs equal an earlier row's is copied from that row,
    computed once for both.
    """

    def __init__(
        self,
        n_rows: int,
        compute: Callable[[Tensor], Any],
        batch_size: int = 512,
        first_alike: Callable[[], Tensor] | None = None,
    ) -> None:
        self.n_rows = n_rows
        self._compute = compute
        self._batch_size = batch_size
        self._first_alike = first_alike
        self._first: Tensor | None = None
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
        if missing.numel() and self._first_alike is not None:
            missing = self._copy_alike(missing)
        if 0 < missing.numel() < self._read_ahead_rows and self._upcoming is not None:
            ahead = self._upcoming[~self._filled[self._upcoming]]
            if self._first_alike is not None:
                # Enough candidates for the read: repeats among them are copied, not read.
                ahead = self._copy_alike(ahead[: 2 * self._read_ahead_rows])
            ahead = ahead[~torch.isin(ahead, missing)][: self._read_ahead_rows - missing.numel()]
            missing = torch.cat([missing, ahead])
        for chunk in missing.split(self._batch_size) if missing.numel() else ():
            self._store(chunk, self._compute(chunk))
        if self._first_alike is not None and missing.numel():
            self._copy_alike(index[~self._filled[index]])  # repeats of rows just computed
        assert self._storage is not None
        return self._rebuild([part[index.to(part.device)] for part in self._storage])

    def _copy_alike(self, rows: Tensor) -> Tensor:
        """Fill ``rows`` whose first alike row is computed from it; returns the rows still to compute,
        one per kind (the first of each kind among them stands for the rest)."""
        if self._first is None:
            assert self._first_alike is not None
            self._first = self._first_alike()
            if self._first.shape != (self.n_rows,):
                raise ValueError(f"first_alike gave shape {tuple(self._first.shape)} for {self.n_rows} rows")
        if rows.numel() == 0:
            return rows
        first = self._first[rows]
        done = self._filled[first]
        if bool(done.any()) and self._storage is not None:
            copies, sources = rows[done], first[done]
            for part in self._storage:
                part[copies.to(part.device)] = part[sources.to(part.device)]
            self._filled[copies] = True
        # Still to compute: the first row of each kind not yet computed (in the order asked).
        pending_first = first[~done]
        _, position = torch.unique(pending_first, return_inverse=True)
        keep = torch.zeros(int(position.max()) + 1 if position.numel() else 0, dtype=torch.long)
        keep.scatter_reduce_(0, position, torch.arange(position.numel()), reduce="amin", include_self=False)
        return pending_first[keep.sort().values]

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


__all__ = ["RowCache", "first_rows_alike"]
