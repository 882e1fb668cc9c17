"""Runs of a Hugging Face causal language model over a key/value cache, for any adapter wrapping one.

An interchange at a block's output changes nothing before the first position it
writes, and in a causal model no position depends on later ones. So the keys and
values of positions before that one can be computed once per row and each step can
run only the positions from there on (:class:`masalign.adapters.resume.KeyValuePrefix`);
a read of a late position can likewise run the earlier positions only as far as
their keys and values. Rows whose prompts begin alike run those positions once
(:mod:`masalign.adapters.shared_prefix`).

:class:`KeyValueRuns` does these runs for an adapter, given the Hugging Face model
(whose forward takes ``cache`` or ``past_key_values``), how to call it, and the
adapter's :class:`masalign.adapters.resume.Resumer`. The nnsight adapter calls the
model through nnsight's input preparation; the TransformerLens adapter calls a
``TransformerBridge``'s ``original_model``, whose layers are the bridge's blocks.
Nothing here depends on either library.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import (
    TOKEN_KEYS,
    ModelInputs,
    Replacement,
    RowReplacementHook,
    SiteError,
    StopForward,
    explaining_inference_weights,
    gather_rows,
    tokens_and_mask,
)
from .resume import BlockSite, KeyValuePrefix, Resumer, hidden_of, left_padded_unembedding, resumed_at
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

CallArguments = tuple[tuple[Any, ...], dict[str, Any]]


class KeyValueRuns:
    """Cached-key/value runs of ``model`` for one adapter.

    Args:
        model: the Hugging Face model (its ``config`` and the parameters of its ``forward``).
        name: the model's name in error messages.
        forward: one untraced forward, ``forward(*args, **kwargs)`` -> the model's output.
        call_arguments: ``inputs`` -> ``(args, kwargs)`` for ``forward`` (token ids, the
            attention mask, position ids for left-padded rows).
        logits_fn: the ``(batch, seq, vocab)`` logits of ``forward``'s output.
        output_module: the unembedding (a run that only needs keys and values stops before it).
        resumer: the adapter's :class:`Resumer` (it knows each site block's output shape).
        plain_prefix: the adapter's ``prefix(inputs, site)``, run once per site to learn that shape.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        forward: Callable[..., Any],
        call_arguments: Callable[[ModelInputs], CallArguments],
        logits_fn: Callable[[Any], Tensor],
        output_module: Callable[[], nn.Module | None],
        resumer: Resumer,
        plain_prefix: Callable[[ModelInputs, str], Tensor],
    ) -> None:
        self.model = model
        self.name = name
        self._forward = forward
        self._call_arguments = call_arguments
        self._logits_fn = logits_fn
        self._output_module = output_module
        self._resumer = resumer
        self._plain_prefix = plain_prefix

    def supported(self) -> bool:
        """Whether the model's forward takes a key/value cache (``cache`` or ``past_key_values``)
        and the model has an output embedding."""
        return self.cache_argument() is not None and self._output_module() is not None

    @functools.cached_property
    def forward_parameters(self) -> Mapping[str, inspect.Parameter]:
        """The model's forward's parameters (read once: steps ask for them)."""
        return inspect.signature(self.model.forward).parameters

    @functools.cached_property
    def _cache_layers_from_config(self) -> bool:
        """Whether the model's key/value cache has layers other than plain ``DynamicLayer`` ones."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=getattr(self.model, "config", None)).layers
        return not layers or any(type(layer) is not DynamicLayer for layer in layers)

    def cache_argument(self) -> str | None:
        """The forward's key/value cache argument: ``cache`` (transformers >= 5.20) or ``past_key_values``."""
        return next((name for name in ("cache", "past_key_values") if name in self.forward_parameters), None)

    # -- the three reads -------------------------------------------------------------

    def prefix(self, inputs: ModelInputs, site: str, block_site: BlockSite, start: int, cuts: Sequence[int] | None = None) -> KeyValuePrefix:
        """The states at ``site`` and the keys and values of the blocks after it at positions
        ``0..start-1`` (see the adapters' ``key_value_prefix``), without gradient."""
        seq = tokens_and_2d_mask(inputs)[0].shape[1]
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

    def activations(self, inputs: ModelInputs, site: str, block_site: BlockSite, positions: Tensor, cuts: Sequence[int] | None = None) -> Tensor:
        """The states at ``site`` at ``positions`` (the first read one after position 0), from two
        shorter runs: the positions before the first read one only until the site's block has
        stored their keys and values, then the positions from it on up to the site."""
        read = positions[positions >= 0]
        start = int(read.min()) if read.numel() else 0
        if start == 0:
            raise ValueError(f"{self.name}: a key/value read needs its first read position after position 0")
        end = int(read.max()) + 1

        def position_cost(a: int, b: int) -> float:
            # A segment holding a read position runs the site's block whole, at every position.
            return block_site.index + (1 if b > start else KEY_VALUE_SHARE)

        def plain_cost(rows: int, fixed: float) -> float:
            return 2 * fixed + rows * (start * position_cost(0, 1) + (end - start) * (block_site.index + 1))

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

    def run_from(
        self, inputs: ModelInputs, site: str, block_site: BlockSite, prefix: KeyValuePrefix, positions: Tensor, replace: Replacement
    ) -> Tensor:
        """The logits of the run with the replacement, over positions ``prefix.start..`` only,
        attending to the prefix's keys and values (the logits before ``prefix.start`` are zero)."""
        from transformers import DynamicCache

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
        args, kwargs = _call_from(*self._call_arguments(inputs), prefix.start, self.forward_parameters)
        kwargs[self.cache_argument()] = cache
        if site not in self._resumer.outputs:
            self._plain_prefix(inputs, site)  # once, to learn the block's output shape
        with (
            explaining_inference_weights(self.model, self.name),
            left_padded_unembedding(self._output_module(), prefix.start),
            resumed_at(block_site, states, self._resumer.outputs[site]),
        ):
            logits = self._logits_fn(self._forward(*args, use_cache=True, **kwargs))
        replacement.check_gradient_reached(logits)
        return logits

    # -- segments --------------------------------------------------------------------

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
        return one_group_per_row(tokens_and_2d_mask(inputs)[0].shape[0], plain_cuts) if segments is None else segments

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
        if isinstance(inputs, Mapping):
            names = set(inputs)
            if len(names & set(TOKEN_KEYS)) != 1 or names - {*TOKEN_KEYS, "attention_mask"}:
                return None
        tokens, mask = tokens_and_2d_mask(inputs)
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

        tokens = tokens_and_2d_mask(inputs)[0]
        kv_parts: list[dict[int, tuple[Tensor, Tensor]]] = []
        state_parts: list[Tensor | None] = []
        # Caches are built from the config where that gives other layer kinds (sliding windows).
        config = getattr(self.model, "config", None) if self._cache_layers_from_config else None
        cache_argument = self.cache_argument()
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
                args, kwargs = _call_from(args, kwargs, segment.start, self.forward_parameters)
            kwargs[cache_argument] = cache
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
            handles = [self._output_module().register_forward_pre_hook(stop)]
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
        """One forward with ``use_cache=True`` and without gradient, which a hook may end early
        with :class:`StopForward`; ``handles`` (those hooks) are removed after it."""
        try:
            with torch.no_grad(), explaining_inference_weights(self.model, self.name):
                self._forward(*args, use_cache=True, **kwargs)
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()


# -- helpers ---------------------------------------------------------------------------


def tokens_and_2d_mask(inputs: ModelInputs) -> tuple[Tensor, Tensor | None]:
    """The ``(batch, seq, ...)`` input tensor and the 2-d attention mask, if any."""
    tokens, mask = tokens_and_mask(inputs)
    return tokens, mask if mask is not None and mask.dim() == 2 else None


def left_padding_position_ids(attention_mask: Tensor) -> Tensor | None:
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


def _call_from(
    args: tuple[Any, ...], kwargs: dict[str, Any], start: int, parameters: Mapping[str, inspect.Parameter]
) -> CallArguments:
    """The call arguments for a run of positions ``start..`` after cached ones: the tokens and
    position ids cut there, and the whole sequence's attention mask (ones where the inputs had
    none: otherwise input preparation, as nnsight's TransformersModel does, makes a mask of the
    suffix's length). Token ids go by name where the forward names them, so the mask can join."""
    if args and "input_ids" in parameters:
        args, kwargs = (), {"input_ids": args[0], **kwargs}
    tokens = args[0] if args else tokens_and_2d_mask(kwargs)[0]
    if "attention_mask" not in kwargs and "attention_mask" in parameters:
        kwargs = {**kwargs, "attention_mask": torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)}

    def cut(name: str | None, value: Any) -> Any:
        if name == "attention_mask" or not isinstance(value, Tensor) or value.dim() < 2 or value.shape[1] != tokens.shape[1]:
            return value
        return value[:, start:]

    return tuple(cut(None, a) for a in args), {name: cut(name, value) for name, value in kwargs.items()}


def _call_until(args: tuple[Any, ...], kwargs: dict[str, Any], stop: int) -> CallArguments:
    """The call arguments for a run of positions ``0..stop-1`` only: every ``(batch, seq, ...)``
    argument (tokens, attention mask, position ids) cut there."""
    tokens = args[0] if args else tokens_and_2d_mask(kwargs)[0]

    def cut(value: Any) -> Any:
        if not isinstance(value, Tensor) or value.dim() < 2 or value.shape[1] != tokens.shape[1]:
            return value
        return value[:, :stop]

    return tuple(cut(a) for a in args), {name: cut(value) for name, value in kwargs.items()}


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
