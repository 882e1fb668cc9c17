"""Training the alignment functions (docs/method.md section 4).

The models stay frozen; only the alignment parameters learn. Each step, for each
variable and each (source, target) direction, the target runs on a batch of base
inputs with the interchange at the base positions, and the cross-entropy against
the counterfactual labels is added up; one Adam step follows. Source activations
are computed once, without gradient, and reused.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed
from .adapters.base import check_finite, run_context
from .data import CounterfactualData, CounterfactualPairs, check_views, index_inputs, inputs_to, variable_of, view_for
from .evaluate import interchange_scores
from .latents import LatentTargets, cl_loss, natural_latents, range_excess, symmetric_kl_histogram
from .logit_rows import label_slots
from .mas import ModelAlignment
from .memo import ActivationMemo
from .objectives import Direction, Matrix, check_directions, to_matrix
from .prefix import dataset_prefixes, prefix_rows
from .rowcache import RowCache


@dataclass
class FitResult:
    """What happened in :func:`fit`. The alignment holds the best state at the end."""

    steps: int
    best_step: int
    stop_reason: str  # "target_accuracy", "patience", "max_steps" or "interrupted"
    best_valid_loss: float
    best_valid_accuracy: dict[str, Matrix]  # variable -> {source: {target: trial accuracy}}
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    latent_diagnostics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # source -> target -> name -> value
    latent_pairs_masked: int = 0

    def summary(self) -> dict[str, Any]:
        """Everything but the history, JSON-serialisable."""
        summary = asdict(self)
        summary.pop("history")
        return summary

    def __str__(self) -> str:
        lines = [
            f"fit: {self.steps} steps in {self.seconds:.1f}s, stopped by {self.stop_reason}; "
            f"best at step {self.best_step} (validation loss {self.best_valid_loss:.4f})"
        ]
        for variable, matrix in self.best_valid_accuracy.items():
            cells = ", ".join(f"{s}->{t} {v:.3f}" for s, row in matrix.items() for t, v in row.items())
            lines.append(f"  validation IIA on {variable!r}: {cells}")
        if self.latent_pairs_masked:
            lines.append(f"  CL loss: {self.latent_pairs_masked} pairs without a counterfactual latent were masked out")
        return "\n".join(lines)


@dataclass
class LatentObjective:
    """The counterfactual latent (CL) auxiliary loss (docs/method.md section 5).

    For each direction (source, target) in ``directions`` the intervened activation
    ``h~_t`` (the target's base activation with the source's aligned coordinates
    written in) is pulled towards the counterfactual latent ``c``: the target's own
    natural activation at ``targets.pool_row`` / ``pool_position`` of
    ``pool_inputs``. Only activations are needed, so a target that cannot be run
    with an intervention (only recorded) can still be aligned. Pairs without a
    latent (``targets.found`` false) are masked out. Added to the behavioural loss
    with ``weight`` (the reference's epsilon). One slot per pair.

    Attributes:
        directions: (source, target) pairs, independent of the behavioural ones.
        targets: from :func:`masalign.latents.find_counterfactual_latents` or
            :meth:`masalign.tasks.NumericTask.latent_targets`, one per train pair.
        pool_inputs: the sequences ``targets`` index: inputs shared by the models (a
            tensor, or a mapping such as ``{"input_ids", "attention_mask"}``), or a
            mapping from every model's name to its own inputs, whose rows and positions
            correspond (``targets`` index each the same way).
        weight: epsilon, 0.85 in the reference's cl_mas config.
        kind: "mse", "cosine" or "mse_cosine" (their average, the default).
    """

    directions: Sequence[Direction]
    targets: LatentTargets
    pool_inputs: Any
    weight: float = 0.85
    kind: str = "mse_cosine"


@contextlib.contextmanager
def frozen_models(alignment: ModelAlignment) -> Iterator[None]:
    """Models in eval mode with gradients off for their parameters, inside their adapters'
    ``run_context`` (:func:`masalign.adapters.base.run_context`); restored afterwards.

    Only flags that were changed are written back, so parameters whose flag cannot
    be set (inference tensors, which never require grad) are left alone, and one
    model's failure to restore cannot leave another model changed.
    """
    saved = []
    models = {id(adapter.model): adapter.model for adapter in alignment.models.values()}  # one model may serve two names
    try:
        for model in models.values():
            # Each module's own mode (a user may keep some in eval mode); inference tensors can be
            # switched off but never back on: leave them as they are.
            modes = [(module, module.training) for module in model.modules()]
            saved.append((modes, [p for p in model.parameters() if p.requires_grad and not p.is_inference()]))
            model.eval()
            for p in saved[-1][1]:
                p.requires_grad_(False)
        with contextlib.ExitStack() as stack:
            for adapter in alignment.models.values():
                stack.enter_context(run_context(adapter))  # e.g. an unembedding laid out for faster runs
            yield
    finally:
        for modes, trainable in saved:
            for module, training in modes:
                module.training = training
            for p in trainable:
                p.requires_grad_(True)


def _as_list(data: CounterfactualData | Sequence[CounterfactualData], what: str) -> list[CounterfactualData]:
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if not items:
        raise ValueError(f"{what} is an empty list; pass CounterfactualPairs (or a list of them, one per variable)")
    for item in items:
        is_views = isinstance(item, dict) and item and all(isinstance(v, CounterfactualPairs) for v in item.values())
        if not isinstance(item, CounterfactualPairs) and not is_views:
            raise TypeError(
                f"{what} must be CounterfactualPairs, a {{model_name: CounterfactualPairs}} mapping, or a list of "
                f"those (one per variable); got {type(item).__name__}"
            )
    return items


def _by_variable(alignment: ModelAlignment, data: CounterfactualData | Sequence[CounterfactualData], what: str) -> dict[str, CounterfactualData]:
    by_variable: dict[str, CounterfactualData] = {}
    for item in _as_list(data, what):
        check_views(item)
        if not isinstance(item, CounterfactualPairs):
            missing = set(alignment.models) - set(item)
            if missing:
                raise ValueError(
                    f"{what} has per-model views for {sorted(item)} but not for model(s) {sorted(missing)}; "
                    "give a view for every model of the alignment"
                )
        variable = variable_of(item)
        if variable not in alignment.blocks:
            raise ValueError(f"{what} pairs are for variable {variable!r}, but the alignment has variables {list(alignment.blocks)}")
        if variable in by_variable:
            raise ValueError(f"{what} has two datasets for variable {variable!r}")
        by_variable[variable] = item
    return by_variable


def _check_inputs(alignment: ModelAlignment, data: dict[str, CounterfactualData], what: str) -> None:
    """Every row of every model's view through its adapter's ``check_inputs``, if it has one, before any run.

    The adapters know what their model accepts (vocabulary, context, masks); on the
    whole dataset their errors name the dataset's row, not a batch's.
    """
    for name, adapter in alignment.models.items():
        check = getattr(adapter, "check_inputs", None)
        if check is None:
            continue
        for item in data.values():
            view = view_for(item, name)
            for side in ("base", "source"):
                try:
                    check(getattr(view, f"{side}_inputs"), getattr(view, f"{side}_positions"))
                except (ValueError, IndexError, TypeError) as error:
                    raise type(error)(f"{what} pairs of {view.variable!r}, {side}_inputs / {side}_positions for model {name!r}: {error}") from error


def _check_vocabulary(alignment: ModelAlignment, data: dict[str, CounterfactualData], directions: list[Direction]) -> None:
    """Run each target once on one base input to learn its vocabulary size."""
    for target in {t for _, t in directions}:
        for item in data.values():
            view = view_for(item, target)
            with torch.no_grad():
                logits = alignment.models[target].logits(inputs_to(index_inputs(view.base_inputs, torch.arange(1)), alignment.input_device(target)))
            view.check_vocabulary(logits.shape[-1], f"model {target!r}")
            if logits.shape[1] != view.labels.shape[1]:
                raise ValueError(
                    f"model {target!r} gives logits for {logits.shape[1]} positions but the labels of variable "
                    f"{view.variable!r} have {view.labels.shape[1]}: labels need one entry per base input position"
                )


@dataclass
class _PreparedLatents:
    """Everything the CL loss needs, computed once: activations only, no model runs per step."""

    variable: str
    directions: list[Direction]
    block: slice
    source_hidden: dict[str, Tensor]  # model -> (N, width) at the source positions
    base_hidden: dict[str, Tensor]  # model -> (N, width) at the base positions
    natural: dict[str, Tensor]  # model -> (N, width) counterfactual latents
    found: Tensor
    weight: float
    kind: str
    keep_complement: bool

    def intervened(self, alignment: ModelAlignment, source: str, target: str, index: Tensor) -> Tensor:
        # Each model's tensors are kept on its map's device; coordinates cross over.
        values = alignment.alignments[source].coordinates(self.source_hidden[source][index], self.block)
        target_map = alignment.alignments[target]
        return target_map.substitute(self.base_hidden[target][index], self.block, values.to(target_map.device), self.keep_complement)


def _prepare_latents(
    alignment: ModelAlignment,
    objective: LatentObjective,
    train_data: dict[str, CounterfactualData],
    source_cache: dict[str, Tensor],
) -> _PreparedLatents:
    """``source_cache``: the behavioural sources' activations, already read by ``fit``."""
    if len(train_data) != 1:
        raise ValueError("the CL loss supports one variable per fit; pass the train pairs of that variable alone")
    variable, data = next(iter(train_data.items()))
    directions = check_directions(alignment, objective.directions)
    n = check_views(data)
    if len(objective.targets) != n:
        raise ValueError(f"latent targets cover {len(objective.targets)} pairs but the train data has {n}; find them for the train pairs")
    if objective.weight < 0:
        raise ValueError(f"the CL weight must be >= 0, got {objective.weight}")
    if any(view_for(data, m).base_positions.shape[1] != 1 for d in directions for m in d):
        raise ValueError("the CL loss supports one intervention slot per pair")
    n_found = int(objective.targets.found.sum())
    if n_found < 2:
        raise ValueError(
            f"the CL loss needs counterfactual latents for at least 2 train pairs, but {n_found} of {n} have one: "
            "give find_counterfactual_latents a larger pool of inputs (one whose examples take the pairs' "
            "counterfactual values)"
        )
    _check_latent_pool(objective, sorted({target for _, target in directions}), alignment.model_names)
    source_hidden: dict[str, Tensor] = {}
    base_hidden: dict[str, Tensor] = {}
    natural: dict[str, Tensor] = {}
    for source, target in directions:
        if source not in source_hidden:
            view = view_for(data, source)
            cached = source_cache.get(source)
            if cached is None:
                cached = alignment.source_activations(source, view.source_inputs, view.source_positions)
            source_hidden[source] = cached[:, 0].to(alignment.alignments[source].device)
        if target not in base_hidden:
            view, device = view_for(data, target), alignment.alignments[target].device
            base_hidden[target] = alignment.source_activations(target, view.base_inputs, view.base_positions)[:, 0].to(device)
            pool = _pool_of(objective.pool_inputs, target, alignment.model_names)
            natural[target] = natural_latents(alignment.models[target], alignment.sites[target], pool, objective.targets).to(device)
            check_finite(natural[target], f"counterfactual latents of model {target!r}")
    return _PreparedLatents(
        variable, directions, alignment.block(variable), source_hidden, base_hidden, natural,
        objective.targets.found, objective.weight, objective.kind, alignment.keep_complement,
    )


def _check_latent_pool(objective: LatentObjective, targets: Sequence[str], model_names: Sequence[str]) -> None:
    """The targets' rows index the pool they were found in: a pool of the same size but other
    sequences would read other sequences' activations as the latents, without any error."""
    from .latents import token_fingerprint

    recorded = objective.targets.pool_tokens
    if recorded is None:
        return
    pools = [_pool_of(objective.pool_inputs, target, model_names) for target in targets]
    if not any(token_fingerprint(pool) == recorded for pool in pools):
        raise ValueError(
            "the CL targets were found in another pool than LatentObjective.pool_inputs (its token ids differ): pass "
            "the inputs given to find_counterfactual_latents, or to latent_targets (by default the pairs' "
            "source_inputs)"
        )


def _pool_of(pool_inputs: Any, model: str, model_names: Sequence[str]) -> Any:
    """``model``'s latent pool: its own entry when ``pool_inputs`` maps every model's name to inputs,
    else the shared inputs (a mapping of input names such as ``input_ids`` included)."""
    if isinstance(pool_inputs, Mapping) and set(model_names) <= set(pool_inputs):
        return pool_inputs[model]
    if isinstance(pool_inputs, Mapping) and set(pool_inputs) & set(model_names):
        missing = sorted(set(model_names) - set(pool_inputs))
        raise ValueError(f"pool_inputs names some models but not {missing}: give every model its inputs, or one shared input")
    return pool_inputs


def _check_fit_options(
    steps: int, batch_size: int, eval_every: int, patience: int, lr: float, min_delta: float, target_accuracy: float
) -> None:
    """Refuse settings that would train nothing or train silently wrong, saying which and why."""
    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every), ("patience", patience)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite positive number (the reference uses 1e-3), got {lr!r}")
    if not isinstance(min_delta, numbers.Real) or not math.isfinite(min_delta) or min_delta < 0:
        raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
    if not isinstance(target_accuracy, numbers.Real) or not target_accuracy > 0:
        raise ValueError(
            f"target_accuracy must be a number > 0 (the reference uses 0.995; above 1 never stops early), got {target_accuracy!r}"
        )


class _BatchSampler:
    """Shuffled row indices, ``batch_size`` at a time, for each variable's pairs.

    Each variable walks its own permutation and reshuffles when fewer than a full
    batch remains, so every batch has the same size; the seed fixes the order.
    """

    def __init__(self, sizes: dict[str, int], batch_size: int, seed: int) -> None:
        self.sizes, self.batch_size = sizes, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.orders = {v: torch.randperm(n, generator=self.generator) for v, n in sizes.items()}
        self.cursors = {v: 0 for v in sizes}

    def next(self) -> dict[str, Tensor]:
        batch = {}
        for variable, n in self.sizes.items():
            if self.cursors[variable] + self.batch_size > n:
                self.orders[variable] = torch.randperm(n, generator=self.generator)
                self.cursors[variable] = 0
            start = self.cursors[variable]
            batch[variable] = self.orders[variable][start : start + self.batch_size]
            self.cursors[variable] += self.batch_size
        return batch

    def upcoming(self, variable: str) -> Tensor:
        """The rows the next batches of ``variable`` take, in order, up to the next reshuffle,
        as this process will be asked for them (its share of each batch under torchrun)."""
        rows = self.orders[variable][self.cursors[variable] :]
        rows = rows[: len(rows) - len(rows) % self.batch_size]  # a partial batch is reshuffled away
        return torch.cat([distributed.shard(batch) for batch in rows.split(self.batch_size)]) if len(rows) else rows


def _read_ahead(caches: Sequence[dict[str, dict[str, RowCache]]], sampler: _BatchSampler, ended: bool = False) -> None:
    """Tell each training cache that still has rows to read which rows the next batches take
    (:meth:`RowCache.read_ahead`); once the fit has ended (``ended``), that none will: a cache
    shared through a memo then reads only what it is asked for. Complete caches (every step after
    the first epoch) cost nothing here."""
    for variable in sampler.sizes:
        reading = [rows for by_model in caches for rows in by_model.get(variable, {}).values() if not rows.complete]
        if reading:
            upcoming = torch.empty(0, dtype=torch.long) if ended else sampler.upcoming(variable)
            for rows in reading:
                rows.read_ahead(upcoming)


def _source_cache(
    alignment: ModelAlignment, data: dict[str, CounterfactualData], sources: Sequence[str], memo: ActivationMemo | None = None
) -> dict[str, dict[str, RowCache]]:
    """variable -> source model -> its activations at the source positions, each row read without
    gradient when a step first needs it (:class:`masalign.rowcache.RowCache`)."""
    return {
        variable: {
            s: alignment.source_rows(s, view_for(d, s).source_inputs, view_for(d, s).source_positions, memo=memo)
            for s in sources
        }
        for variable, d in data.items()
    }


def _non_finite_loss(step: int, what: str) -> FloatingPointError:
    return FloatingPointError(
        f"the {what} became NaN or infinite at step {step}: check that the models' logits are finite on these inputs "
        "(model.logits(...)) and lower lr; the alignment was reset to its best state so far"
    )


def _training_step(
    alignment: ModelAlignment,
    optimizer: torch.optim.Optimizer,
    train_data: dict[str, CounterfactualData],
    train_cache: dict[str, dict[str, RowCache]],
    directions: list[Direction],
    batch: dict[str, Tensor],
    latent: _PreparedLatents | None,
    step: int,
    train_prefix: dict[str, dict[str, Tensor]],
) -> float:
    """One optimiser step on the summed loss over variables and directions; returns that loss."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for variable, item in train_data.items():
        index = distributed.shard(batch[variable])  # this process's rows (all of them without torchrun)
        losses = []
        for source, target in directions:
            if len(index) == 0:  # more processes than rows in the batch: this one only joins the sums
                break
            view = view_for(item, target)
            logit_positions, labels = label_slots(view.labels[index])
            device = alignment.input_device(target)
            logits = alignment.intervened_logits(
                source,
                target,
                train_cache[variable][source][index],  # moved to the source's map by intervened_logits
                inputs_to(index_inputs(view.base_inputs, index), device),
                view.base_positions[index].to(device),
                variable,
                prefix_rows(train_prefix[variable], target, index, device),
                logit_positions.to(device),
            )
            losses.append(distributed.loss_share(logits, labels.to(logits.device), view.labels[batch[variable]]))
            # One backward per direction frees its graph at once; the gradients
            # add up exactly as for the summed loss. torch.autograd.backward, not
            # Tensor.backward: nnsight patches the latter with a tracing check that
            # costs about 0.5 ms a call.
            torch.autograd.backward(losses[-1])
        if latent is not None and variable == latent.variable:
            for source, target in latent.directions:
                intervened = latent.intervened(alignment, source, target, index)
                losses.append(latent.weight * cl_loss(intervened, latent.natural[target][index], latent.kind, latent.found[index]))
                torch.autograd.backward(losses[-1])
        step_loss = sum(float(loss.detach()) for loss in losses)
        [step_loss] = distributed.all_reduce_sum([step_loss])  # every process raises, or none
        if not math.isfinite(step_loss):
            raise _non_finite_loss(step, f"training loss of variable {variable!r}")
        total += step_loss
    distributed.all_reduce_gradients(alignment.parameters())  # the shares' gradients add up to the batch's
    optimizer.step()
    return total


def _validate(
    alignment: ModelAlignment,
    valid_data: dict[str, CounterfactualData],
    valid_cache: dict[str, dict[str, RowCache]],
    directions: list[Direction],
    step: int,
    valid_prefix: dict[str, dict[str, Tensor]],
) -> tuple[float, dict[str, Matrix]]:
    """Summed validation loss, and trial accuracy per variable and direction."""
    loss, accuracy = 0.0, {}
    for variable, item in valid_data.items():
        scores = interchange_scores(
            alignment, item, directions, source_cache=valid_cache[variable], prefix_cache=valid_prefix[variable], shard=True
        )
        accuracy[variable] = to_matrix({d: score.trial_accuracy for d, score in scores.items()}, alignment.model_names)
        loss += sum(score.loss for score in scores.values())
    if not math.isfinite(loss):
        raise _non_finite_loss(step, "validation loss")
    return loss, accuracy


class _EarlyStopping:
    """Keeps the best state (highest mean validation trial accuracy, ties by lower loss)
    and says when to stop: every direction at ``target_accuracy``, or no loss
    improvement of ``min_delta`` for ``patience`` validations."""

    def __init__(self, alignment: ModelAlignment, patience: int, min_delta: float, target_accuracy: float) -> None:
        self.alignment = alignment
        self.patience, self.min_delta, self.target_accuracy = patience, min_delta, target_accuracy
        self.best_state = copy.deepcopy(alignment.state_dict())
        self.best_key = (-math.inf, -math.inf)
        self.best_step, self.best_loss = 0, math.inf
        self.best_accuracy: dict[str, Matrix] = {}
        self.loss_to_beat, self.stale = math.inf, 0

    def update(self, step: int, loss: float, accuracy: dict[str, Matrix]) -> str | None:
        """Record one validation; returns the stop reason, or ``None`` to go on."""
        values = [v for matrix in accuracy.values() for row in matrix.values() for v in row.values()]
        key = (sum(values) / len(values), -loss)
        if key > self.best_key:
            # The copy first: an interrupt during it leaves the previous best and its step together.
            self.best_state = copy.deepcopy(self.alignment.state_dict())
            self.best_key, self.best_step, self.best_loss, self.best_accuracy = key, step, loss, accuracy
        if loss < self.loss_to_beat - self.min_delta:
            self.loss_to_beat, self.stale = loss, 0
        else:
            self.stale += 1
        if min(values) >= self.target_accuracy:
            return "target_accuracy"
        if self.stale >= self.patience:
            return "patience"
        return None

    def restore_best(self) -> None:
        self.alignment.load_state_dict(self.best_state)


@torch.no_grad()
def _latent_diagnostics(alignment: ModelAlignment, latent: _PreparedLatents) -> dict[str, dict[str, dict[str, float]]]:
    """CL loss and off-manifold diagnostics (docs/method.md section 5) per CL direction, on up to 2048 pairs."""
    diagnostics: dict[str, dict[str, dict[str, float]]] = {}
    sample = latent.found.nonzero().flatten()[:2048]  # pairs with a latent (at least 2: _prepare_latents)
    for source, target in latent.directions:
        intervened = latent.intervened(alignment, source, target, sample)
        natural = latent.natural[target][sample.to(latent.natural[target].device)]
        excess = range_excess(intervened, natural)
        diagnostics.setdefault(source, {})[target] = {
            "cl_loss": float(cl_loss(intervened, natural, latent.kind)),
            "symmetric_kl": symmetric_kl_histogram(intervened, natural),
            "range_excess_max": excess.max,
            "range_excess_mean": excess.mean,
        }
    return diagnostics


def _progress_bar(total: int, enabled: bool) -> tqdm:
    # Outside a terminal (a log file, CI, a notebook without ipywidgets, where tqdm.auto
    # falls back to text) every refresh is a new line: refresh rarely there.
    interactive = sys.stderr.isatty()
    return tqdm(total=total, disable=not enabled, desc="MAS fit", leave=False, mininterval=0.1 if interactive else 10.0)


def fit(
    alignment: ModelAlignment,
    train: CounterfactualData | Sequence[CounterfactualData],
    valid: CounterfactualData | Sequence[CounterfactualData],
    directions: Sequence[Direction] | None = None,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    eval_every: int = 50,
    patience: int = 10,
    min_delta: float = 1e-3,
    target_accuracy: float = 0.995,
    standardize: bool = False,
    seed: int = 0,
    progress: bool = True,
    latent_objective: LatentObjective | None = None,
    prefix_cache: bool = True,
    memo: ActivationMemo | None = None,
) -> FitResult:
    """Train ``alignment`` on counterfactual pairs; returns a :class:`FitResult`.

    Args:
        train, valid: pairs for one variable, or a list (one dataset per variable).
        directions: (source, target) pairs; default all ``n^2`` including (s, s).
        eval_every: validate every this many steps.
        patience, min_delta: stop when validation loss has not improved by
            ``min_delta`` for ``patience`` validations.
        target_accuracy: stop when every direction reaches this validation trial
            accuracy on every variable (above 1: never stop for accuracy).
        standardize: first set each model's mean/std from its source activations
            (of the first variable's train pairs, when there are several).
        seed: batch order (the alignment's own seed sets its initialisation).
        latent_objective: an optional CL loss on its own directions
            (:class:`LatentObjective`); ``directions`` may then be only the
            behavioural ones, e.g. one-sided alignment: ``directions=[("B", "A"),
            ("A", "A")]`` with CL on ``[("A", "B"), ("B", "B")]``.
        prefix_cache: compute each target's base run up to its site once per
            dataset row and run only the blocks after the site in each step
            (:mod:`masalign.prefix`; same logits). Where the adapter supports it
            (TransformerLens and nnsight sites at a block's output); costs
            ``rows x seq x width`` floats per target on the CPU, e.g. 123 MB for
            2,000 pairs of 24 tokens at width 640, and is skipped beyond 2 GiB.
        memo: an :class:`masalign.memo.ActivationMemo` shared by several fits
            and evaluations on the same models and pairs (a layer sweep): the
            source activations and base prefixes at a (model, site) are read once.

    The best state (highest mean validation trial accuracy, ties broken by lower
    loss) is restored at the end, also after Ctrl-C, which stops the fit cleanly,
    and after an error. A loss that becomes NaN or infinite is an error.

    Under ``torchrun`` (an initialised ``torch.distributed`` process group) every
    process must call ``fit`` with the same arguments: each runs the models on its
    share of every batch and the gradients and validation counts are summed
    (:mod:`masalign.distributed`), giving one process's alignment; only rank 0
    shows progress. ``latent_objective`` is refused there.
    """
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        raise RuntimeError("fit needs gradients: call it outside torch.no_grad() / torch.inference_mode()")
    _check_fit_options(steps, batch_size, eval_every, patience, lr, min_delta, target_accuracy)
    directions = check_directions(alignment, directions)
    train_data = _by_variable(alignment, train, "train")
    valid_data = _by_variable(alignment, valid, "valid")
    if set(train_data) != set(valid_data):
        raise ValueError(f"train has variables {sorted(train_data)} but valid has {sorted(valid_data)}")
    _check_inputs(alignment, train_data, "train")
    _check_inputs(alignment, valid_data, "valid")
    if latent_objective is not None and distributed.world_size() > 1:
        raise NotImplementedError("the CL loss (latent_objective) is not supported in a distributed fit; run it in one process")
    # A model moved since its alignment was built (model.to("cuda")): its map follows it
    # now, before the optimiser holds the parameters.
    alignment.place_on_site_devices()
    if standardize:
        with frozen_models(alignment):  # eval mode: no dropout in the activations' statistics
            alignment.fit_standardization(next(iter(train_data.values())), memo=memo)
    distributed.broadcast_state(alignment.alignments)  # under torchrun: every process starts from rank 0's state
    start_time = time.perf_counter()

    with frozen_models(alignment):
        _check_vocabulary(alignment, train_data, directions)
        sources = sorted({s for s, _ in directions})
        train_cache = _source_cache(alignment, train_data, sources, memo)
        valid_cache = _source_cache(alignment, valid_data, sources, memo)
        targets = sorted({t for _, t in directions}) if prefix_cache else []
        train_prefix = dataset_prefixes(alignment, train_data, targets, memo)
        valid_prefix: dict[str, dict[str, Any]] | None = None  # set up by the first validation, on its clock
        latent = None
        if latent_objective is not None:
            latent_variable = next(iter(train_data))
            full = {source: rows.full() for source, rows in train_cache[latent_variable].items()}
            latent = _prepare_latents(alignment, latent_objective, train_data, full)
        sampler = _BatchSampler({v: check_views(d) for v, d in train_data.items()}, batch_size, seed)
        optimizer = torch.optim.Adam([p for p in alignment.parameters() if p.requires_grad], lr=lr)
        stopping = _EarlyStopping(alignment, patience, min_delta, target_accuracy)
        history: list[dict[str, Any]] = []
        validation_seconds = 0.0  # kept out of each entry's train_seconds
        stop_reason, step = "max_steps", 0
        bar = _progress_bar(steps, progress and distributed.is_main())

        def validate(at_step: int) -> str | None:
            nonlocal validation_seconds, valid_prefix
            started = time.perf_counter()
            if valid_prefix is None:
                valid_prefix = dataset_prefixes(alignment, valid_data, targets, memo)
            loss, accuracy = _validate(alignment, valid_data, valid_cache, directions, at_step, valid_prefix)
            validation_seconds += time.perf_counter() - started
            # seconds: since the fit began (set-up, training and validation);
            # train_seconds: the same without the validations, for time-to-accuracy curves.
            seconds = time.perf_counter() - start_time
            history.append(
                {
                    "step": at_step,
                    "valid_loss": loss,
                    "valid_accuracy": accuracy,
                    "seconds": seconds,
                    "train_seconds": seconds - validation_seconds,
                }
            )
            values = [v for matrix in accuracy.values() for row in matrix.values() for v in row.values()]
            # refresh=False: the bar redraws at its own pace (mininterval), not at every call.
            bar.set_postfix(valid_loss=f"{loss:.3f}", valid_iia=f"{sum(values) / len(values):.3f}", refresh=False)
            return stopping.update(at_step, loss, accuracy)

        try:
            reason = validate(0)
            while reason is None and step < steps:
                batch = sampler.next()
                _read_ahead((train_cache, train_prefix), sampler)
                step_loss = _training_step(
                    alignment, optimizer, train_data, train_cache, directions, batch, latent, step + 1, train_prefix
                )
                step += 1  # only once the step is done: an interrupt inside it reports the steps completed
                bar.update(1)
                bar.set_description(f"MAS fit (loss {step_loss:.3f})", refresh=False)
                if step % eval_every == 0 or step == steps:
                    reason = validate(step)
            stop_reason = reason or "max_steps"
        except KeyboardInterrupt:
            stop_reason = "interrupted"
        finally:
            bar.close()
            stopping.restore_best()
            _read_ahead((train_cache, train_prefix), sampler, ended=True)

    return FitResult(
        steps=step,
        best_step=stopping.best_step,
        stop_reason=stop_reason,
        best_valid_loss=stopping.best_loss,
        best_valid_accuracy=stopping.best_accuracy,
        seconds=time.perf_counter() - start_time,
        history=history,
        latent_diagnostics={} if latent is None else _latent_diagnostics(alignment, latent),
        latent_pairs_masked=0 if latent is None else int((~latent.found).sum()),
    )
