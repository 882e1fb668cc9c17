"""Adapter for nnsight models: ``NNsight(module)``, ``TransformersModel``, ``LanguageModel``.

Sites are the model's module paths, as in ``model.named_modules()``, with what is
read there:

- ``"<module>.output"``: the module's output. When the output is a tuple (or a
  Hugging Face ``ModelOutput``), this is its element 0, the hidden states of a
  block or an attention layer; ``"<module>.output[0]"`` is accepted as the same
  site.
- ``"<module>.output[i]"``: element ``i`` of a tuple output, for the other
  elements that are ``(batch, seq, width)`` activations.
- ``"<module>.input"``: the module's first input (its first positional argument,
  else its first keyword argument), as nnsight's ``.input`` defines it.

For example ``"transformer.h.1.output"`` (a GPT-2 block's residual stream),
``"transformer.h.1.mlp.input"``, ``"transformer.wte.output"``. A site is a
``(batch, seq, width)`` float activation of a module that runs once per forward
pass; widths come from one probing forward pass (a trace with nnsight's
``tracer.cache()``) on ``example_inputs``, by default two all-zero token
sequences for a Hugging Face model. Without ``example_inputs`` a model that takes
something other than token ids is probed on the first inputs the adapter sees.

Each call is one trace with one invoke: the batch runs as one forward pass and
one autograd graph, so a plain ``loss.backward()`` after ``run_with_replacement``
reaches every parameter the replacement used.

``inputs`` are a tensor (passed positionally) or a mapping passed by keyword
(``{"input_ids": ..., "attention_mask": ...}``). With a 2-d ``attention_mask``,
positions index the padded sequence and must point at real tokens (mask 1).
Left-padded rows get mask-derived ``position_ids`` when the model's forward takes
``position_ids`` and none were given, as TransformerLens's bridge and nnsight's
``TransformersModel`` (with a left-padding tokenizer) do, so a padded example
sees the positions it has unpadded, whichever way the model is wrapped.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import (
    ModelInputs,
    Replacement,
    RowReplacementHook,
    SiteError,
    StopForward,
    check_inputs,
    explaining_inference_weights,
    gather_rows,
    logits_from_output,
    probing,
    recurrent_layers_ready_for_backward,
    site_did_not_run,
    unknown_site_error,
)
from .key_values import KeyValueRuns, left_padding_position_ids, tokens_and_2d_mask
from .resume import BlockSite, KeyValuePrefix, Resumer, check_prefix, find_block

_SITE_PATTERN = re.compile(r"^(?P<path>.+)\.(?P<slot>output|input)(?:\[(?P<element>\d+)\])?$")

_PROBE_BATCH = 2
_PROBE_SEQ_LEN = 7


@dataclass(frozen=True)
class _ModuleSite:
    module_path: str  # relative to the root module, e.g. "transformer.h.1"
    slot: str  # "output" or "input"
    element: int | None  # element of a tuple / ModelOutput output; None for a plain tensor
    width: int


@dataclass(frozen=True)
class _Unusable:
    """A module value seen in the probe that cannot be a site, and why."""

    reason: str


class NNsightAdapter:
    """Wrap an nnsight model; see the module docstring for site names.

    Args:
        model: an nnsight ``Envoy`` (``NNsight(module)``, ``TransformersModel``,
            ``LanguageModel``) or a plain ``nn.Module``, which is wrapped in
            ``nnsight.NNsight``. A ``TransformersModel`` built without
            ``dispatch=True`` is dispatched here, so that :attr:`model` holds the
            real weights.
        example_inputs: inputs for the probing forward pass that finds the sites'
            widths (default: ``(2, 7)`` zero token ids for a Hugging Face model,
            else the first inputs the adapter sees).
        logits_fn: extracts ``(batch, seq, vocab)`` logits from the model's output
            (default: the output itself, ``.logits``, or its first element).
        name: how the model is called in error messages.
    """

    def __init__(
        self,
        model: Any,
        example_inputs: ModelInputs | None = None,
        logits_fn: Callable[[Any], Tensor] | None = None,
        name: str = "model",
    ) -> None:
        import nnsight

        if isinstance(model, nn.Module):
            model = nnsight.NNsight(model)
        if not isinstance(model, nnsight.Envoy):
            raise TypeError(
                f"NNsightAdapter wraps an nnsight model (NNsight, TransformersModel, LanguageModel) or an "
                f"nn.Module, got {type(model).__name__}"
            )
        if getattr(model, "dispatched", True) is False:
            model.dispatch()
        self._envoy = model
        self._logits_fn = logits_fn or functools.partial(logits_from_output, adapter="NNsightAdapter")
        self.name = name
        self._example_inputs = example_inputs if example_inputs is not None else self._default_probe_inputs()
        self._probed: dict[str, _ModuleSite | _Unusable] | None = None
        self._probed_vocab_size: int | None = None  # of a plain module, from the probe
        self._resumer = Resumer()

    # -- the protocol --------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The wrapped ``nn.Module``.

        nnsight keeps it only as ``Envoy._module``, and swaps it when a lazily
        loaded model is dispatched, so it is read afresh each time.
        """
        return self._envoy._module

    @property
    def envoy(self) -> Any:
        """The nnsight model the adapter traces."""
        return self._envoy

    @property
    def device(self) -> torch.device:
        device = self._envoy.device
        return device if device is not None else torch.device("cpu")

    def sites(self) -> dict[str, int]:
        return {name: site.width for name, site in self._probed_sites(None).items() if isinstance(site, _ModuleSite)}

    def check_inputs(self, inputs: ModelInputs, positions: Tensor | None = None) -> Tensor | None:
        """Check every row of ``inputs`` (and ``positions``) without running the model on them.

        Token ids must lie inside the input embedding, sequences inside the
        model's context (``n_positions`` / ``max_position_embeddings`` of a
        Hugging Face config), an ``attention_mask`` must match the tokens,
        positions must lie on real tokens. Errors name the row of ``inputs``;
        returns the positions as long, or ``None``.
        """
        return check_inputs(inputs, positions, self._vocab_size(), self._context_length(), self.name)

    def logits(self, inputs: ModelInputs) -> Tensor:
        self.check_inputs(inputs)
        args, kwargs = self._call_arguments(inputs)
        # trace=False: one forward through nnsight's input preparation, no intervention.
        with explaining_inference_weights(self.model, self.name):
            return self._logits_fn(self._envoy.trace(*args, trace=False, **kwargs))

    def activations(self, inputs: ModelInputs, site: str, positions: Tensor) -> Tensor:
        """``(batch, n_slots, width)`` activations; the forward pass stops at the site.

        Read by a plain forward hook on the site's module during nnsight's untraced
        forward (as :meth:`logits` runs it), not by an intervention graph: the same
        value (what ``.output`` / ``.input`` give; tested against the traced read),
        for about half the cost of a trace on a small model.
        """
        spec = self._site(site, inputs)
        positions = self.check_inputs(inputs, positions)
        args, kwargs = self._call_arguments(inputs)
        module = self.model.get_submodule(spec.module_path)
        seen: list[Any] = []

        def read_input(module: nn.Module, args: Any, kwargs: Any) -> None:
            # nnsight's ``.input``: the first positional argument, else the first keyword argument.
            seen.append(args[0] if args else next(iter(kwargs.values()), None))
            raise StopForward

        def read_output(module: nn.Module, args: Any, output: Any) -> None:
            seen.append(output)
            raise StopForward

        handle = (
            module.register_forward_pre_hook(read_input, with_kwargs=True)
            if spec.slot == "input"
            else module.register_forward_hook(read_output)
        )
        try:
            with explaining_inference_weights(self.model, self.name):
                self._envoy.trace(*args, trace=False, **kwargs)
        except StopForward:
            pass
        finally:
            handle.remove()
        if not seen:
            raise site_did_not_run(self.name, site)
        return gather_rows(_element_of(seen[0], spec.element), positions, site)

    def run_with_replacement(
        self, inputs: ModelInputs, site: str, positions: Tensor, replace: Replacement
    ) -> Tensor:
        """Logits ``(batch, seq, vocab)`` with the site's rows at ``positions`` replaced, differentiably."""
        import nnsight

        spec = self._site(site, inputs)
        positions = self.check_inputs(inputs, positions)
        args, kwargs = self._call_arguments(inputs)
        target = self._envoy.get(spec.module_path)
        replacement = RowReplacementHook(positions, replace, site, self.model, self.name)
        with _counting_calls(self.model.get_submodule(spec.module_path), self.name, site) as calls:
            with explaining_inference_weights(self.model, self.name), recurrent_layers_ready_for_backward(self.model), self._envoy.trace(*args, **kwargs):
                value = target.output if spec.slot == "output" else target.input
                new_value = _with_element(value, spec.element, replacement(_element_of(value, spec.element)))
                if spec.slot == "output":
                    target.output = new_value
                else:
                    target.input = new_value
                logits = nnsight.save(self._logits_fn(self._envoy.output))
        calls.check_once()
        replacement.check_gradient_reached(logits)
        return logits

    def output_module(self) -> nn.Module | None:
        """A Hugging Face model's output embedding (``get_output_embeddings()``), for
        :func:`adapters.base.logits_only_at`; ``None`` for other models."""
        get = getattr(self.model, "get_output_embeddings", None)
        module = get() if callable(get) else None
        return module if isinstance(module, nn.Module) else None

    # -- prefix caching (optional; see adapters/resume.py) ---------------------------

    def supports_prefix(self, site: str) -> bool:
        """Whether ``site`` is the output of a block in a stack (``model.layers.{i}.output``), so runs can resume there."""
        return self._block_site(site) is not None

    def prefix(self, inputs: ModelInputs, site: str) -> Tensor:
        """``(batch, seq, width)`` states at ``site`` on ``inputs``, without gradient; the forward stops there."""
        block_site = self._resumable(site, inputs)
        self.check_inputs(inputs)
        run = self._plain_run(inputs)
        with explaining_inference_weights(self.model, self.name):
            return self._resumer.prefix(block_site, site, run)

    def run_from_prefix(
        self, inputs: ModelInputs, site: str, prefix: Tensor, positions: Tensor, replace: Replacement
    ) -> Tensor:
        """:meth:`run_with_replacement`'s logits, resumed from ``prefix`` (:meth:`prefix` of the same inputs)."""
        block_site = self._resumable(site, inputs)
        positions = self.check_inputs(inputs, positions)
        check_prefix(prefix, tuple(tokens_and_2d_mask(inputs)[0].shape), self._site(site, inputs).width, site)
        if isinstance(prefix, KeyValuePrefix):
            return self._run_from_key_values(inputs, site, prefix, positions, replace)
        replacement = RowReplacementHook(positions, replace, site, self.model, self.name)
        with explaining_inference_weights(self.model, self.name):
            return self._resumer.resume(block_site, site, prefix, replacement, self._plain_run(inputs))

    # -- and the keys and values before the first changed position (Hugging Face models) ----

    def supports_key_values(self, site: str) -> bool:
        """Whether runs resumed at ``site`` can also skip the positions before the first changed one:
        a block output of a Hugging Face model that takes a key/value cache (``cache`` or
        ``past_key_values``) and has an output embedding."""
        return self.supports_prefix(site) and self._key_values.supported()

    @functools.cached_property
    def _key_values(self) -> KeyValueRuns:
        """The cached-key/value runs (:mod:`masalign.adapters.key_values`), through nnsight's input preparation."""
        return KeyValueRuns(
            self.model,
            self.name,
            lambda *args, **kwargs: self._envoy.trace(*args, trace=False, **kwargs),
            self._call_arguments,
            self._logits_fn,
            self.output_module,
            self._resumer,
            self.prefix,
        )

    def key_value_prefix(self, inputs: ModelInputs, site: str, start: int, cuts: Sequence[int] | None = None) -> KeyValuePrefix:
        """:meth:`prefix`'s states, and the keys and values of the blocks after ``site`` at positions
        ``0..start-1``, from one run of the whole inputs with ``use_cache=True``, without gradient
        (in a causal model a position's keys and values depend on none after it). The run stops
        as soon as the last block's keys and values are stored.

        Rows whose prompts begin alike run those positions once
        (:mod:`masalign.adapters.shared_prefix`): the prompt is cut where that saves
        most, or at ``cuts`` (``0 < c_1 < ... < seq``; ``[0, seq]`` for one run). A model whose
        sliding-window layers are shorter than the prompt reads in one run, whatever ``cuts`` say."""
        block_site = self._resumable(site, inputs)
        self.check_inputs(inputs)
        return self._key_values.prefix(inputs, site, block_site, start, cuts)

    def key_value_activations(self, inputs: ModelInputs, site: str, positions: Tensor, cuts: Sequence[int] | None = None) -> Tensor:
        """:meth:`activations` at a block output (:meth:`supports_key_values`), from two shorter runs:
        the positions before the first read one run only until the site block has stored their
        keys and values, then the positions from it on run up to the site, attending to them.

        In a causal model a position's state depends on none after it, so these are the
        activations of the full run to float rounding (``fit`` checks them against
        :meth:`activations` on its first rows). For a read at the last token of an early
        block, the site's block and the blocks before it run one position instead of the
        whole prompt after its attention inputs (the MLP of a 2-layer GPT-2's block 0 over
        13 tokens is most of that read). Rows whose prompts begin alike run those positions
        once, as in :meth:`key_value_prefix` (``cuts`` likewise).
        """
        block_site = self._resumable(site, inputs)
        positions = self.check_inputs(inputs, positions)
        read = positions[positions >= 0]
        if not read.numel() or int(read.min()) == 0:
            return self.activations(inputs, site, positions)
        return self._key_values.activations(inputs, site, block_site, positions, cuts)

    def _run_from_key_values(
        self, inputs: ModelInputs, site: str, prefix: KeyValuePrefix, positions: Tensor, replace: Replacement
    ) -> Tensor:
        """The resumed run over positions ``prefix.start..`` only, attending to the cached keys and values."""
        return self._key_values.run_from(inputs, site, self._resumable(site, inputs), prefix, positions, replace)

    def _plain_run(self, inputs: ModelInputs) -> Callable[[], Tensor]:
        """The logits of one forward through nnsight's input preparation, as :meth:`logits` runs it."""
        args, kwargs = self._call_arguments(inputs)
        return lambda: self._logits_fn(self._envoy.trace(*args, trace=False, **kwargs))

    def _block_site(self, site: str, inputs: ModelInputs | None = None) -> BlockSite | None:
        try:
            spec = self._site(site, inputs)
        except SiteError:
            return None
        if spec.slot != "output" or spec.element not in (None, 0):
            return None
        return find_block(self.model, self.model.get_submodule(spec.module_path))

    def _resumable(self, site: str, inputs: ModelInputs) -> BlockSite:
        self._site(site, inputs)
        block_site = self._block_site(site, inputs)
        if block_site is None:
            raise SiteError(
                f"{self.name}: runs can resume only at the output of a block in a stack (e.g. "
                f"'model.layers.3.output'); {site!r} is not one, run it with run_with_replacement"
            )
        return block_site

    # -- sites ---------------------------------------------------------------------

    def _site(self, site: str, inputs: ModelInputs | None) -> _ModuleSite:
        probed = self._probed_sites(inputs)
        parsed = _SITE_PATTERN.match(site)
        if parsed is not None and parsed["element"] == "0":
            # ".output[0]" is ".output" of a module with a tuple output.
            first = probed.get(f"{parsed['path']}.{parsed['slot']}")
            if isinstance(first, _ModuleSite) and first.element == 0:
                return first
        found = probed.get(site)
        if isinstance(found, _ModuleSite):
            return found
        if isinstance(found, _Unusable):
            raise SiteError(f"{self.name}: {site!r} cannot be a site: {found.reason}")
        modules = dict(self.model.named_modules())
        if parsed is None and site in modules and site:
            raise SiteError(
                f"{self.name}: {site!r} is a module, not a site; name what to read there: "
                f"{site + '.output'!r} or {site + '.input'!r}"
            )
        if parsed is not None and parsed["path"] in modules:
            path = parsed["path"]
            at_module = [name for name in probed if name.split("[")[0].rsplit(".", 1)[0] == path]
            if not at_module:
                raise SiteError(
                    f"{self.name}: module {path!r} exists but did not run in the probing forward pass "
                    "(or takes and returns no tensors)"
                )
            raise SiteError(
                f"{self.name}: module {path!r} has no site {site!r}; its sites are "
                f"{[name for name in at_module if isinstance(probed[name], _ModuleSite)]}"
            )
        raise unknown_site_error(site, self.sites(), self.name)

    def _default_probe_inputs(self) -> ModelInputs | None:
        config = getattr(self.model, "config", None)
        if getattr(config, "vocab_size", None) is None:
            return None
        n_ctx = next(
            (getattr(config, key) for key in ("n_positions", "max_position_embeddings") if getattr(config, key, None)),
            _PROBE_SEQ_LEN,
        )
        shape = (_PROBE_BATCH, min(_PROBE_SEQ_LEN, n_ctx))
        return {
            "input_ids": torch.zeros(shape, dtype=torch.long),
            "attention_mask": torch.ones(shape, dtype=torch.long),
        }

    def _probed_sites(self, inputs: ModelInputs | None) -> dict[str, _ModuleSite | _Unusable]:
        """Every module value seen in the probe, by site name; probes on first use."""
        if self._probed is None:
            self._probed = self._probe(self._example_inputs if self._example_inputs is not None else inputs)
        return self._probed

    def _probe(self, inputs: ModelInputs | None) -> dict[str, _ModuleSite | _Unusable]:
        """Classify every module's input and output by shape, from one cached forward pass."""
        if inputs is None:
            raise ValueError(
                f"{self.name}: the sites of a model that is not a Hugging Face model are found by running it, and "
                "the adapter has seen no inputs yet; pass example_inputs=... to NNsightAdapter"
            )
        tokens, _ = tokens_and_2d_mask(inputs)
        batch, seq_len = tokens.shape[0], tokens.shape[1]
        args, kwargs = self._call_arguments(inputs)
        vocab_sizes: list[int] = []

        def record_vocabulary(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            # The token embedding takes the token tensor itself.
            if (args and args[0] is tokens) or kwargs.get("input") is tokens:
                vocab_sizes.append(module.num_embeddings)

        embeddings = [module for module in self.model.modules() if isinstance(module, nn.Embedding)]
        handles = [module.register_forward_hook(record_vocabulary, with_kwargs=True) for module in embeddings]
        try:
            with probing(self.model):
                with self._envoy.trace(*args, **kwargs) as tracer:
                    cache = tracer.cache(include_inputs=True, device=None)
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            raise RuntimeError(
                f"{self.name}: the probing forward pass that finds the sites' widths failed "
                f"({type(error).__name__}: {error}); pass example_inputs=... that the model accepts"
            ) from error
        finally:
            for handle in handles:
                handle.remove()
        self._probed_vocab_size = min(vocab_sizes) if vocab_sizes else None
        root_prefix = self._envoy.path + "."
        probed: dict[str, _ModuleSite | _Unusable] = {}
        for key in cache.keys():
            if not key.startswith(root_prefix):
                continue  # the root: its input is the model input, its output the logits
            path = key[len(root_prefix) :]
            visits = cache[key]
            if len(visits) > 1:
                reason = (
                    f"module {path!r} runs {len(visits)} times per forward pass; "
                    "a replacement at positions needs a module that runs once"
                )
                probed[f"{path}.output"] = probed[f"{path}.input"] = _Unusable(reason)
                continue
            _classify(probed, f"{path}.input", visits.input, None, batch, seq_len)
            output = visits.output
            elements = _elements(output)
            if elements is None:
                _classify(probed, f"{path}.output", output, None, batch, seq_len)
                continue
            for index, element in enumerate(elements):
                name = f"{path}.output" if index == 0 else f"{path}.output[{index}]"
                _classify(probed, name, element, index, batch, seq_len)
        return probed

    # -- inputs ----------------------------------------------------------------------

    def _vocab_size(self) -> int | None:
        """The input embedding's size: a Hugging Face model's, else the probed token embedding's."""
        get_embeddings = getattr(self.model, "get_input_embeddings", None)
        embeddings = get_embeddings() if callable(get_embeddings) else None
        if isinstance(embeddings, nn.Embedding):
            return embeddings.num_embeddings
        if self._example_inputs is not None or self._probed is not None:
            self._probed_sites(None)
        return self._probed_vocab_size

    def _context_length(self) -> int | None:
        """A Hugging Face config's ``n_positions`` / ``max_position_embeddings``, if any."""
        config = getattr(self.model, "config", None)
        for key in ("n_positions", "max_position_embeddings"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def _call_arguments(self, inputs: ModelInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if isinstance(inputs, Tensor):
            return (inputs,), {}
        if not isinstance(inputs, Mapping):
            raise TypeError(f"inputs must be a tensor or a mapping of tensors, got {type(inputs).__name__}")
        kwargs = dict(inputs)
        tokens, attention_mask = tokens_and_2d_mask(inputs)
        if (
            attention_mask is not None
            and attention_mask.shape == tokens.shape[:2]
            and "position_ids" not in kwargs
            and "position_ids" in self._key_values.forward_parameters
        ):
            position_ids = left_padding_position_ids(attention_mask)
            if position_ids is not None:
                kwargs["position_ids"] = position_ids
        return (), kwargs


# -- helpers ---------------------------------------------------------------------------


class _CallCount:
    """How often a module ran in one trace (see :func:`_counting_calls`)."""

    def __init__(self, model_name: str, site: str) -> None:
        self.model_name, self.site, self.calls = model_name, site, 0

    def check_once(self) -> None:
        if self.calls > 1:
            raise SiteError(
                f"{self.model_name}: the module of site {self.site!r} ran {self.calls} times in this forward pass; "
                "a replacement at positions needs a module that runs once"
            )


@contextlib.contextmanager
def _counting_calls(module: nn.Module, model_name: str, site: str) -> Iterator[_CallCount]:
    """Count ``module``'s calls in the block; a failure of a block in which it never ran is the site's."""
    count = _CallCount(model_name, site)

    def counted(*args: Any) -> None:
        count.calls += 1

    handle = module.register_forward_pre_hook(counted)
    try:
        yield count
    except Exception as error:
        # nnsight reports a module that never ran as a request the model "already ran past".
        if count.calls == 0 and type(error).__name__ == "OutOfOrderError":
            raise site_did_not_run(model_name, site) from error
        raise
    finally:
        handle.remove()


def _elements(output: Any) -> list[Any] | None:
    """The elements of a tuple / list / ``ModelOutput`` output; ``None`` for anything else."""
    if isinstance(output, (tuple, list)):
        return list(output)
    if isinstance(output, Mapping):
        return list(output.values())
    return None


def _element_of(value: Any, element: int | None) -> Tensor:
    if element is None:
        return value
    elements = _elements(value)
    if elements is None:
        raise SiteError(f"expected a tuple output to take element {element} of, got {type(value).__name__}")
    return elements[element]


def _with_element(value: Any, element: int | None, part: Tensor) -> Any:
    """``value`` with its element ``element`` swapped for ``part``, same container type."""
    if element is None:
        return part
    if isinstance(value, Mapping):
        keys = list(value.keys())
        return type(value)(**{**value, keys[element]: part})
    parts = list(value)
    parts[element] = part
    return type(value)(parts) if isinstance(value, tuple) else parts


def _classify(
    probed: dict[str, _ModuleSite | _Unusable], name: str, value: Any, element: int | None, batch: int, seq_len: int
) -> None:
    if not isinstance(value, Tensor):
        return
    path, slot = name.split("[")[0].rsplit(".", 1)
    if value.is_floating_point() and value.dim() == 3 and tuple(value.shape[:2]) == (batch, seq_len):
        probed[name] = _ModuleSite(path, slot, element, value.shape[2])
    else:
        probed[name] = _Unusable(
            f"it holds a {'float' if value.is_floating_point() else 'non-float'} tensor of shape "
            f"{tuple(value.shape)} on {batch} sequences of length {seq_len}; sites are float (batch, seq, width) "
            "activations"
        )
