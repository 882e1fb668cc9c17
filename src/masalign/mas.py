"""``ModelAlignment``: the alignment functions of several wrapped models, and the
interchange intervention between any two of them (MAS; DAS when source = target).

This module joins the stages: it reads activations through the adapters, applies
:func:`masalign.alignment.interchange` at the chosen sites and positions, and
saves or loads the learned maps. Training lives in :mod:`masalign.train`,
evaluation in :mod:`masalign.evaluate`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import ModelAdapter
from .adapters.base import EMPTY_SLOT, check_finite, module_device, parameter_devices, unknown_site_error
from .alignment import make_alignment
from .data import CounterfactualData, ModelInputs, check_views, index_inputs, inputs_to, view_for
from .logit_rows import logits_at
from .memo import ActivationMemo
from .prefix import SourceReader
from .rowcache import RowCache, first_rows_alike
from .storage import FORMAT_VERSION, atomic_folder, read_save, write_json, write_tensors


def _check_subspace_dim(
    subspace_dim: int | Mapping[str, int] | None, older_spelling: int | Mapping[str, int] | None, variable: str
) -> dict[str, int]:
    """``{variable: k}`` with every ``k`` a positive integer, or a clear error."""
    if subspace_dim is None and older_spelling is None:
        raise TypeError("ModelAlignment needs subspace_dim: the size k of the variable's subspace, e.g. subspace_dim=16")
    if subspace_dim is not None and older_spelling is not None:
        raise TypeError("give subspace_dim only (subspace_dims is its older spelling), not both")
    value = subspace_dim if subspace_dim is not None else older_spelling
    sizes = dict(value) if isinstance(value, Mapping) else {variable: value}
    if not sizes:
        raise ValueError("subspace_dim is an empty mapping; give {variable: k} with at least one variable")
    for name, k in sizes.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"variable names in subspace_dim must be non-empty strings; got {name!r}")
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(
                f"subspace_dim for variable {name!r} must be an int (the number of aligned dimensions), got "
                f"{k!r} of type {type(k).__name__}; e.g. subspace_dim=16"
            )
        if k < 1:
            raise ValueError(
                f"subspace_dim for variable {name!r} is {k}; a subspace needs at least one dimension "
                "(k = 0 would train nothing and report the untrained model's behaviour as IIA)"
            )
    return sizes


class ModelAlignment(nn.Module):
    """One alignment function per model, and the variables' blocks of coordinates.

    Args:
        models: name -> wrapped model (any :class:`~masalign.adapters.ModelAdapter`).
        sites: name -> site in that model (one string: the same site in every model).
        subspace_dim: size ``k`` of the variable's subspace (an int: one variable,
            named by ``variable``), or ``{variable: k}`` for several variables,
            which get disjoint blocks of aligned coordinates in that order.
            (``subspace_dims=`` is accepted as an older spelling.)
        alignment: the kind of alignment function (``"orthogonal"`` by default).
        alignment_options: extra arguments for it (``full_rotation=True``).
        keep_complement: ``False`` zeroes the target's complement (stitching).
        seed: initialisation seed.
        variable: the variable's name when ``subspace_dim`` is an int.

    Models may sit on different devices, and one model may be sharded across
    several (loaded with ``device_map``): each model's alignment function lives on
    the device of its site (:meth:`site_device`), coordinates move between devices
    as the interchange needs them, and gradients follow. ``k`` (all blocks
    together) must not exceed any model's width at its site.
    """

    def __init__(
        self,
        models: Mapping[str, ModelAdapter],
        sites: Mapping[str, str] | str,
        subspace_dim: int | Mapping[str, int] | None = None,
        alignment: str = "orthogonal",
        alignment_options: Mapping[str, Any] | None = None,
        keep_complement: bool = True,
        seed: int = 0,
        variable: str = "count",
        subspace_dims: int | Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        if not models:
            raise ValueError("ModelAlignment needs at least one model")
        self.models = dict(models)
        self.sites = {name: sites for name in self.models} if isinstance(sites, str) else dict(sites)
        missing = set(self.models) - set(self.sites)
        if missing:
            raise ValueError(f"no site given for model(s) {sorted(missing)}; pass sites={{name: site}} for every model")
        self.subspace_dim = _check_subspace_dim(subspace_dim, subspace_dims, variable)
        self.blocks: dict[str, slice] = {}
        offset = 0
        for name, k in self.subspace_dim.items():
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
        self.place_on_site_devices()

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
        for name, adapter in self.models.items():
            model = getattr(adapter, "model", None)
            # accelerate's CPU offload leaves weights on the meta device and brings them in per call.
            offloaded = isinstance(model, nn.Module) and any(getattr(m, "_hf_hook", None) is not None for m in model.modules())
            if isinstance(model, nn.Module) and not offloaded and any(d.type == "meta" for d in parameter_devices(model)):
                raise ValueError(
                    f"model {name!r} has parameters on the meta device, which hold no values (a model built with "
                    "device='meta' or loaded with low_cpu_mem_usage and never filled); load its weights first"
                )

    def site_device(self, name: str) -> torch.device:
        """The device where model ``name``'s activations at its site are: its alignment function lives there.

        The device of the module that computes the site (for a model sharded with
        ``device_map``, that module's shard), else the model's input device.
        """
        adapter, site = self.models[name], self.sites[name]
        model = getattr(adapter, "model", None)
        if not isinstance(model, nn.Module):
            return torch.device(adapter.device)
        return module_device(model, site, torch.device(adapter.device))

    def input_device(self, name: str) -> torch.device:
        """Where model ``name`` takes its inputs (its first shard's device)."""
        return torch.device(self.models[name].device)

    def place_on_site_devices(self) -> ModelAlignment:
        """Move each alignment function to its site's device (:meth:`site_device`).

        Done on construction, on :meth:`load` and at the start of ``fit`` (so a model
        moved with ``model.to("cuda")`` after the alignment was built takes its map along).
        """
        for name, alignment in self.alignments.items():
            alignment.to(self.site_device(name))
        return self

    @property
    def device(self) -> torch.device:
        """The first model's input device (each model's own: :meth:`input_device`, :meth:`site_device`)."""
        return torch.device(next(iter(self.models.values())).device)

    @property
    def model_names(self) -> list[str]:
        return list(self.models)

    # -- reading and intervening ------------------------------------------------------------

    @torch.no_grad()
    def source_activations(
        self, model: str, inputs: ModelInputs, positions: Tensor, batch_size: int = 512, memo: ActivationMemo | None = None
    ) -> Tensor:
        """``(N, n_slots, width)`` activations of ``model`` at its site, without gradient.

        With a ``memo`` (:class:`masalign.memo.ActivationMemo`) they are read once
        per (model, site, inputs, positions) across fits and evaluations.
        """
        return self.source_rows(model, inputs, positions, batch_size, memo).full()

    def source_rows(
        self, model: str, inputs: ModelInputs, positions: Tensor, batch_size: int = 512, memo: ActivationMemo | None = None
    ) -> RowCache:
        """:meth:`source_activations` as a :class:`masalign.rowcache.RowCache`: rows read on first use
        (``fit`` reads a batch's rows when it first trains on them). Shared through ``memo``."""
        adapter, site = self.models[model], self.sites[model]
        read_activations = SourceReader(adapter, site, model)

        @torch.no_grad()
        def read(rows: Tensor) -> Tensor:
            device = adapter.device
            hidden = read_activations(inputs_to(index_inputs(inputs, rows), device), positions[rows].to(device))
            check_finite(hidden, f"activations of model {model!r} at {site!r}")
            return hidden

        def make() -> RowCache:
            return RowCache(positions.shape[0], read, batch_size, first_alike=first_rows_alike(inputs, positions))

        return make() if memo is None else memo.get("source", adapter, site, inputs, positions, make)

    def fit_standardization(self, data: CounterfactualData, max_pairs: int = 4096, memo: ActivationMemo | None = None) -> None:
        """Set each model's ``mean`` and ``std`` from its activations at the source positions.

        Models of one family can differ in scale by orders of magnitude (Gemma-3's
        residual stream is ~40x SmolLM2's): without this, one model's coordinates
        written into the other are far outside what it reads there.
        """
        check_views(data)
        for name in self.models:
            view = view_for(data, name)
            n = min(len(view), max_pairs)
            if n == len(view):  # the dataset's own tensors, so that a memo finds the fit's read
                hidden = self.source_activations(name, view.source_inputs, view.source_positions, memo=memo)
            else:
                hidden = self.source_activations(name, index_inputs(view.source_inputs, torch.arange(n)), view.source_positions[:n])
            used = (view.source_positions[:n] != EMPTY_SLOT).reshape(-1).to(hidden.device)  # empty slots read as zeros
            flat = hidden.reshape(-1, hidden.shape[-1])[used]
            self.alignments[name].fit_standardization(flat)

    def intervened_logits(
        self,
        source: str,
        target: str,
        source_hidden: Tensor,
        base_inputs: ModelInputs,
        base_positions: Tensor,
        variable: str | None = None,
        base_prefix: Tensor | None = None,
        logit_positions: Tensor | None = None,
    ) -> Tensor:
        """Target logits ``(batch, seq, vocab)`` after the interchange from ``source``.

        ``source_hidden`` ``(batch, n_slots, d_source)`` are the source model's
        activations (from :meth:`source_activations`); slot ``j`` goes to
        ``base_positions[:, j]`` in the target. ``base_prefix`` ``(batch, seq,
        d_target)``, the target's states at its site on ``base_inputs``
        (:func:`masalign.prefix.base_prefixes`), runs only the blocks after the
        site, with the same logits. ``logit_positions`` ``(batch, n)`` gives the
        logits at those positions only, ``(batch, n, vocab)``
        (:func:`masalign.logit_rows.logits_at`: the unembedding runs on those rows
        where the adapter allows it).
        """
        block = self.block(variable)
        source_alignment, target_alignment = self.alignments[source], self.alignments[target]
        if source_hidden.shape[-1] != self.widths[source]:
            raise ValueError(
                f"source activations have width {source_hidden.shape[-1]} but model {source!r} has width "
                f"{self.widths[source]} at {self.sites[source]!r}"
            )
        def replace(hidden: Tensor, example_index: Tensor, slot_index: Tensor) -> Tensor:
            if hidden.shape[-1] != target_alignment.width:
                raise ValueError(
                    f"model {target!r} produced width {hidden.shape[-1]} at {self.sites[target]!r}, but its alignment "
                    f"was made for width {target_alignment.width}"
                )
            # Rows go to the map's device and back (no-ops when, as placed, the site is there):
            # the copies are differentiable, so gradients reach the maps wherever they are.
            where = target_alignment.device
            new_values = values[example_index.to(values.device), slot_index.to(values.device)].to(where, hidden.dtype)
            changed = target_alignment.substitute(hidden.to(where), block, new_values, self.keep_complement)
            return changed.to(hidden.device)

        adapter, site = self.models[target], self.sites[target]

        def run() -> Tensor:
            if base_prefix is not None:
                return adapter.run_from_prefix(base_inputs, site, base_prefix, base_positions, replace)
            return adapter.run_with_replacement(base_inputs, site, base_positions, replace)

        # Within one model (DAS) the map that reads is the one that writes: its matrix is built once.
        with source_alignment.computed_once() if source_alignment is target_alignment else contextlib.nullcontext():
            values = self._source_coordinates(source_alignment, source_hidden, base_positions, block)
            if logit_positions is None:
                return run()
            return logits_at(adapter, logit_positions, base_inputs, run)

    @staticmethod
    def _source_coordinates(source_alignment: nn.Module, source_hidden: Tensor, base_positions: Tensor, block: slice) -> Tensor:
        """``(batch, n_slots, k)``: the source rows' coordinates in the block; an empty slot's (the
        source's and the base's slots are empty alike) are zeros, never written. Its zero activation
        is not mapped: it may lie outside an elementwise map's range (a sigmoid's (0, 1))."""
        hidden = source_hidden.to(source_alignment.device)
        filled = (base_positions != EMPTY_SLOT).to(hidden.device)
        if bool(filled.all()):
            return source_alignment.coordinates(hidden, block)
        rows = source_alignment.coordinates(hidden[filled], block)  # (n_filled, k)
        return rows.new_zeros(*filled.shape, rows.shape[-1]).index_put(tuple(filled.nonzero().T), rows)

    def block(self, variable: str | None) -> slice:
        if variable is None:
            if len(self.blocks) != 1:
                raise ValueError(f"this alignment has several variables {list(self.blocks)}; name one")
            return next(iter(self.blocks.values()))
        if variable not in self.blocks:
            raise KeyError(
                f"no variable {variable!r}; this alignment has {list(self.blocks)}: build it with "
                f"variable={variable!r} (or subspace_dim={{{variable!r}: k}}), or give data for {list(self.blocks)}"
            )
        return self.blocks[variable]

    # -- saving ------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "models": self.model_names,
            "sites": self.sites,
            "widths": self.widths,
            "architectures": {name: model_architecture(adapter, self.sites[name]) for name, adapter in self.models.items()},
            "weights": {name: weight_fingerprint(adapter.model) for name, adapter in self.models.items()},
            "subspace_dim": self.subspace_dim,
            "alignment": self.alignment_kind,
            "alignment_options": self.alignment_options,
            "alignment_configs": {name: a.config() for name, a in self.alignments.items()},
            "keep_complement": self.keep_complement,
            "seed": self.seed,
        }

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``alignment.safetensors``, ``alignment.json`` and ``manifest.json`` into ``folder``.

        The write is atomic (an interrupted save leaves ``folder`` as it was). An
        existing save in ``folder`` raises ``FileExistsError`` unless ``overwrite=True``.
        """
        tensors = {f"{name}.{key}": value for name, a in self.alignments.items() for key, value in a.state_dict().items()}
        with atomic_folder(folder, SAVE_KIND, overwrite, replaceable=SAVE_FILES) as temporary:
            write_tensors(temporary / TENSOR_FILE, tensors)
            write_json(temporary / METADATA_FILE, self.metadata())
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path, models: Mapping[str, ModelAdapter], check_models: bool = True) -> ModelAlignment:
        """Load a saved alignment onto ``models`` (same names, sites and widths).

        Every file is checked against the manifest's SHA-256 first. With
        ``check_models=True`` each model must also have the architecture it was saved
        with (adapter class, model class, and the names and shapes of its
        parameters); ``check_models=False`` skips that, for a model whose code was
        renamed or reorganised but whose site still means the same thing.
        """
        saved = read_save(folder, SAVE_KIND, SAVE_FILES, "masalign alignment", METADATA_FILE)
        meta = saved.json(METADATA_FILE)
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
            if check_models and "architectures" in meta:  # legacy saves did not record them
                check_architecture(name, meta["architectures"][name], model_architecture(adapter, site))
            if check_models and "weights" in meta:  # saves before masalign 0.5 did not record them
                check_weights(name, meta["weights"][name], weight_fingerprint(adapter.model))
        tensors = saved.tensors(TENSOR_FILE)
        alignment = cls(
            {name: models[name] for name in meta["models"]},
            meta["sites"],
            meta["subspace_dim"] if "subspace_dim" in meta else meta["subspace_dims"],
            alignment=meta["alignment"],
            alignment_options=_options_of_save(meta["alignment"], meta["alignment_options"], tensors),
            keep_complement=meta["keep_complement"],
            seed=meta["seed"],
        )
        tensor_path = Path(folder) / TENSOR_FILE
        for key, value in tensors.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"{tensor_path} holds non-finite values in {key!r}; the save is corrupted")
        for name, a in alignment.alignments.items():
            # Settings that are not tensors, as the save recorded them.
            saved_config = meta.get("alignment_configs", {}).get(name, {})
            rebuilt = json.loads(json.dumps(a.config()))
            differ = {key: (value, rebuilt.get(key)) for key, value in saved_config.items() if not _agrees(value, rebuilt.get(key))}
            if differ:
                raise ValueError(
                    f"the map of model {name!r} was saved with "
                    f"{', '.join(f'{key}={then!r}' for key, (then, _) in differ.items())}, but rebuilding it from "
                    f"{METADATA_FILE} gives {', '.join(f'{key}={now!r}' for key, (_, now) in differ.items())}: "
                    "this masalign cannot rebuild it exactly"
                )
            prefix = f"{name}."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            # load_state_dict copies into the new map's float32 tensors: a float64 map would lose its last bits.
            saved_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
            if len(saved_dtypes) == 1:
                a.to(saved_dtypes.pop())
            try:
                a.load_state_dict(state)
            except RuntimeError as exc:  # missing, extra or reshaped tensors
                raise ValueError(f"{tensor_path} does not fit the alignment of model {name!r} in {METADATA_FILE}: {exc}") from exc
        return alignment.place_on_site_devices()


def _agrees(saved: Any, rebuilt: Any) -> bool:
    """``rebuilt`` has every setting ``saved`` records; a mapping may have more (older saves did not
    record the settings that were defaults then, which :func:`_options_of_save` names)."""
    if isinstance(saved, dict) and isinstance(rebuilt, dict):
        return all(_agrees(value, rebuilt.get(key)) for key, value in saved.items())
    return saved == rebuilt


def _options_of_save(kind: str, options: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """The alignment options a save was made with. Saves from before the orthogonal map had a
    ``parametrization`` option (masalign 0.1) used the QR retraction, whose parameter is
    ``raw_columns``; the default is now another, so those saves name theirs explicitly here."""
    options = dict(options)
    if not any(key.endswith(".raw_columns") for key in tensors):
        return options
    if kind == "orthogonal":
        options.setdefault("parametrization", "qr")
    elif kind == "elementwise_inverse" and options.get("inner", "orthogonal") == "orthogonal":
        options["inner_options"] = {"parametrization": "qr", **dict(options.get("inner_options") or {})}
    return options


SAVE_KIND = "masalign.alignment"
TENSOR_FILE, METADATA_FILE = "alignment.safetensors", "alignment.json"
SAVE_FILES = (TENSOR_FILE, METADATA_FILE)


def model_architecture(adapter: ModelAdapter, site: str) -> dict[str, Any]:
    """What an alignment records about a model: adapter and model classes, site, width,
    and a SHA-256 of its parameters' names and shapes (not their values)."""
    shapes = [(name, list(p.shape)) for name, p in adapter.model.named_parameters()]
    return {
        "adapter": type(adapter).__name__,
        "model_class": type(adapter.model).__name__,
        "site": site,
        "width": adapter.sites()[site],
        "n_parameter_tensors": len(shapes),
        "n_parameters": sum(math.prod(shape) for _, shape in shapes),
        "parameter_fingerprint": hashlib.sha256(json.dumps(shapes).encode()).hexdigest(),
    }


def weight_fingerprint(model: nn.Module) -> dict[str, list[float]]:
    """Each parameter's L1 and L2 norms, accumulated in float32 (bfloat16 weights included), so
    that a save can tell the models it was made for from others of the same architecture."""
    l1, l2 = [], []
    with torch.no_grad():
        for p in model.parameters():
            l1.append(float(torch.linalg.vector_norm(p, 1, dtype=torch.float32)))
            l2.append(float(torch.linalg.vector_norm(p, 2, dtype=torch.float32)))
    return {"l1": l1, "l2": l2}


# A cast of float32 weights to bfloat16 (or float16) moves each weight by at most 2^-9 of itself,
# so each norm by at most that fraction. Another seed's weights, or another model's, move the norms
# of small tensors (biases, norms' scales) by far more.
_WEIGHT_TOLERANCE = 2.0**-8


def check_weights(name: str, saved: Mapping[str, list[float]], current: Mapping[str, list[float]]) -> None:
    if len(saved["l2"]) != len(current["l2"]):
        return  # check_architecture has said what differs
    for index, (l1_then, l1_now, l2_then, l2_now) in enumerate(zip(saved["l1"], current["l1"], saved["l2"], current["l2"])):
        if abs(l1_then - l1_now) > _WEIGHT_TOLERANCE * max(l1_then, l1_now) or abs(l2_then - l2_now) > _WEIGHT_TOLERANCE * max(
            l2_then, l2_now
        ):
            raise ValueError(
                f"model {name!r} does not have the weights the alignment was saved with (parameter tensor {index}: "
                f"L2 norm {l2_then:.6g} then, {l2_now:.6g} now). Are the models given under the right names? Pass "
                "check_models=False to ModelAlignment.load to use the alignment on these weights anyway (a fine-tuned "
                "model, say)"
            )


def check_architecture(name: str, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    differences = [f"{key}: saved {saved.get(key)!r}, now {value!r}" for key, value in current.items() if saved.get(key) != value]
    if differences:
        raise ValueError(
            f"model {name!r} is not the architecture the alignment was saved for ({'; '.join(differences)}). "
            "Pass check_models=False to ModelAlignment.load if it is the same model under another class or "
            "parameter names"
        )
