"""Training the alignment functions (METHOD.md section 4).

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
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .adapters.base import check_finite
from .data import CounterfactualData, check_views, index_inputs, inputs_to, variable_of, view_for
from .evaluate import Direction, check_directions, direction_name, interchange_scores, intervention_loss
from .latents import LatentTargets, cl_loss, natural_latents, range_excess, symmetric_kl_histogram
from .mas import ModelAlignment


@dataclass
class FitResult:
    """What happened in :func:`fit`. The alignment holds the best state at the end."""

    steps: int
    best_step: int
    stop_reason: str  # "target_accuracy", "patience", "max_steps" or "interrupted"
    best_valid_loss: float
    best_valid_accuracy: dict[str, float]
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    latent_diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)
    latent_pairs_masked: int = 0

    def summary(self) -> dict[str, Any]:
        summary = asdict(self)
        summary.pop("history")
        return summary


@dataclass
class LatentObjective:
    """The counterfactual latent (CL) auxiliary loss (METHOD.md section 5).

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
            :func:`masalign.latents.counterfactual_latent_index`, one per train pair.
        pool_inputs: the sequences ``targets`` index (a mapping model -> inputs when
            the models tokenise differently).
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
    """Models in eval mode with gradients off for their parameters; restored afterwards."""
    saved = []
    for adapter in alignment.models.values():
        model = adapter.model
        saved.append((model, model.training, [(p, p.requires_grad) for p in model.parameters()]))
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    try:
        yield
    finally:
        for model, training, flags in saved:
            model.train(training)
            for p, flag in flags:
                p.requires_grad_(flag)


def _as_list(data: CounterfactualData | Sequence[CounterfactualData]) -> list[CounterfactualData]:
    if isinstance(data, (list, tuple)):
        return list(data)
    return [data]  # type: ignore[list-item]


def _by_variable(alignment: ModelAlignment, data: CounterfactualData | Sequence[CounterfactualData], what: str) -> dict[str, CounterfactualData]:
    by_variable: dict[str, CounterfactualData] = {}
    for item in _as_list(data):
        check_views(item)
        variable = variable_of(item)
        if variable not in alignment.blocks:
            raise ValueError(f"{what} pairs are for variable {variable!r}, but the alignment has variables {list(alignment.blocks)}")
        if variable in by_variable:
            raise ValueError(f"{what} has two datasets for variable {variable!r}")
        by_variable[variable] = item
    return by_variable


def _check_vocabulary(alignment: ModelAlignment, data: dict[str, CounterfactualData], directions: list[Direction]) -> None:
    """Run each target once on one base input to learn its vocabulary size."""
    for target in {t for _, t in directions}:
        for item in data.values():
            view = view_for(item, target)
            with torch.no_grad():
                logits = alignment.models[target].logits(inputs_to(index_inputs(view.base_inputs, torch.arange(1)), alignment.device))
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
        values = alignment.alignments[source].coordinates(self.source_hidden[source][index], self.block)
        return alignment.alignments[target].substitute(self.base_hidden[target][index], self.block, values, self.keep_complement)


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
    device = alignment.device
    source_hidden: dict[str, Tensor] = {}
    base_hidden: dict[str, Tensor] = {}
    natural: dict[str, Tensor] = {}
    for source, target in directions:
        if source not in source_hidden:
            view = view_for(data, source)
            cached = source_cache.get(source)
            if cached is None:
                cached = alignment.source_activations(source, view.source_inputs, view.source_positions)
            source_hidden[source] = cached[:, 0].to(device)
        if target not in base_hidden:
            view = view_for(data, target)
            base_hidden[target] = alignment.source_activations(target, view.base_inputs, view.base_positions)[:, 0].to(device)
            pool = objective.pool_inputs[target] if isinstance(objective.pool_inputs, dict) else objective.pool_inputs
            natural[target] = natural_latents(alignment.models[target], alignment.sites[target], pool, objective.targets).to(device)
            check_finite(natural[target], f"counterfactual latents of model {target!r}")
    return _PreparedLatents(
        variable, directions, alignment.block(variable), source_hidden, base_hidden, natural,
        objective.targets.found.to(device), objective.weight, objective.kind, alignment.keep_complement,
    )


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
) -> FitResult:
    """Train ``alignment`` on counterfactual pairs; returns a :class:`FitResult`.

    Args:
        train, valid: pairs for one variable, or a list (one dataset per variable).
        directions: (source, target) pairs; default all ``n^2`` including (s, s).
        eval_every: validate every this many steps.
        patience, min_delta: stop when validation loss has not improved by
            ``min_delta`` for ``patience`` validations.
        target_accuracy: stop when every direction reaches this validation trial
            accuracy on every variable.
        standardize: first set each model's mean/std from its source activations.
        seed: batch order (the alignment's own seed sets its initialisation).
        latent_objective: an optional CL loss on its own directions
            (:class:`LatentObjective`); ``directions`` may then be only the
            behavioural ones, e.g. one-sided alignment: ``directions=[("B", "A"),
            ("A", "A")]`` with CL on ``[("A", "B"), ("B", "B")]``.

    The best state (highest mean validation trial accuracy, ties broken by lower
    loss) is restored at the end, also after Ctrl-C, which stops the fit cleanly.
    """
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        raise RuntimeError("fit needs gradients: call it outside torch.no_grad() / torch.inference_mode()")
    if steps < 1 or batch_size < 1 or eval_every < 1:
        raise ValueError(f"steps, batch_size and eval_every must be positive; got {steps}, {batch_size}, {eval_every}")
    directions = check_directions(alignment, directions)
    train_data = _by_variable(alignment, train, "train")
    valid_data = _by_variable(alignment, valid, "valid")
    if set(train_data) != set(valid_data):
        raise ValueError(f"train has variables {sorted(train_data)} but valid has {sorted(valid_data)}")
    if standardize:
        alignment.fit_standardization(next(iter(train_data.values())))
    device = alignment.device
    generator = torch.Generator().manual_seed(seed)
    start_time = time.perf_counter()

    with frozen_models(alignment):
        _check_vocabulary(alignment, train_data, directions)
        sources = sorted({s for s, _ in directions})
        train_cache = {
            v: {s: alignment.source_activations(s, view_for(d, s).source_inputs, view_for(d, s).source_positions) for s in sources}
            for v, d in train_data.items()
        }
        valid_cache = {
            v: {s: alignment.source_activations(s, view_for(d, s).source_inputs, view_for(d, s).source_positions) for s in sources}
            for v, d in valid_data.items()
        }
        latent = None
        if latent_objective is not None:
            latent_variable = next(iter(train_data))
            latent = _prepare_latents(alignment, latent_objective, train_data, train_cache[latent_variable])
        sizes = {v: check_views(d) for v, d in train_data.items()}
        orders = {v: torch.randperm(n, generator=generator) for v, n in sizes.items()}
        cursors = {v: 0 for v in sizes}

        optimizer = torch.optim.Adam([p for p in alignment.parameters() if p.requires_grad], lr=lr)
        best_state = copy.deepcopy(alignment.state_dict())
        best_key = (-math.inf, -math.inf)
        best = {"step": 0, "loss": math.inf, "accuracy": {}}
        loss_to_beat, stale = math.inf, 0
        history: list[dict[str, Any]] = []
        stop_reason, step = "max_steps", 0
        bar = tqdm(total=steps, disable=not progress, desc="MAS fit", leave=False)

        def validate(at_step: int) -> bool:
            """Record validation scores; True when training should stop."""
            nonlocal best_state, best_key, loss_to_beat, stale, stop_reason
            accuracies: dict[str, float] = {}
            losses = []
            for variable, item in valid_data.items():
                scores = interchange_scores(alignment, item, directions, source_cache=valid_cache[variable])
                for direction, score in scores.items():
                    key = direction_name(direction) + ("" if len(valid_data) == 1 else f" {variable}")
                    accuracies[key] = score.trial_accuracy
                    losses.append(score.loss)
            loss = sum(losses)
            mean_accuracy = sum(accuracies.values()) / len(accuracies)
            history.append({"step": at_step, "valid_loss": loss, "valid_accuracy": accuracies})
            bar.set_postfix(valid_loss=f"{loss:.3f}", valid_iia=f"{mean_accuracy:.3f}")
            if (mean_accuracy, -loss) > best_key:
                best_key = (mean_accuracy, -loss)
                best_state = copy.deepcopy(alignment.state_dict())
                best.update(step=at_step, loss=loss, accuracy=accuracies)
            if loss < loss_to_beat - min_delta:
                loss_to_beat, stale = loss, 0
            else:
                stale += 1
            if min(accuracies.values()) >= target_accuracy:
                stop_reason = "target_accuracy"
                return True
            if stale >= patience:
                stop_reason = "patience"
                return True
            return False

        try:
            validate(0)
            if stop_reason != "target_accuracy":
                for step in range(1, steps + 1):
                    optimizer.zero_grad(set_to_none=True)
                    step_loss = 0.0
                    for variable, item in train_data.items():
                        n = sizes[variable]
                        if cursors[variable] + batch_size > n:
                            orders[variable] = torch.randperm(n, generator=generator)
                            cursors[variable] = 0
                        index = orders[variable][cursors[variable] : cursors[variable] + batch_size]
                        cursors[variable] += batch_size
                        for source, target in directions:
                            view = view_for(item, target)
                            logits = alignment.intervened_logits(
                                source,
                                target,
                                train_cache[variable][source][index].to(device),
                                inputs_to(index_inputs(view.base_inputs, index), device),
                                view.base_positions[index].to(device),
                                variable,
                            )
                            loss = intervention_loss(logits, view.labels[index].to(device))
                            # One backward per direction frees its graph at once; the
                            # gradients add up exactly as for the summed loss.
                            loss.backward()
                            step_loss += loss.item()
                        if latent is not None and variable == latent.variable:
                            for source, target in latent.directions:
                                intervened = latent.intervened(alignment, source, target, index)
                                mask = latent.found[index]
                                loss = latent.weight * cl_loss(intervened, latent.natural[target][index], latent.kind, mask)
                                loss.backward()
                                step_loss += loss.item()
                    optimizer.step()
                    bar.update(1)
                    bar.set_description(f"MAS fit (loss {step_loss:.3f})")
                    if step % eval_every == 0 or step == steps:
                        if validate(step):
                            break
        except KeyboardInterrupt:
            stop_reason = "interrupted"
        finally:
            bar.close()
            alignment.load_state_dict(best_state)

    diagnostics: dict[str, dict[str, float]] = {}
    if latent is not None:
        with torch.no_grad():
            sample = torch.arange(min(2048, len(latent.found)))
            for source, target in latent.directions:
                mask = latent.found[sample]
                intervened = latent.intervened(alignment, source, target, sample)[mask]
                natural = latent.natural[target][sample][mask]
                excess = range_excess(intervened, natural)
                diagnostics[direction_name((source, target))] = {
                    "cl_loss": float(cl_loss(intervened, natural, latent.kind)),
                    "symmetric_kl": symmetric_kl_histogram(intervened, natural),
                    "range_excess_max": excess.max,
                    "range_excess_mean": excess.mean,
                }
    return FitResult(
        steps=step,
        best_step=best["step"],
        stop_reason=stop_reason,
        best_valid_loss=best["loss"],
        best_valid_accuracy=best["accuracy"],
        seconds=time.perf_counter() - start_time,
        history=history,
        latent_diagnostics=diagnostics,
        latent_pairs_masked=0 if latent is None else int((~latent.found).sum()),
    )
