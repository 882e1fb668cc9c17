"""Correlational measures beside MAS, on the same activations (docs/method.md section 8).

:func:`paired_activations` reads two wrapped models at a site each on the same
inputs and positions (rows are paired samples); :func:`side_by_side` puts every
measure of :func:`masalign.similarity.compare_all` (and optionally DSA on the
models' trajectories) next to MAS IIA from an :class:`~masalign.evaluate.IIAReport`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .adapters import ModelAdapter
from .adapters.base import EMPTY_SLOT, check_finite
from .data import ModelInputs, batches, index_inputs, inputs_to
from .evaluate import IIAReport
from .similarity import DSA, compare_all


@torch.no_grad()
def paired_activations(
    model: ModelAdapter, site: str, inputs: ModelInputs, positions: Tensor, batch_size: int = 256
) -> Tensor:
    """``(N * n_slots, width)`` activations of ``model`` at ``site``: one row per (example, slot)."""
    parts = []
    if bool((torch.as_tensor(positions) == EMPTY_SLOT).any()):
        raise ValueError(f"paired activations need a position in every slot; empty slots ({EMPTY_SLOT}) would read as zeros")
    for index in batches(positions.shape[0], batch_size):
        hidden = model.activations(inputs_to(index_inputs(inputs, index), model.device), site, positions[index].to(model.device))
        parts.append(hidden.reshape(-1, hidden.shape[-1]).cpu())
    rows = torch.cat(parts)
    check_finite(rows, f"activations at {site!r}")
    return rows


@dataclass
class Comparison:
    """One pair of models: each correlational measure, and MAS IIA beside it."""

    models: tuple[str, str]
    sites: tuple[str, str]
    n_samples: int
    measures: dict[str, float]
    mas_iia: dict[str, float] = field(default_factory=dict)
    mas_floor: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """A flat dict, one table row; ``mas_cross_iia_mean`` only where the report had a cross direction."""
        cross = [v for k, v in self.mas_iia.items() if k in (f"{self.models[0]}->{self.models[1]}", f"{self.models[1]}->{self.models[0]}")]
        row = {"pair": f"{self.models[0]} vs {self.models[1]}", **self.measures, **{f"iia {k}": v for k, v in self.mas_iia.items()}}
        if cross:
            row["mas_cross_iia_mean"] = sum(cross) / len(cross)
        return row


def side_by_side(
    model_a: ModelAdapter,
    site_a: str,
    model_b: ModelAdapter,
    site_b: str,
    inputs: ModelInputs | tuple[ModelInputs, ModelInputs],
    positions: Tensor | tuple[Tensor, Tensor],
    iia: IIAReport | None = None,
    names: tuple[str, str] = ("A", "B"),
    dsa: DSA | None = None,
    trajectory_inputs: ModelInputs | tuple[ModelInputs, ModelInputs] | None = None,
    trajectory_positions: Tensor | tuple[Tensor, Tensor] | None = None,
) -> Comparison:
    """Correlational measures between two models' activations, beside MAS IIA.

    Args:
        model_a, site_a, model_b, site_b: the two wrapped models and their sites.
        inputs, positions: the samples (``(N, n_slots)`` positions); a tuple gives
            each model its own tokenisation, with corresponding rows.
        iia: a report of a MAS fit between these models (names as in ``names``);
            its IIA and floor for every direction between them go into the table.
        dsa: a configured :class:`~masalign.similarity.DSA`; when given, each
            model's trajectories at ``trajectory_positions`` (``(trials, time)``,
            e.g. every step of each sequence) are compared and the score added
            as ``"dsa_<score_method>"`` (a distance).
    """
    inputs_a, inputs_b = inputs if isinstance(inputs, tuple) else (inputs, inputs)
    positions_a, positions_b = positions if isinstance(positions, tuple) else (positions, positions)
    x = paired_activations(model_a, site_a, inputs_a, positions_a)
    y = paired_activations(model_b, site_b, inputs_b, positions_b)
    measures = compare_all(x.double(), y.double())
    if dsa is not None:
        if trajectory_inputs is None or trajectory_positions is None:
            raise ValueError("DSA needs trajectory_inputs and trajectory_positions ((trials, time) positions)")
        t_inputs_a, t_inputs_b = trajectory_inputs if isinstance(trajectory_inputs, tuple) else (trajectory_inputs, trajectory_inputs)
        t_pos_a, t_pos_b = trajectory_positions if isinstance(trajectory_positions, tuple) else (trajectory_positions, trajectory_positions)
        trials_a = paired_activations(model_a, site_a, t_inputs_a, t_pos_a).reshape(t_pos_a.shape[0], t_pos_a.shape[1], -1)
        trials_b = paired_activations(model_b, site_b, t_inputs_b, t_pos_b).reshape(t_pos_b.shape[0], t_pos_b.shape[1], -1)
        measures[f"dsa_{dsa.score_method}"] = float(dsa.score(trials_a.double(), trials_b.double()))
    comparison = Comparison(names, (site_a, site_b), x.shape[0], measures)
    if iia is not None:
        for source in names:
            for target in names:
                if source in iia.iia and target in iia.iia[source]:
                    comparison.mas_iia[f"{source}->{target}"] = iia.iia[source][target]
                    if iia.floor:
                        comparison.mas_floor[f"{source}->{target}"] = iia.floor[source][target]
    return comparison
