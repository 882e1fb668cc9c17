"""masalign: Model Alignment Search (MAS) and Distributed Alignment Search (DAS).

Data flows one way: a task and its causal model give counterfactual pairs
(:mod:`masalign.data`, :mod:`masalign.tasks`); adapters read and patch models
(:mod:`masalign.adapters`); alignment functions and the interchange
(:mod:`masalign.alignment`, :class:`ModelAlignment`) are trained by :func:`fit`
and scored by :func:`evaluate` (directions and the loss they share:
:mod:`masalign.objectives`; the IIA-against-k sweep: :mod:`masalign.sweep`;
reads shared across fits: :class:`ActivationMemo`). Activation patching and
ablation over sites x positions, on the same adapters: :mod:`masalign.patching`.
"""

from .adapters import ModelAdapter, ModelInputs, NNsightAdapter, SiteError, TorchModuleAdapter, TransformerLensAdapter
from .alignment import (
    AlignmentFunction,
    CouplingAlignment,
    ElementwiseInverseAlignment,
    OrthogonalAlignment,
    ScaledOrthogonalAlignment,
    SymmetricPositiveDefiniteAlignment,
    interchange,
    make_alignment,
)
from .adapters.base import EMPTY_SLOT
from .data import IGNORE_INDEX, CounterfactualPairs, LabelledSequences, prefix_positions
from .evaluate import IIAReport, evaluate, interchange_scores, task_accuracy
from .mas import ModelAlignment
from .memo import ActivationMemo
from .objectives import Direction, all_directions
from .patching import AnswerAccuracy, AnswerProbability, LogitDifference, PatchingResult, ablation, activation_patching
from .sweep import iia_by_site, iia_by_subspace_dim
from .train import FitResult, LatentObjective, fit

__all__ = [
    "EMPTY_SLOT",
    "IGNORE_INDEX",
    "prefix_positions",
    "ActivationMemo",
    "AnswerAccuracy",
    "AnswerProbability",
    "LogitDifference",
    "PatchingResult",
    "ablation",
    "activation_patching",
    "AlignmentFunction",
    "CouplingAlignment",
    "ElementwiseInverseAlignment",
    "LatentObjective",
    "ScaledOrthogonalAlignment",
    "SymmetricPositiveDefiniteAlignment",
    "CounterfactualPairs",
    "Direction",
    "ModelInputs",
    "NNsightAdapter",
    "SiteError",
    "TransformerLensAdapter",
    "FitResult",
    "IIAReport",
    "LabelledSequences",
    "ModelAdapter",
    "ModelAlignment",
    "OrthogonalAlignment",
    "TorchModuleAdapter",
    "all_directions",
    "evaluate",
    "fit",
    "iia_by_site",
    "iia_by_subspace_dim",
    "interchange",
    "interchange_scores",
    "make_alignment",
    "task_accuracy",
]
__version__ = "0.5.0"
