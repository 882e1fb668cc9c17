"""Interchange intervention accuracy (IIA) and the report around it (docs/method.md section 6).

For every (source, target) direction: trial accuracy (every label position of a
pair right after the intervention) and token accuracy. Beside them, always: each
target's own task accuracy without intervention (the ceiling) and the IIA of the
untrained alignment (the floor).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import distributed
from .adapters import ModelAdapter
from .adapters.base import probing, run_context
from .data import (
    CounterfactualData,
    LabelledSequences,
    ModelInputs,
    batches,
    check_views,
    index_inputs,
    inputs_to,
    variable_of,
    view_for,
)
from .logit_rows import label_slots
from .mas import ModelAlignment
from .memo import ActivationMemo
from .objectives import Direction, Matrix, check_directions, correct_counts, intervention_loss, to_matrix
from .prefix import dataset_prefixes, prefix_rows

@contextlib.contextmanager
def models_in_eval_mode(models: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Each model in eval mode (dropout off, as ``fit`` runs them) without gradient; every
    module's own mode restored afterwards."""
    with contextlib.ExitStack() as stack:
        for model in {id(model): model for model in models}.values():
            stack.enter_context(probing(model))
        yield


def _in_eval_mode(function: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``function(alignment_or_adapter, ...)`` with the models it runs in eval mode: a score of a
    model left in training mode would otherwise change from call to call with its dropout."""

    @functools.wraps(function)
    def in_eval_mode(first: ModelAlignment | ModelAdapter, *args: Any, **kwargs: Any) -> Any:
        adapters = list(first.models.values()) if isinstance(first, ModelAlignment) else [first]
        with models_in_eval_mode([adapter.model for adapter in adapters]), contextlib.ExitStack() as stack:
            for adapter in adapters:
                stack.enter_context(run_context(adapter))
            return function(first, *args, **kwargs)

    return in_eval_mode


@dataclass
class DirectionScores:
    trial_accuracy: float
    token_accuracy: float
    loss: float


@_in_eval_mode
def interchange_scores(
    alignment: ModelAlignment,
    data: CounterfactualData,
    directions: Sequence[Direction] | None = None,
    source_cache: Mapping[str, Tensor] | None = None,
    batch_size: int = 256,
    prefix_cache: Mapping[str, Tensor] | None = None,
    shard: bool = False,
) -> dict[Direction, DirectionScores]:
    """IIA (trial and token accuracy) and loss of each direction on ``data``.

    ``source_cache`` (model -> source activations for ``data``) skips recomputing them;
    ``prefix_cache`` (model -> :func:`masalign.prefix.base_prefixes` of its base
    inputs) runs only the blocks after the target's site. ``shard=True`` under
    ``torchrun`` (:mod:`masalign.distributed`): each process scores its share of
    every batch and the sums are combined, so every process gets the
    single-process scores; every process must then call it.
    """
    directions = check_directions(alignment, directions)
    n = check_views(data)
    variable = variable_of(data)
    cache = dict(source_cache or {})
    for source in {s for s, _ in directions} - set(cache):
        view = view_for(data, source)
        cache[source] = alignment.source_activations(source, view.source_inputs, view.source_positions)
    scores = {}
    for source, target in directions:
        device = alignment.input_device(target)
        view = view_for(data, target)
        trials = tokens = label_tokens = 0
        loss_sum = 0.0
        for index in batches(n, batch_size):
            if index[0] == 0:
                view.check_vocabulary(vocabulary_size(alignment.models[target], view.base_inputs), f"model {target!r}")
            rows = distributed.shard(index) if shard else index
            if len(rows) == 0:  # more processes than rows in this batch
                continue
            logit_positions, labels = label_slots(view.labels[rows])
            logits = alignment.intervened_logits(
                source,
                target,
                cache[source][rows],  # moved to the source's map by intervened_logits
                inputs_to(index_inputs(view.base_inputs, rows), device),
                view.base_positions[rows].to(device),
                variable,
                prefix_rows(prefix_cache, target, rows, device),
                logit_positions.to(device),
            )
            labels = labels.to(logits.device)
            t, k, m = correct_counts(logits, labels)
            trials, tokens, label_tokens = trials + t, tokens + k, label_tokens + m
            # Summed over label tokens and divided once at the end: the mean per label token of the
            # whole data, whatever the batches (a mean per batch weighted by rows is not).
            loss_sum += float(intervention_loss(logits, labels, reduction="sum"))
        if shard:
            trials, tokens, label_tokens, loss_sum = distributed.all_reduce_sum([trials, tokens, label_tokens, loss_sum])
        scores[(source, target)] = DirectionScores(trials / n, tokens / max(label_tokens, 1), loss_sum / max(label_tokens, 1))
    return scores


@_in_eval_mode
def vocabulary_size(adapter: ModelAdapter, inputs: ModelInputs) -> int:
    """The number of logits ``adapter``'s model gives, from one run on the first row of ``inputs``."""
    return adapter.logits(inputs_to(index_inputs(inputs, torch.arange(1)), adapter.device)).shape[-1]


@_in_eval_mode
def task_accuracy(adapter: ModelAdapter, data: LabelledSequences, batch_size: int = 256) -> tuple[float, float]:
    """(trial, token) accuracy of a model on its own task, without intervention: the ceiling."""
    trials = tokens = label_tokens = 0
    n = len(data)
    for index in batches(n, batch_size):
        logits = adapter.logits(inputs_to(index_inputs(data.inputs, index), adapter.device))
        top = int(data.labels[index].max())
        if top >= logits.shape[-1]:
            raise ValueError(
                f"ceiling data labels go up to token {top}, but the model has only {logits.shape[-1]} logits "
                f"(token ids 0..{logits.shape[-1] - 1}): the labels are not in this model's vocabulary"
            )
        t, k, m = correct_counts(logits, data.labels[index].to(logits.device))
        trials, tokens, label_tokens = trials + t, tokens + k, label_tokens + m
    return trials / n, tokens / max(label_tokens, 1)


def _check_ceiling_data(ceiling_data: Any, models: Sequence[str]) -> None:
    if isinstance(ceiling_data, LabelledSequences):
        return
    if not isinstance(ceiling_data, Mapping):
        raise TypeError(
            f"ceiling_data must be LabelledSequences or {{model_name: LabelledSequences}}, got {type(ceiling_data).__name__}"
        )
    missing = [m for m in models if m not in ceiling_data]
    if missing:
        raise ValueError(
            f"ceiling_data has task data for {sorted(ceiling_data)} but not for model(s) {missing}; give one "
            "entry per model, or one LabelledSequences shared by all"
        )
    for name in models:
        if not isinstance(ceiling_data[name], LabelledSequences):
            raise TypeError(
                f"ceiling_data[{name!r}] is {type(ceiling_data[name]).__name__}, not LabelledSequences: the ceiling is "
                "the model's accuracy on plain task sequences (task.sample(...), or evaluation_views(...) of an LM task), "
                "not on counterfactual pairs"
            )


def untrained_copy(alignment: ModelAlignment) -> ModelAlignment:
    """The alignment as initialised (same seed and settings, same standardisation), untrained."""
    fresh = ModelAlignment(
        alignment.models,
        alignment.sites,
        alignment.subspace_dim,
        alignment=alignment.alignment_kind,
        alignment_options=alignment.alignment_options,
        keep_complement=alignment.keep_complement,
        seed=alignment.seed,
    )
    for name, trained in alignment.alignments.items():
        fresh.alignments[name].set_standardization(trained.mean, trained.std)
    return fresh


@dataclass
class IIAReport:
    """IIA for every direction, with ceiling and floor. ``iia[source][target]``."""

    models: list[str]
    sites: dict[str, str]
    subspace_dim: dict[str, int]
    variable: str
    n_pairs: int
    iia: Matrix
    iia_token: Matrix
    floor: Matrix | None = None
    floor_token: Matrix | None = None
    ceiling: dict[str, float] | None = None
    ceiling_token: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def matrices(self) -> dict[str, Any]:
        """The results without the settings: IIA, floor and ceiling, as the demos' reports hold them."""
        return {
            "iia": self.iia, "iia_token": self.iia_token, "ceiling": self.ceiling, "floor": self.floor,
            "floor_token": self.floor_token, "n_test_pairs": self.n_pairs,
        }

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def table(self) -> str:
        """A text table: IIA (floor) per direction, and each target's ceiling."""
        width = max(8, *(len(m) for m in self.models)) + 2
        cell = max(16, width + 2)
        lines = [f"IIA on {self.variable!r} (trial accuracy; floor in brackets), {self.n_pairs} pairs, k = {self.subspace_dim}"]
        lines.append("source \\ target".ljust(width + 8) + "".join(m.rjust(cell) for m in self.models))
        for source in self.models:
            cells = []
            for target in self.models:
                value = self.iia.get(source, {}).get(target)
                if value is None:
                    cells.append("-".rjust(cell))
                    continue
                floor = self.floor.get(source, {}).get(target) if self.floor else None
                cells.append((f"{value:.3f}" + (f" ({floor:.3f})" if floor is not None else "")).rjust(cell))
            lines.append(source.ljust(width + 8) + "".join(cells))
        if self.ceiling:
            lines.append("ceiling (task accuracy)".ljust(width + 8) + "".join(f"{self.ceiling.get(m, float('nan')):.3f}".rjust(cell) for m in self.models))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str | Path | None = None, ax: Any = None) -> Any:
        """Heatmap of ``iia[source][target]`` annotated with the floor, each target's ceiling
        on its axis label; saves to ``path`` if given. Returns the matplotlib ``Figure``
        (shown inline by Jupyter). Draws on ``ax`` when given; otherwise makes its own
        figure without pyplot, so matplotlib's backend and pyplot's state are untouched."""
        from matplotlib.figure import Figure

        matrix = [[self.iia.get(s, {}).get(t, float("nan")) for t in self.models] for s in self.models]
        if ax is None:
            ax = Figure(figsize=(1.6 * len(self.models) + 2.5, 1.4 * len(self.models) + 1.5)).subplots()
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for i, s in enumerate(self.models):
            for j, t in enumerate(self.models):
                text = f"{matrix[i][j]:.2f}"
                if self.floor and t in self.floor.get(s, {}):
                    text += f"\nfloor {self.floor[s][t]:.2f}"
                ax.text(j, i, text, ha="center", va="center", color="white" if matrix[i][j] < 0.6 else "black", fontsize=9)
        labels_t = [f"{t}\n(ceiling {self.ceiling[t]:.2f})" if self.ceiling and t in self.ceiling else t for t in self.models]
        ax.set_xticks(range(len(self.models)), labels_t)
        ax.set_yticks(range(len(self.models)), self.models)
        ax.set_xlabel("target")
        ax.set_ylabel("source")
        ax.set_title(f"IIA on {self.variable!r}, k = {sum(self.subspace_dim.values())}")
        ax.figure.colorbar(image, ax=ax, fraction=0.046)
        if path is not None:
            ax.figure.tight_layout()
            ax.figure.savefig(path, dpi=120)
        return ax.figure

    def _repr_html_(self) -> str:
        """The IIA matrix as a coloured HTML table (Jupyter), floor in brackets, ceilings below."""
        from html import escape

        def cell(value: float | None, floor: float | None) -> str:
            if value is None:
                return "<td>-</td>"
            shade = int(255 - 155 * max(0.0, min(1.0, value)))
            text = f"{value:.3f}" + (f" <small>({floor:.3f})</small>" if floor is not None else "")
            return f'<td style="background: rgb({shade}, {shade}, 255); text-align: right">{text}</td>'

        header = "".join(f"<th>{escape(t)}</th>" for t in self.models)
        rows = []
        for s in self.models:
            cells = "".join(
                cell(self.iia.get(s, {}).get(t), self.floor.get(s, {}).get(t) if self.floor else None) for t in self.models
            )
            rows.append(f"<tr><th>{escape(s)}</th>{cells}</tr>")
        if self.ceiling:
            ceilings = "".join(f'<td style="text-align: right">{self.ceiling.get(t, float("nan")):.3f}</td>' for t in self.models)
            rows.append(f"<tr><th>ceiling (task accuracy)</th>{ceilings}</tr>")
        caption = (
            f"IIA on {escape(repr(self.variable))} (trial accuracy; floor = untrained alignment in brackets), "
            f"{self.n_pairs} pairs, k = {escape(str(self.subspace_dim))}, sites {escape(str(self.sites))}"
        )
        return f"<table><caption>{caption}</caption><tr><th>source \\ target</th>{header}</tr>{''.join(rows)}</table>"


def _matrix(scores: Mapping[Direction, DirectionScores], models: Sequence[str], attr: str) -> Matrix:
    return to_matrix({direction: getattr(value, attr) for direction, value in scores.items()}, models)


@_in_eval_mode
def evaluate(
    alignment: ModelAlignment,
    test: CounterfactualData,
    ceiling_data: LabelledSequences | Mapping[str, LabelledSequences] | None = None,
    floor: bool = True,
    directions: Sequence[Direction] | None = None,
    batch_size: int = 256,
    prefix_cache: bool = True,
    memo: ActivationMemo | None = None,
) -> IIAReport:
    """IIA of every direction on held-out ``test`` pairs, with floor and ceiling.

    ``ceiling_data``: task data (shared, or one per model) for each target's own
    task accuracy; omit it to leave the ceiling out. The sources' activations and
    (with ``prefix_cache``, as in :func:`masalign.fit`) the targets' base runs up
    to their sites are read once for the trained alignment and its floor; pass a
    ``memo`` (:class:`masalign.memo.ActivationMemo`) to share them with fits and
    other evaluations on the same pairs. Without the floor and without a memo the
    base runs are not cached: they would be used once, and reading them costs about
    what running them whole does.
    """
    directions = check_directions(alignment, directions)
    check_views(test)
    alignment.block(variable_of(test))  # a variable the alignment lacks: said before any model runs
    if ceiling_data is not None:  # before minutes of IIA and floor, not after
        _check_ceiling_data(ceiling_data, alignment.model_names)
    # A prefix costs about one run of its rows to read: it pays when read for the alignment and
    # its floor, or kept in a caller's memo for later fits; a single use of it would not.
    prefix_cache = prefix_cache and (floor or memo is not None)
    memo = ActivationMemo() if memo is None else memo
    test_data = {variable_of(test): test}
    sources = sorted({s for s, _ in directions})
    targets = sorted({t for _, t in directions}) if prefix_cache else []
    source_cache = {
        s: alignment.source_activations(s, view_for(test, s).source_inputs, view_for(test, s).source_positions, memo=memo)
        for s in sources
    }
    prefixes = dataset_prefixes(alignment, test_data, targets, memo)[variable_of(test)]
    scores = interchange_scores(alignment, test, directions, source_cache, batch_size, prefixes)
    models = alignment.model_names
    report = IIAReport(
        models=models,
        sites=dict(alignment.sites),
        subspace_dim=dict(alignment.subspace_dim),
        variable=variable_of(test),
        n_pairs=check_views(test),
        iia=_matrix(scores, models, "trial_accuracy"),
        iia_token=_matrix(scores, models, "token_accuracy"),
    )
    if floor:
        floor_scores = interchange_scores(untrained_copy(alignment), test, directions, source_cache, batch_size, prefixes)
        report.floor = _matrix(floor_scores, models, "trial_accuracy")
        report.floor_token = _matrix(floor_scores, models, "token_accuracy")
    if ceiling_data is not None:
        report.ceiling, report.ceiling_token = {}, {}
        for name in models:
            data = ceiling_data if isinstance(ceiling_data, LabelledSequences) else ceiling_data[name]
            report.ceiling[name], report.ceiling_token[name] = task_accuracy(alignment.models[name], data, batch_size)
    return report
