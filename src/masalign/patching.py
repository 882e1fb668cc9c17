"""Activation patching and ablation over a grid of sites x positions, for every adapter.

Activation patching compares two runs of one model that differ in a detail and in
their answer: a *clean* run (``"The Eiffel Tower is in"`` -> ``" Paris"``) and a
*corrupted* one (``"The Colosseum is in"`` -> ``" Rome"``). For each site and
position, the activation of one run is written into the other, and a metric of
the output says how much of the answer moved with it:

- denoising (``patch_into="corrupted"``, the default): the corrupted run with
  the clean activation at one (site, position); a high value means that
  activation is *sufficient* to restore the clean answer;
- noising (``patch_into="clean"``): the clean run with the corrupted activation;
  a low value means that activation is *necessary* for it.

Values are normalised so that 0 is the corrupted run's metric and 1 the clean
run's (``normalize=False`` keeps the raw metric, in :attr:`PatchingResult.raw`
either way). :func:`ablation` replaces an activation by its mean over a reference
set (``"mean"``), by the activation of another reference example
(``"resample"``) or by zero, normalised the same way when corrupted inputs are
given (else raw).

Every write goes through the adapter's ``run_with_replacement``, so the same
call patches a TransformerLens model, an nnsight-wrapped one, or a plain PyTorch
RNN step by step (a fused GRU's state at step ``t`` replaced, steps ``t+1..``
run from it, exactly). On a TransformerLens model the numbers equal
``transformer_lens.patching``'s (``get_act_patch_resid_pre`` and friends) on the
same inputs.

Metrics (:class:`LogitDifference`, :class:`AnswerProbability`,
:class:`AnswerAccuracy`) read the logits at one position per example (default
the last) and return the mean over the batch; any callable from ``(batch, seq,
vocab)`` logits to a scalar tensor works too.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .adapters.base import ModelAdapter, ModelInputs, Replacement, SiteError, parameter_devices, probing, run_context, tokens_and_mask, unknown_site_error
from .adapters.resume import KeyValuePrefix
from .data import inputs_to
from .logit_rows import logits_at
from .prefix import supports_key_values, supports_prefix

Metric = Callable[[Tensor], Tensor]


# -- metrics ---------------------------------------------------------------------------------------


def _answer_tensor(tokens: int | Sequence[int] | Tensor, what: str) -> Tensor:
    tensor = torch.as_tensor(tokens)
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise TypeError(f"{what} must be token ids (integers), got dtype {tensor.dtype}")
    if tensor.dim() > 1:
        raise ValueError(f"{what} must be one token id or one per example (batch,), got shape {tuple(tensor.shape)}")
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError(f"{what} holds a negative token id {int(tensor.min())}")
    return tensor.long()


class _AnswerMetric(abc.ABC):
    """A metric of the logits at one position per example (``position``: an int, ``-1`` the last,
    or ``(batch,)``) and of answer token ids (one id, or one per example)."""

    name = "metric"

    def __init__(self, answer: int | Sequence[int] | Tensor, position: int | Tensor = -1) -> None:
        self.answer = _answer_tensor(answer, "answer")
        as_tensor = torch.as_tensor(position)
        if as_tensor.dtype.is_floating_point or as_tensor.dtype == torch.bool:  # 4.7 would read position 4
            raise TypeError(f"the metric's position must be whole numbers (an int or a (batch,) integer tensor), got {position!r}")
        self.position = position

    def token_ids(self) -> dict[str, Tensor]:
        """The metric's token ids by role, for the vocabulary check."""
        return {"answer": self.answer}

    def read_positions(self, batch: int, seq: int, device: torch.device | str = "cpu") -> Tensor:
        """``(batch,)``: the position the metric reads in each example, counted from 0."""
        position = torch.as_tensor(self.position, device=device).long()
        if position.dim() == 0:
            position = position.expand(batch)
        if position.shape != (batch,):
            raise ValueError(f"the metric's position must be an int or (batch={batch},), got shape {tuple(position.shape)}")
        position = torch.where(position < 0, position + seq, position)
        if bool(((position < 0) | (position >= seq)).any()):
            raise IndexError(f"the metric's position {self.position} is outside the sequence of length {seq}")
        return position

    def rows(self, logits: Tensor) -> Tensor:
        """``(batch, vocab)`` logits at the metric's position."""
        batch, seq = logits.shape[:2]
        return logits[torch.arange(batch, device=logits.device), self.read_positions(batch, seq, logits.device)]

    def __call__(self, logits: Tensor) -> Tensor:
        return self.of_rows(self.rows(logits))

    @abc.abstractmethod
    def of_rows(self, rows: Tensor) -> Tensor:
        """The metric of the ``(batch, vocab)`` logits at its position."""

    def check_vocabulary(self, vocab_size: int) -> None:
        for role, tokens in self.token_ids().items():
            if tokens.numel() and int(tokens.max()) >= vocab_size:
                raise ValueError(
                    f"the {role} token {int(tokens.max())} is outside the model's vocabulary of {vocab_size} "
                    f"(token ids 0..{vocab_size - 1})"
                )

    @staticmethod
    def per_example(tokens: Tensor, rows: Tensor) -> Tensor:
        """``(batch,)`` token ids for ``(batch, vocab)`` rows; one id serves every example."""
        tokens = tokens.to(rows.device)
        if tokens.dim() == 1 and tokens.shape[0] != rows.shape[0]:
            raise ValueError(f"{tokens.shape[0]} answer tokens for a batch of {rows.shape[0]}: give one id, or one per example")
        return tokens.expand(rows.shape[0])

    def at(self, rows: Tensor, tokens: Tensor) -> Tensor:
        """``rows[b, tokens[b]]``."""
        return rows[torch.arange(rows.shape[0], device=rows.device), self.per_example(tokens, rows)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v.tolist()}' for k, v in self.token_ids().items())}, position={self.position})"


class LogitDifference(_AnswerMetric):
    """Mean of ``logit[answer] - logit[wrong]`` at ``position``: the usual patching metric."""

    name = "logit difference"

    def __init__(
        self, answer: int | Sequence[int] | Tensor, wrong: int | Sequence[int] | Tensor, position: int | Tensor = -1
    ) -> None:
        super().__init__(answer, position)
        self.wrong = _answer_tensor(wrong, "wrong")

    def token_ids(self) -> dict[str, Tensor]:
        return {"answer": self.answer, "wrong": self.wrong}

    def of_rows(self, rows: Tensor) -> Tensor:
        rows = rows.float()
        return (self.at(rows, self.answer) - self.at(rows, self.wrong)).mean()


class AnswerProbability(_AnswerMetric):
    """Mean probability of ``answer`` at ``position``."""

    name = "answer probability"

    def of_rows(self, rows: Tensor) -> Tensor:
        return self.at(rows.float().softmax(-1), self.answer).mean()


class AnswerAccuracy(_AnswerMetric):
    """Fraction of examples whose top token at ``position`` is ``answer``."""

    name = "accuracy"

    def of_rows(self, rows: Tensor) -> Tensor:
        return (rows.argmax(-1) == self.per_example(self.answer, rows)).float().mean()


# -- results ---------------------------------------------------------------------------------------


@dataclass
class PatchingResult:
    """A patching or ablation grid: ``values[i, j]`` for ``sites[i]`` at ``positions[j]``.

    ``values`` are normalised (0 = corrupted run, 1 = clean run) when ``normalized``,
    else equal to ``raw``, the metric itself.
    """

    values: Tensor
    raw: Tensor
    sites: list[str]
    positions: list[int]
    metric: str
    kind: str  # "denoising", "noising", "mean ablation", "resample ablation", "zero ablation"
    clean: float
    corrupted: float | None
    normalized: bool
    position_labels: list[str] | None = None

    def to_dataframe(self) -> Any:
        """A long pandas DataFrame: one row per (site, position) with ``value`` and ``raw``."""
        try:
            import pandas as pd
        except ImportError as error:
            raise ImportError("to_dataframe needs pandas: pip install pandas") from error
        labels = self.position_labels or [str(p) for p in self.positions]
        records = [
            {"site": site, "position": position, "label": labels[j], "value": float(self.values[i, j]), "raw": float(self.raw[i, j])}
            for i, site in enumerate(self.sites)
            for j, position in enumerate(self.positions)
        ]
        return pd.DataFrame.from_records(records)

    def plot(self, title: str | None = None) -> Any:
        """A heatmap (sites down, positions across); returns a matplotlib Figure, the global backend untouched."""
        from matplotlib.figure import Figure

        values = self.values.float().numpy()
        figure = Figure(figsize=(max(4.0, 0.45 * len(self.positions) + 2.5), max(2.5, 0.35 * len(self.sites) + 1.5)))
        ax = figure.subplots()
        if self.normalized:
            limit = max(1.0, float(abs(values).max())) if values.size else 1.0
            image = ax.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        else:
            image = ax.imshow(values, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(self.positions)), self.position_labels or [str(p) for p in self.positions], rotation=90, fontsize=8)
        ax.set_yticks(range(len(self.sites)), self.sites, fontsize=8)
        ax.set_xlabel("position")
        ax.set_ylabel("site")
        scale = "0 = corrupted, 1 = clean" if self.normalized else "raw"
        ax.set_title(title or f"{self.kind}: {self.metric} ({scale})", fontsize=9)
        figure.colorbar(image, ax=ax)
        figure.tight_layout()
        return figure

    def __repr__(self) -> str:
        best = int(self.values.abs().argmax()) if self.values.numel() else 0
        i, j = divmod(best, max(len(self.positions), 1))
        corrupted = "" if self.corrupted is None else f", corrupted {self.corrupted:.4g}"
        return (
            f"PatchingResult({self.kind}, {self.metric}, {len(self.sites)} sites x {len(self.positions)} positions, "
            f"clean {self.clean:.4g}{corrupted}; largest |value| {float(self.values.flatten()[best]) if self.values.numel() else 0:.3f} "
            f"at {self.sites[i] if self.sites else '-'}, position {self.positions[j] if self.positions else '-'})"
        )

    def _repr_html_(self) -> str:
        from html import escape

        labels = self.position_labels or [str(p) for p in self.positions]
        header = "".join(f"<th>{escape(label)}</th>" for label in labels)
        rows = []
        for i, site in enumerate(self.sites):
            cells = []
            for j in range(len(self.positions)):
                value = float(self.values[i, j])
                shade = int(255 - 155 * max(0.0, min(1.0, abs(value))))
                colour = f"rgb({shade}, {shade}, 255)" if value >= 0 else f"rgb(255, {shade}, {shade})"
                cells.append(f'<td style="background: {colour}; text-align: right">{value:.3f}</td>')
            rows.append(f"<tr><th>{escape(site)}</th>{''.join(cells)}</tr>")
        scale = "0 = corrupted run, 1 = clean run" if self.normalized else "raw metric"
        caption = escape(f"{self.kind}: {self.metric} ({scale}); clean {self.clean:.4g}" + ("" if self.corrupted is None else f", corrupted {self.corrupted:.4g}"))
        return f"<table><caption>{caption}</caption><tr><th>site \\ position</th>{header}</tr>{''.join(rows)}</table>"


# -- patching ---------------------------------------------------------------------------------------


def activation_patching(
    adapter: ModelAdapter,
    clean: ModelInputs,
    corrupted: ModelInputs,
    sites: str | Sequence[str],
    metric: Metric,
    positions: Sequence[int] | None = None,
    patch_into: str = "corrupted",
    normalize: bool = True,
    position_labels: Sequence[str] | None = None,
    prefix_cache: bool = True,
) -> PatchingResult:
    """Patch each site at each position from one run into the other; see the module docstring.

    ``clean`` and ``corrupted`` are inputs of one shape (``(batch, seq)`` token
    ids, or a mapping with an ``attention_mask`` that must be the same in both).
    ``positions`` default to every position of the sequence. Each cell patches
    that position in every example at once and takes ``metric`` over the batch,
    as ``transformer_lens.patching`` does. ``prefix_cache``: at a block's output,
    run each cell from the patched run's cached states (:class:`_SiteRuns`).
    """
    if patch_into not in ("corrupted", "clean"):
        raise ValueError(f"patch_into must be 'corrupted' (denoising) or 'clean' (noising), got {patch_into!r}")
    sites = _check_sites(adapter, sites)
    batch, seq = _check_same_layout(clean, corrupted)
    positions = _check_grid_positions(positions, seq, clean, position_labels)
    _check_metric_reads_real_tokens(metric, clean)
    clean, corrupted = inputs_to(clean, adapter.device), inputs_to(corrupted, adapter.device)  # once, not per cell
    with probing(adapter.model), run_context(adapter):
        clean_value, corrupted_value = (_metric_of(adapter, metric, inputs) for inputs in (clean, corrupted))
        normalise = _normaliser(clean_value, corrupted_value, normalize)
        source, target = (clean, corrupted) if patch_into == "corrupted" else (corrupted, clean)
        raw = torch.empty(len(sites), len(positions))
        grid = torch.tensor(positions).expand(batch, -1)
        for i, site in enumerate(sites):
            source_rows = adapter.activations(source, site, grid.to(adapter.device))  # (batch, n, width)
            _check_width(source_rows, adapter, site)
            runs = _SiteRuns(adapter, target, site, positions, prefix_cache)
            for j in range(len(positions)):
                raw[i, j] = _patched_metric(runs, metric, grid[:, j : j + 1], source_rows[:, j])
    kind = "denoising" if patch_into == "corrupted" else "noising"
    return PatchingResult(normalise(raw), raw, sites, positions, _metric_name(metric), kind, clean_value, corrupted_value,
                          normalize, list(position_labels) if position_labels is not None else None)


def ablation(
    adapter: ModelAdapter,
    inputs: ModelInputs,
    sites: str | Sequence[str],
    metric: Metric,
    kind: str = "mean",
    positions: Sequence[int] | None = None,
    reference: ModelInputs | None = None,
    corrupted: ModelInputs | None = None,
    seed: int = 0,
    prefix_cache: bool = True,
    position_labels: Sequence[str] | None = None,
) -> PatchingResult:
    """Replace each site's activation at each position and measure ``metric`` on ``inputs``.

    ``kind``: ``"mean"`` (the mean over ``reference``'s examples at that position),
    ``"resample"`` (each example takes the activation there of a ``reference`` example
    drawn at random, with replacement, once per call from ``seed``; when ``reference``
    is ``inputs``, never its own) or ``"zero"``.
    ``reference`` defaults to ``inputs`` and must have the same sequence length.
    With ``corrupted`` inputs the values are normalised (0 = corrupted, 1 =
    unablated); without, they are the raw metric. ``prefix_cache``: as in
    :func:`activation_patching`.
    """
    if kind not in ("mean", "resample", "zero"):
        raise ValueError(f"kind must be 'mean', 'resample' or 'zero', got {kind!r}")
    sites = _check_sites(adapter, sites)
    donors_from_inputs = reference is None or reference is inputs
    reference = inputs if reference is None else reference
    batch, seq = _layout(inputs)
    reference_batch, reference_seq = _layout(reference)
    if reference_seq != seq:
        raise ValueError(
            f"the reference inputs have sequence length {reference_seq} but the inputs {seq}: ablation takes the "
            "activation at the same position, so pad or cut them to one length"
        )
    if kind == "resample" and donors_from_inputs and batch < 2:
        raise ValueError("resample ablation of one example needs a reference=... batch: it takes another example's activation")
    if corrupted is not None:
        _check_same_layout(inputs, corrupted)
    positions = _check_grid_positions(positions, seq, inputs, position_labels)
    _check_metric_reads_real_tokens(metric, inputs)
    inputs, reference = inputs_to(inputs, adapter.device), inputs_to(reference, adapter.device)  # once, not per cell
    corrupted = None if corrupted is None else inputs_to(corrupted, adapter.device)
    with probing(adapter.model), run_context(adapter):
        clean_value = _metric_of(adapter, metric, inputs)
        corrupted_value = _metric_of(adapter, metric, corrupted) if corrupted is not None else None
        normalise = _normaliser(clean_value, corrupted_value, corrupted is not None)
        grid = torch.tensor(positions)
        if kind == "resample":
            generator = torch.Generator().manual_seed(seed)
            if donors_from_inputs:  # an offset of 1..batch-1: every example ablated by another's activation
                donors = (torch.arange(batch) + torch.randint(1, batch, (batch,), generator=generator)) % batch
            else:
                donors = torch.randint(0, reference_batch, (batch,), generator=generator)
        raw = torch.empty(len(sites), len(positions))
        for i, site in enumerate(sites):
            if kind == "zero":
                width = adapter.sites()[site]
                replacement_rows = torch.zeros(batch, len(positions), width, device=adapter.device)
            else:
                reference_rows = adapter.activations(reference, site, grid.expand(reference_batch, -1).to(adapter.device))
                _check_width(reference_rows, adapter, site)
                if kind == "mean":
                    mask = _attention_mask(reference)
                    if mask is not None:
                        real = mask[:, grid].bool()
                        if not bool(real.all(0).all()):
                            raise ValueError("a reference example is padding at an ablated position; mean ablation needs real tokens there")
                    replacement_rows = reference_rows.mean(0, keepdim=True).expand(batch, -1, -1)
                else:
                    replacement_rows = reference_rows[donors.to(reference_rows.device)]
            runs = _SiteRuns(adapter, inputs, site, positions, prefix_cache)
            for j in range(len(positions)):
                raw[i, j] = _patched_metric(runs, metric, grid.expand(batch, -1)[:, j : j + 1], replacement_rows[:, j])
    return PatchingResult(normalise(raw), raw, sites, positions, _metric_name(metric), f"{kind} ablation", clean_value,
                          corrupted_value, corrupted is not None, list(position_labels) if position_labels is not None else None)


# -- helpers ---------------------------------------------------------------------------------------


class _SiteRuns:
    """The runs of one site's cells: ``inputs`` with the site's rows at one position replaced.

    The run up to the site is the same in every cell, and in a causal model so is
    everything before the patched position. Where the site is a block's output and
    the adapter can resume there (:mod:`masalign.prefix`), the states at the site are
    computed once and each cell runs only the blocks after it; where the adapter also
    keeps the later blocks' keys and values (a Hugging Face model through nnsight or a
    TransformerLens bridge, a ``HookedTransformer``), those of the positions before the last patched one are
    computed once too, and a cell at position ``p > 0`` runs positions ``p..`` only
    (position 0 runs whole). The first cached cell of a site is checked against its
    whole run (whose value is the one kept); beyond ``1e-4`` of the logits' scale
    that site's cells run whole, with a warning. Otherwise (``prefix_cache=False``, other
    sites, a model sharded across devices) every cell is one ``run_with_replacement``.

    A cell's logits are those at ``read`` ``(batch, n)`` (the positions a metric reads;
    the unembedding runs there only, :func:`masalign.logit_rows.logits_at`), or, with
    ``read=None``, at every position: before ``p`` the unpatched run's, as a causal
    model gives them (padding's aside: nothing should read them, and a TransformerLens
    bridge lets padding that attends to nothing see every position).
    """

    def __init__(self, adapter: ModelAdapter, inputs: ModelInputs, site: str, positions: Sequence[int], prefix_cache: bool) -> None:
        self.adapter, self.inputs, self.site = adapter, inputs, site
        self.states: Tensor | None = None
        self.key_values: KeyValuePrefix | None = None
        self._unpatched: Tensor | None = None
        self.checked = False  # the first cached cell is compared with its whole run
        if not prefix_cache or not supports_prefix(adapter, site) or len(parameter_devices(adapter.model)) > 1:
            return
        last = max(positions)
        with torch.no_grad():
            if last > 0 and supports_key_values(adapter, site):
                try:
                    self.key_values = adapter.key_value_prefix(inputs, site, last)
                except (TypeError, ValueError, RuntimeError, SiteError) as error:
                    warnings.warn(
                        f"model {getattr(adapter, 'name', 'model')!r}: patching {site!r} from cached keys and values failed "
                        f"({type(error).__name__}: {error}); its cells run from the states at the site instead",
                        stacklevel=3,
                    )
                else:
                    self.states = self.key_values.states
            if self.states is None:
                self.states = adapter.prefix(inputs, site)

    def unpatched(self) -> Tensor:
        """The run's own logits at every position (once)."""
        if self._unpatched is None:
            with torch.no_grad():
                self._unpatched = self.adapter.logits(self.inputs)
        return self._unpatched

    def __call__(self, positions: Tensor, replace: Replacement, read: Tensor | None) -> Tensor:
        """Logits of the run with ``replace`` at ``positions`` ``(batch, 1)`` (one position for every
        row): ``(batch, n, vocab)`` at ``read``, or ``(batch, seq, vocab)`` with ``read=None``."""
        positions = positions.to(self.adapter.device)
        adapter, inputs, site = self.adapter, self.inputs, self.site

        def at_read(run: Callable[[], Tensor]) -> Tensor:
            return run() if read is None else logits_at(adapter, read.to(adapter.device), inputs, run)

        def whole() -> Tensor:
            return at_read(lambda: adapter.run_with_replacement(inputs, site, positions, replace))

        if self.states is None:
            return whole()
        start = int(positions.min())
        from_key_values = self.key_values is not None and start > 0 and (read is None or int(read.min()) >= start)
        if self.key_values is not None and not from_key_values:
            return whole()  # position 0 (or a metric before the patch): runs whole, as its check would
        with torch.no_grad():
            if from_key_values:
                prefix = self.key_values.with_start(start)
                logits = at_read(lambda: adapter.run_from_prefix(inputs, site, prefix, positions, replace))
                if read is None:
                    logits = torch.cat([self.unpatched()[:, :start], logits[:, start:]], dim=1)
            else:
                logits = at_read(lambda: adapter.run_from_prefix(inputs, site, self.states, positions, replace))
            if self.checked:
                return logits
            self.checked = True
            reference = whole()
        compared, ours = reference, logits
        mask = tokens_and_mask(inputs)[1]
        if read is None and mask is not None and mask.dim() == 2:  # padding's logits aside
            compared, ours = reference[mask.bool()], logits[mask.bool()]
        difference = float((compared.float() - ours.float()).abs().max())
        if not difference <= 1e-4 * max(1.0, float(compared.float().abs().max())):
            warnings.warn(
                f"model {getattr(adapter, 'name', 'model')!r}: patching {site!r} from cached "
                f"{'keys and values' if from_key_values else 'states'} gives logits "
                f"{difference:.3g} away from the whole run's; each of its cells runs the whole model instead",
                stacklevel=4,
            )
            self.states = self.key_values = None
        return reference


def _patched_metric(runs: _SiteRuns, metric: Metric, positions: Tensor, rows: Tensor) -> float:
    """``metric`` of the run with the site at ``positions`` ``(batch, 1)`` set to ``rows`` ``(batch, width)``;
    the logits at the metric's position only, where it says which (the metrics here)."""

    def replace(hidden: Tensor, example_index: Tensor, slot_index: Tensor) -> Tensor:
        return rows[example_index].to(hidden.dtype)

    if isinstance(metric, _AnswerMetric):
        batch, seq = _layout(runs.inputs)
        read = metric.read_positions(batch, seq)[:, None]
        return _scalar(metric.of_rows(runs(positions, replace, read)[:, 0]))
    return _scalar(metric(runs(positions, replace, None)))


def _metric_of(adapter: ModelAdapter, metric: Metric, inputs: ModelInputs) -> float:
    logits = adapter.logits(inputs)
    check = getattr(metric, "check_vocabulary", None)
    if callable(check):
        check(logits.shape[-1])
    return _scalar(metric(logits))


def _scalar(value: Any) -> float:
    tensor = torch.as_tensor(value)
    if tensor.numel() != 1:
        raise ValueError(f"the metric must return one number (a mean over the batch); got shape {tuple(tensor.shape)}")
    number = float(tensor)
    if number != number or number in (float("inf"), float("-inf")):
        raise FloatingPointError(f"the metric returned {number}")
    return number


def _normaliser(clean: float, corrupted: float | None, normalize: bool) -> Callable[[Tensor], Tensor]:
    if not normalize or corrupted is None:
        return lambda raw: raw.clone()
    gap = clean - corrupted
    if abs(gap) < 1e-6 * max(1.0, abs(clean)):
        raise ValueError(
            f"the clean and corrupted runs give the same metric ({clean:.6g}), so 0 = corrupted and 1 = clean is "
            "undefined: choose inputs whose answers differ, or pass normalize=False"
        )
    return lambda raw: (raw - corrupted) / gap


def _metric_name(metric: Metric) -> str:
    return str(getattr(metric, "name", None) or getattr(metric, "__name__", None) or type(metric).__name__)


def _check_sites(adapter: ModelAdapter, sites: str | Sequence[str]) -> list[str]:
    names = [sites] if isinstance(sites, str) else list(sites)
    if not names:
        raise ValueError("sites is empty; name at least one (adapter.sites() lists them)")
    valid = adapter.sites()
    for site in names:
        if site not in valid:
            raise unknown_site_error(site, valid, getattr(adapter, "name", "model"))
    return names


def _layout(inputs: ModelInputs) -> tuple[int, int]:
    tokens, _ = tokens_and_mask(inputs)
    if tokens.dim() < 2:
        raise ValueError(f"inputs must be (batch, seq) or (batch, seq, features); got shape {tuple(tokens.shape)}")
    return int(tokens.shape[0]), int(tokens.shape[1])


def _attention_mask(inputs: ModelInputs) -> Tensor | None:
    return tokens_and_mask(inputs)[1]


def _check_metric_reads_real_tokens(metric: Metric, inputs: ModelInputs) -> None:
    """Refuse a metric of this module whose position is padding in some example (attention mask 0),
    such as the default last position of a right-padded row: its logits there mean nothing."""
    mask = _attention_mask(inputs)
    if not isinstance(metric, _AnswerMetric) or mask is None or mask.dim() != 2:
        return
    read = metric.read_positions(*mask.shape)
    on_padding = ~mask.cpu().bool()[torch.arange(mask.shape[0]), read]
    if bool(on_padding.any()):
        row = int(on_padding.nonzero()[0])
        real = mask[row].cpu().bool().nonzero().flatten()
        last = int(real[-1]) if real.numel() else None
        raise IndexError(
            f"the metric reads position {int(read[row])} of example {row}, which is padding (attention_mask 0); "
            f"that example's last token is at {last}: give the metric one position per example, e.g. "
            "position=attention_mask.sum(1) - 1 for right padding"
        )


def _check_same_layout(clean: ModelInputs, corrupted: ModelInputs) -> tuple[int, int]:
    clean_layout, corrupted_layout = _layout(clean), _layout(corrupted)
    if clean_layout != corrupted_layout:
        raise ValueError(
            f"the clean inputs are (batch, seq) = {clean_layout} but the corrupted {corrupted_layout}: patching writes "
            "position p of one run into position p of the other, so both need the same batch and length (pad the "
            "shorter prompts, or choose prompts of one length in tokens)"
        )
    clean_mask, corrupted_mask = _attention_mask(clean), _attention_mask(corrupted)
    if (clean_mask is None) != (corrupted_mask is None) or (
        clean_mask is not None and not torch.equal(clean_mask.bool(), corrupted_mask.bool())
    ):
        raise ValueError(
            "the clean and corrupted attention masks differ: positions would not correspond; give both runs the "
            "same padding"
        )
    return clean_layout


def _check_grid_positions(
    positions: Sequence[int] | None, seq: int, inputs: ModelInputs, labels: Sequence[str] | None
) -> list[int]:
    if positions is None:
        positions = list(range(seq))
    else:
        if isinstance(positions, Tensor):
            positions = positions.tolist()
        positions = list(positions)
        if not positions:
            raise ValueError("positions is empty; give at least one, or None for every position")
        for position in positions:
            if isinstance(position, bool) or not isinstance(position, int):
                raise TypeError(f"positions must be ints, got {position!r}")
            if not 0 <= position < seq:
                raise IndexError(f"position {position} is beyond the prompts, which have positions 0..{seq - 1}")
        if len(set(positions)) != len(positions):
            raise ValueError(f"positions repeat: {positions}")
    mask = _attention_mask(inputs)
    if mask is not None and mask.dim() == 2:
        padded = [p for p in positions if not bool(mask[:, p].bool().all())]
        if padded:
            raise IndexError(
                f"positions {padded} are padding in some examples; patch only positions every prompt has "
                "(positions=...), or use prompts of one length"
            )
    if labels is not None and len(labels) != len(positions):
        raise ValueError(f"{len(labels)} position labels for {len(positions)} positions")
    return positions


def _check_width(rows: Tensor, adapter: ModelAdapter, site: str) -> None:
    width = adapter.sites()[site]
    if rows.shape[-1] != width:
        raise ValueError(f"{site!r} gave activations of width {rows.shape[-1]}, but the adapter lists width {width}")


__all__ = [
    "AnswerAccuracy",
    "AnswerProbability",
    "LogitDifference",
    "Metric",
    "PatchingResult",
    "ablation",
    "activation_patching",
]
