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
import inspect
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
    tokens_and_mask,
    unknown_site_error,
)
from .resume import (
    BlockSite,
    KeyValuePrefix,
    Resumer,
    check_prefix,
    find_block,
    hidden_of,
    left_padded_unembedding,
    resumed_at,
)
from .shared_prefix import (
    KEY_VALUE_SHARE,
    Segment,
    distinct_prefix_counts,
    gather_segments,
    one_group_per_row,
    plan_segments,
    prefix_columns,
    prefix_groups,
    run_cost,
)

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
        check_prefix(prefix, tuple(_tokens_and_mask(inputs)[0].shape), self._site(site, inputs).width, site)
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
        return self.supports_prefix(site) and self._cache_argument() is not None and self.output_module() is not None

    @functools.cached_property
    def _forward_parameters(self) -> Mapping[str, inspect.Parameter]:
        """The model's forward's parameters (read once: steps ask for them)."""
        return inspect.signature(self.model.forward).parameters

    @functools.cached_property
    def _cache_layers_from_config(self) -> bool:
        """Whether the model's key/value cache has layers other than plain ``DynamicLayer`` ones."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=getattr(self.model, "config", None)).layers
        return not layers or any(type(layer) is not DynamicLayer for layer in layers)

    def _cache_argument(self) -> str | None:
        """The forward's key/value cache argument: ``cache`` (transformers >= 5.20) or ``past_key_values``."""
        return next((name for name in ("cache", "past_key_values") if name in self._forward_parameters), None)

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
        seq = _tokens_and_mask(inputs)[0].shape[1]
        last = len(block_site.stack) - 1
        site_blocks = block_site.index + 1  # the blocks up to the site's, whole

        def position_cost(a: int, b: int) -> float:
            return last + KEY_VALUE_SHARE if a < start and last > block_site.index else site_blocks

        # The last block's keys and values are all it contributes: a run stops once they are in
        # the cache, before that block's attention and MLP (a large share of a shallow model's run).
        segments = self._read_segments(inputs, seq, cuts, [0, seq], position_cost, lambda rows, fixed: fixed + rows * seq * position_cost(0, 1))
        kv_parts, state_parts = self._run_segments(inputs, site, block_site, segments, last, start, 0)
        kv_segments = [segment for segment in segments if segment.start < start]

        def gathered(j: int, which: int) -> Tensor:
            return gather_segments([kv_parts[s][j][which] for s in range(len(kv_segments))], kv_segments, None, dim=2)[:, :, :start]

        later = range(block_site.index + 1, len(block_site.stack))
        return KeyValuePrefix(
            states=gather_segments(state_parts, segments, None, dim=1),
            keys=tuple(gathered(j, 0) for j in later),
            values=tuple(gathered(j, 1) for j in later),
            start=start,
            first_block=block_site.index + 1,
            n_blocks=len(block_site.stack),
        )

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
        start = int(read.min()) if read.numel() else 0
        if start == 0:
            return self.activations(inputs, site, positions)
        end = int(read.max()) + 1

        def position_cost(a: int, b: int) -> float:
            # A segment holding a read position runs the site's block whole, at every position.
            return block_site.index + (1 if b > start else KEY_VALUE_SHARE)

        def plain_cost(rows: int, fixed: float) -> float:
            return 2 * fixed + rows * (start * position_cost(0, 1) + (end - start) * (block_site.index + 1))

        # Plainly two runs: the positions before the first read one only until the site's block
        # has stored their keys and values, then the rest to the site's output.
        segments = self._read_segments(inputs, end, cuts, [0, start, end], position_cost, plain_cost)
        _, state_parts = self._run_segments(inputs, site, block_site, segments, block_site.index, 0, start)
        states = torch.cat(
            [
                part.index_select(0, segment.group_of_row.to(part.device))
                if part is not None
                else _zeros_for(state_parts, segment, positions.shape[0])
                for part, segment in zip(state_parts, segments, strict=True)
            ],
            dim=1,
        )
        return gather_rows(states, positions, site)

    def _read_segments(
        self,
        inputs: ModelInputs,
        end: int,
        cuts: Sequence[int] | None,
        plain_cuts: list[int],
        position_cost: Callable[[int, int], float],
        plain_cost: Callable[[int, float], float],
    ) -> list[Segment]:
        """The segments a read of positions ``0..end-1`` runs in: the plain reads (``plain_cuts``,
        every row its own group) unless :meth:`_shared_prefix_segments` finds groups."""
        segments = self._shared_prefix_segments(inputs, end, cuts, position_cost, plain_cost)
        return one_group_per_row(_tokens_and_mask(inputs)[0].shape[0], plain_cuts) if segments is None else segments

    def _shared_prefix_segments(
        self,
        inputs: ModelInputs,
        end: int,
        cuts: Sequence[int] | None,
        position_cost: Callable[[int, int], float],
        plain_cost: Callable[[int, float], float],
    ) -> list[Segment] | None:
        """The segments a read of positions ``0..end-1`` runs in, or ``None`` for the plain reads:
        where rows share enough of their prompts' beginnings (or ``cuts`` says where), for token
        inputs (and a 2-d attention mask) of a model whose cache layers are all plain ones (a
        sliding-window layer keeps only its window: its keys from positions cut apart are not
        the ones a full run keeps, unless the window holds every position read).
        ``position_cost(a, b)``: the blocks a segment ``[a, b)`` runs per position;
        ``plain_cost(rows, run_cost)``: the plain reads' cost (see :func:`plan_segments`)."""
        if end <= 1:
            return None
        if self._cache_layers_from_config:
            window = getattr(getattr(self.model, "config", None), "sliding_window", None)
            if not isinstance(window, int) or end > window:
                return None
        if isinstance(inputs, Mapping) and set(inputs) - {"input_ids", "attention_mask"}:
            return None
        tokens, mask = _tokens_and_mask(inputs)
        if tokens.dim() != 2 or tokens.is_floating_point() or (isinstance(inputs, Mapping) and "attention_mask" in inputs and mask is None):
            return None
        columns = prefix_columns(tokens[:, :end].cpu(), None if mask is None else mask[:, :end].cpu())
        if cuts is None:
            fixed = run_cost(tokens.device)
            cuts = plan_segments(distinct_prefix_counts(columns), end, position_cost, plain_cost(tokens.shape[0], fixed), fixed)
        else:
            cuts = [int(c) for c in cuts]
            if cuts[0] != 0 or cuts[-1] != end or any(b <= a for a, b in zip(cuts, cuts[1:])):
                raise ValueError(f"{self.name}: cuts must rise from 0 to {end} (the positions read); got {cuts}")
        return None if len(cuts) == 2 else prefix_groups(columns, cuts)

    def _run_segments(
        self, inputs: ModelInputs, site: str, block_site: BlockSite, segments: list[Segment], last_layer: int, kv_until: int, states_from: int
    ) -> tuple[list[dict[int, tuple[Tensor, Tensor]]], list[Tensor | None]]:
        """Run each segment once per group, without gradient, attending to the keys and values of
        its group's earlier segments. A segment starting before ``kv_until`` stores every block's
        keys and values up to ``last_layer``, the others up to the site's block; one ending after
        ``states_from`` also gives the site's states. Returns, per segment, each block's keys and
        values (``(groups, kv_heads, length, head_dim)``) and the states (``(groups, length,
        width)``, or ``None``)."""
        from transformers import DynamicCache

        tokens = _tokens_and_mask(inputs)[0]
        kv_parts: list[dict[int, tuple[Tensor, Tensor]]] = []
        state_parts: list[Tensor | None] = []
        # Caches are built from the config where that gives other layer kinds (sliding windows).
        config = getattr(self.model, "config", None) if self._cache_layers_from_config else None
        for index, segment in enumerate(segments):
            first = segment.first_row.to(tokens.device)
            chosen = inputs[first] if isinstance(inputs, Tensor) else {name: value[first] for name, value in inputs.items()}
            args, kwargs = _call_until(*self._call_arguments(chosen), segment.end)
            stop_layer = last_layer if segment.start < kv_until else block_site.index
            want_states = segment.end > states_from
            if segment.start == 0:
                cache = DynamicCache(config=config)
            else:
                earlier = segments[:index]

                def past(layer: int, which: int) -> Tensor:
                    return gather_segments([kv_parts[s][layer][which] for s in range(index)], earlier, segment.first_row, dim=2)

                cache = DynamicCache(ddp_cache_data=[(past(j, 0), past(j, 1)) for j in range(stop_layer + 1)], config=config)
                args, kwargs = _call_from(args, kwargs, segment.start, self._forward_parameters)
            kwargs[self._cache_argument()] = cache
            outputs: list[Any] = []

            def read_site(module: nn.Module, args: Any, output: Any, stop_layer: int = stop_layer, outputs: list[Any] = outputs) -> None:
                outputs.append(output)
                if stop_layer == block_site.index:
                    raise StopForward  # its keys and values were stored before its output

            def stop(module: nn.Module, args: Any) -> None:
                raise StopForward

            handed = _recording_updates(
                cache, lambda layer, stop_layer=stop_layer, want=want_states, outputs=outputs: layer == stop_layer and (bool(outputs) or not want)
            )
            handles = [self.output_module().register_forward_pre_hook(stop)]
            if want_states:
                handles.append(block_site.stack[block_site.index].register_forward_hook(read_site))
            self._run_until_stopped(args, kwargs, handles)
            del cache.update  # the instance attribute: the class's update again
            missing = [j for j in range(stop_layer + 1) if j not in handed]
            if missing or (want_states and len(outputs) != 1):
                raise SiteError(
                    f"{self.name}: a run of positions {segment.start}..{segment.end - 1} stored no keys and values "
                    f"for blocks {missing}" if missing else f"{self.name}: block {block_site.index} ran {len(outputs)} times in one run"
                )
            if outputs:
                self._resumer.learn_output(site, outputs[0])
            kv_parts.append({j: (key.detach(), value.detach()) for j, (key, value) in handed.items() if j <= stop_layer})
            state_parts.append(hidden_of(outputs[0]).detach() if outputs else None)
        return kv_parts, state_parts

    def _run_until_stopped(self, args: tuple[Any, ...], kwargs: dict[str, Any], handles: list[Any]) -> None:
        """One untraced forward with ``use_cache=True`` and without gradient, which a hook may end
        early with :class:`StopForward`; ``handles`` (those hooks) are removed after it."""
        try:
            with torch.no_grad(), explaining_inference_weights(self.model, self.name):
                self._envoy.trace(*args, trace=False, use_cache=True, **kwargs)
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()

    def _run_from_key_values(
        self, inputs: ModelInputs, site: str, prefix: KeyValuePrefix, positions: Tensor, replace: Replacement
    ) -> Tensor:
        """The resumed run over positions ``prefix.start..`` only, attending to the cached keys and values."""
        from transformers import DynamicCache

        block_site = self._resumable(site, inputs)
        written = positions[positions >= 0]
        if written.numel() and int(written.min()) < prefix.start:
            raise ValueError(
                f"{self.name}: this prefix holds keys and values up to position {prefix.start}, but the interchange "
                f"writes position {int(written.min())}; build it with a start at or before the first written position"
            )
        replacement = RowReplacementHook(positions, replace, site, self.model, self.name)
        states = replacement(prefix.states)[:, prefix.start :]
        # The blocks up to the site are stood in for and never read their entries; each
        # still needs one of the prefix's length, from which the model counts positions.
        filler = prefix.states.new_zeros(prefix.states.shape[0], 1, prefix.start, 1)
        entries = [(filler, filler)] * prefix.first_block + list(zip(prefix.keys, prefix.values))
        # Built from the config only where that gives other layer kinds (sliding windows):
        # reading the config is most of the construction's 0.25 ms, a step's 2-3% here.
        config = getattr(self.model, "config", None) if self._cache_layers_from_config else None
        cache = DynamicCache(ddp_cache_data=entries, config=config)
        args, kwargs = _call_from(*self._call_arguments(inputs), prefix.start, self._forward_parameters)
        kwargs[self._cache_argument()] = cache
        run = lambda: self._logits_fn(self._envoy.trace(*args, trace=False, use_cache=True, **kwargs))  # noqa: E731
        if site not in self._resumer.outputs:
            self.prefix(inputs, site)  # once, to learn the block's output shape
        with (
            explaining_inference_weights(self.model, self.name),
            left_padded_unembedding(self.output_module(), prefix.start),
            resumed_at(block_site, states, self._resumer.outputs[site]),
        ):
            logits = run()
        replacement.check_gradient_reached(logits)
        return logits

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
        tokens, _ = _tokens_and_mask(inputs)
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
        tokens, attention_mask = _tokens_and_mask(inputs)
        if (
            attention_mask is not None
            and attention_mask.shape == tokens.shape[:2]
            and "position_ids" not in kwargs
            and "position_ids" in self._forward_parameters
        ):
            position_ids = _left_padding_position_ids(attention_mask)
            if position_ids is not None:
                kwargs["position_ids"] = position_ids
        return (), kwargs


# -- helpers ---------------------------------------------------------------------------


def _call_from(
    args: tuple[Any, ...], kwargs: dict[str, Any], start: int, parameters: Mapping[str, inspect.Parameter]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call arguments for a run of positions ``start..`` after cached ones: the tokens and
    position ids cut there, and the whole sequence's attention mask (ones where the inputs had
    none: otherwise input preparation, as nnsight's TransformersModel does, makes a mask of the
    suffix's length). Token ids go by name where the forward names them, so the mask can join."""
    if args and "input_ids" in parameters:
        args, kwargs = (), {"input_ids": args[0], **kwargs}
    tokens = args[0] if args else _tokens_and_mask(kwargs)[0]
    if "attention_mask" not in kwargs and "attention_mask" in parameters:
        kwargs = {**kwargs, "attention_mask": torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)}

    def cut(name: str | None, value: Any) -> Any:
        if name == "attention_mask" or not isinstance(value, Tensor) or value.dim() < 2 or value.shape[1] != tokens.shape[1]:
            return value
        return value[:, start:]

    return tuple(cut(None, a) for a in args), {name: cut(name, value) for name, value in kwargs.items()}


def _recording_updates(cache: Any, stop_after: Callable[[int], bool]) -> dict[int, tuple[Tensor, Tensor]]:
    """Each layer's keys and values as its block hands them to ``cache`` (a sliding-window layer
    keeps only its window's last positions), recorded by wrapping ``cache.update``; the run ends
    with :class:`StopForward` once a layer for which ``stop_after(layer)`` has been stored."""
    update = cache.update
    handed: dict[int, tuple[Tensor, Tensor]] = {}

    def update_then_stop(key: Tensor, value: Tensor, *rest: Any, **options: Any) -> Any:
        stored = update(key, value, *rest, **options)
        layer = rest[0] if rest else options.get("layer_idx")
        if isinstance(layer, int):
            handed[layer] = (key, value)
            if stop_after(layer):
                raise StopForward
        return stored

    cache.update = update_then_stop
    return handed


def _zeros_for(state_parts: list[Tensor | None], segment: Segment, rows: int) -> Tensor:
    """Zeros standing for a segment's states that nothing reads (positions before the first read one)."""
    like = next(part for part in state_parts if part is not None)
    return like.new_zeros(rows, segment.end - segment.start, *like.shape[2:])


def _call_until(args: tuple[Any, ...], kwargs: dict[str, Any], stop: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call arguments for a run of positions ``0..stop-1`` only: every ``(batch, seq, ...)``
    argument (tokens, attention mask, position ids) cut there."""
    tokens = args[0] if args else _tokens_and_mask(kwargs)[0]

    def cut(value: Any) -> Any:
        if not isinstance(value, Tensor) or value.dim() < 2 or value.shape[1] != tokens.shape[1]:
            return value
        return value[:, :stop]

    return tuple(cut(a) for a in args), {name: cut(value) for name, value in kwargs.items()}


def _tokens_and_mask(inputs: ModelInputs) -> tuple[Tensor, Tensor | None]:
    """The ``(batch, seq, ...)`` input tensor and the 2-d attention mask, if any."""
    tokens, mask = tokens_and_mask(inputs)
    return tokens, mask if mask is not None and mask.dim() == 2 else None


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


def _left_padding_position_ids(attention_mask: Tensor) -> Tensor | None:
    """Positions counted from each row's first real token, for rows whose padding precedes a token.

    Other rows keep ``0..seq-1``; ``None`` when no row needs the correction.
    """
    mask = attention_mask.long()
    counted = (mask.cumsum(-1) - 1).clamp(min=0)
    default = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    shifted = ((counted != default) & (mask != 0)).any(dim=1, keepdim=True)
    if not bool(shifted.any()):
        return None
    return torch.where(shifted, counted, default)


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
