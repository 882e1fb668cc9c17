"""``ModelAlignment``: the alignment functions of several wrapped models, and the
interchange intervention between any two of them (MAS; DAS when source = target).

This module joins the stages: it reads activations through the adapters, applies
:func:`masalign.alignment.interchange` at the chosen sites and positions, and
saves or loads the learned maps. Training lives in :mod:`masalign.train`,
evaluation in :mod:`masalign.evaluate`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .adapters import ModelAdapter
from .adapters.base import check_finite, unknown_site_error
from .alignment import AlignmentFunction, make_alignment
from .data import CounterfactualData, ModelInputs, check_views, index_inputs, inputs_to, view_for

FORMAT_VERSION = 1


class ModelAlignment(nn.Module):
    """One alignment function per model, and the variables' blocks of coordinates.

    Args:
        models: name -> wrapped model (any :class:`~masalign.adapters.ModelAdapter`).
        sites: name -> site in that model (one string: the same site in every model).
        subspace_dims: size ``k`` of the variable's subspace (an int: one variable,
            named by ``variable``), or ``{variable: k}`` for several variables,
            which get disjoint blocks of aligned coordinates in that order.
        alignment: the kind of alignment function (``"orthogonal"`` by default).
        alignment_options: extra arguments for it (``full_rotation=True``).
        keep_complement: ``False`` zeroes the target's complement (stitching).
        seed: initialisation seed.
        variable: the variable's name when ``subspace_dims`` is an int.

    Every model must be on the same device. ``k`` (all blocks together) must not
    exceed any model's width at its site.
    """

    def __init__(
        self,
        models: Mapping[str, ModelAdapter],
        sites: Mapping[str, str] | str,
        subspace_dims: int | Mapping[str, int],
        alignment: str = "orthogonal",
        alignment_options: Mapping[str, Any] | None = None,
        keep_complement: bool = True,
        seed: int = 0,
        variable: str = "count",
    ) -> None:
        super().__init__()
        if not models:
            raise ValueError("ModelAlignment needs at least one model")
        self.models = dict(models)
        self.sites = {name: sites for name in self.models} if isinstance(sites, str) else dict(sites)
        missing = set(self.models) - set(self.sites)
        if missing:
            raise ValueError(f"no site given for model(s) {sorted(missing)}; pass sites={{name: site}} for every model")
        self.subspace_dims = {variable: subspace_dims} if isinstance(subspace_dims, int) else dict(subspace_dims)
        for name, k in self.subspace_dims.items():
            if k < 0:
                raise ValueError(f"subspace_dims[{name!r}] = {k}; a subspace size cannot be negative")
        self.blocks: dict[str, slice] = {}
        offset = 0
        for name, k in self.subspace_dims.items():
            self.blocks[name] = slice(offset, offset + k)
            offset += k
        self.n_aligned = offset
        self.alignment_kind = alignment
        self.alignment_options = dict(alignment_options or {})
        self.keep_complement = keep_complement
        self.seed = seed

        self.widths = self._check_sites()
        self._check_devices()
        generator = torch.Generator().manual_seed(seed)
        self.alignments = nn.ModuleDict()
        for name in self.models:
            if self.n_aligned > self.widths[name]:
                raise ValueError(
                    f"subspace size {self.n_aligned} exceeds the width {self.widths[name]} of model {name!r} at "
                    f"{self.sites[name]!r}; k must be <= the smallest width ({min(self.widths.values())})"
                )
            self.alignments[name] = make_alignment(
                alignment, self.widths[name], self.n_aligned, generator=generator, **self.alignment_options
            )
        self.to(self.device)

    # -- set-up checks -------------------------------------------------------------------

    def _check_sites(self) -> dict[str, int]:
        widths = {}
        for name, adapter in self.models.items():
            available = adapter.sites()
            if self.sites[name] not in available:
                raise unknown_site_error(self.sites[name], available, f"model {name!r}")
            widths[name] = available[self.sites[name]]
        return widths

    def _check_devices(self) -> None:
        devices = {name: torch.device(adapter.device) for name, adapter in self.models.items()}
        if len(set(devices.values())) > 1:
            listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
            raise ValueError(f"all models must be on one device; got {listing}. Move them with model.to(device)")

    @property
    def device(self) -> torch.device:
        return torch.device(next(iter(self.models.values())).device)

    @property
    def model_names(self) -> list[str]:
        return list(self.models)

    # -- reading and intervening ------------------------------------------------------------

    @torch.no_grad()
    def source_activations(self, model: str, inputs: ModelInputs, positions: Tensor, batch_size: int = 512) -> Tensor:
        """``(N, n_slots, width)`` activations of ``model`` at its site, without gradient."""
        adapter, site = self.models[model], self.sites[model]
        n = positions.shape[0]
        parts = []
        for start in range(0, n, batch_size):
            index = torch.arange(start, min(start + batch_size, n))
            batch_inputs = index_inputs(inputs, index)
            parts.append(adapter.activations(inputs_to(batch_inputs, self.device), site, positions[index].to(self.device)))
        hidden = torch.cat(parts)
        check_finite(hidden, f"activations of model {model!r} at {site!r}")
        return hidden

    def fit_standardization(self, data: CounterfactualData, max_pairs: int = 4096) -> None:
        """Set each model's ``mean`` and ``std`` from its activations at the source positions."""
        check_views(data)
        for name in self.models:
            view = view_for(data, name)
            n = min(len(view), max_pairs)
            hidden = self.source_activations(name, index_inputs(view.source_inputs, torch.arange(n)), view.source_positions[:n])
            flat = hidden.reshape(-1, hidden.shape[-1])
            self.alignments[name].fit_standardization(flat)

    def intervened_logits(
        self,
        source: str,
        target: str,
        source_hidden: Tensor,
        base_inputs: ModelInputs,
        base_positions: Tensor,
        variable: str | None = None,
    ) -> Tensor:
        """Target logits ``(batch, seq, vocab)`` after the interchange from ``source``.

        ``source_hidden`` ``(batch, n_slots, d_source)`` are the source model's
        activations (from :meth:`source_activations`); slot ``j`` goes to
        ``base_positions[:, j]`` in the target.
        """
        block = self.block(variable)
        source_alignment, target_alignment = self.alignments[source], self.alignments[target]
        if source_hidden.shape[-1] != self.widths[source]:
            raise ValueError(
                f"source activations have width {source_hidden.shape[-1]} but model {source!r} has width "
                f"{self.widths[source]} at {self.sites[source]!r}"
            )
        values = source_alignment.coordinates(source_hidden, block)  # (batch, n_slots, k)

        def replace(hidden: Tensor, example_index: Tensor, slot_index: Tensor) -> Tensor:
            if hidden.shape[-1] != target_alignment.width:
                raise ValueError(
                    f"model {target!r} produced width {hidden.shape[-1]} at {self.sites[target]!r}, but its alignment "
                    f"was made for width {target_alignment.width}"
                )
            new_values = values[example_index, slot_index]
            return target_alignment.substitute(hidden, block, new_values.to(hidden.dtype), self.keep_complement)

        return self.models[target].run_with_replacement(base_inputs, self.sites[target], base_positions, replace)

    def block(self, variable: str | None) -> slice:
        if variable is None:
            if len(self.blocks) != 1:
                raise ValueError(f"this alignment has several variables {list(self.blocks)}; name one")
            return next(iter(self.blocks.values()))
        if variable not in self.blocks:
            raise KeyError(f"no variable {variable!r}; this alignment has {list(self.blocks)}")
        return self.blocks[variable]

    # -- saving ------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "models": self.model_names,
            "sites": self.sites,
            "widths": self.widths,
            "subspace_dims": self.subspace_dims,
            "alignment": self.alignment_kind,
            "alignment_options": self.alignment_options,
            "alignment_configs": {name: a.config() for name, a in self.alignments.items()},
            "keep_complement": self.keep_complement,
            "seed": self.seed,
        }

    def save(self, folder: str | Path) -> Path:
        """Write ``alignment.safetensors`` and ``alignment.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.{key}": value.detach().cpu().contiguous() for name, a in self.alignments.items() for key, value in a.state_dict().items()}
        save_file(tensors, str(folder / "alignment.safetensors"))
        (folder / "alignment.json").write_text(json.dumps(self.metadata(), indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, models: Mapping[str, ModelAdapter]) -> ModelAlignment:
        """Load a saved alignment onto ``models`` (same names, sites and widths)."""
        folder = Path(folder)
        meta_path, tensor_path = folder / "alignment.json", folder / "alignment.safetensors"
        if not meta_path.exists() or not tensor_path.exists():
            raise FileNotFoundError(f"{folder} does not hold a saved alignment (alignment.json and alignment.safetensors)")
        meta = json.loads(meta_path.read_text())
        if set(models) != set(meta["models"]):
            raise ValueError(f"the alignment was saved for models {meta['models']}, got {sorted(models)}")
        for name, adapter in models.items():
            site = meta["sites"][name]
            available = adapter.sites()
            if site not in available:
                raise unknown_site_error(site, available, f"model {name!r} (the alignment was saved at {site!r})")
            if available[site] != meta["widths"][name]:
                raise ValueError(
                    f"model {name!r} has width {available[site]} at {site!r}, but the alignment was saved for width "
                    f"{meta['widths'][name]}: it belongs to another model"
                )
        alignment = cls(
            {name: models[name] for name in meta["models"]},
            meta["sites"],
            meta["subspace_dims"],
            alignment=meta["alignment"],
            alignment_options=meta["alignment_options"],
            keep_complement=meta["keep_complement"],
            seed=meta["seed"],
        )
        tensors = load_file(str(tensor_path))
        for name, a in alignment.alignments.items():
            prefix = f"{name}."
            a.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        return alignment.to(alignment.device)

