"""Model backends behind one protocol (:class:`ModelAdapter`).

``TorchModuleAdapter`` is imported eagerly; the TransformerLens and nnsight
adapters import their libraries lazily, so ``import masalign`` needs neither.
"""

from .base import ModelAdapter, ModelInputs, Replacement, SiteError
from .torch_module import TorchModuleAdapter

__all__ = ["ModelAdapter", "ModelInputs", "Replacement", "SiteError", "TorchModuleAdapter"]
