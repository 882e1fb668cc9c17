"""Model backends behind one protocol (:class:`ModelAdapter`), one adapter per file.

- :class:`TorchModuleAdapter`: a plain ``nn.Module`` (recurrent models included);
- :class:`TransformerLensAdapter`: a TransformerLens model (``TransformerBridge``,
  ``HookedTransformer``, any ``HookedRootModule``), sites are hook names;
- :class:`NNsightAdapter`: an nnsight model (``NNsight(module)``,
  ``TransformersModel``), sites are module paths with ``.output`` / ``.input``.

All three are importable from here at no cost: the TransformerLens adapter never
imports ``transformer_lens`` and the nnsight adapter imports ``nnsight`` only when
one is built, so ``import masalign`` needs neither library.
"""

from .base import ModelAdapter, ModelInputs, Replacement, SiteError
from .nnsight import NNsightAdapter
from .torch_module import TorchModuleAdapter
from .transformer_lens import TransformerLensAdapter

__all__ = [
    "ModelAdapter",
    "ModelInputs",
    "NNsightAdapter",
    "Replacement",
    "SiteError",
    "TorchModuleAdapter",
    "TransformerLensAdapter",
]
