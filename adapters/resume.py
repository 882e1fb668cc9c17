"""Prefix caching: resume a forward pass at the output of a block, from its cached states.

The base run up to a site does not depend on the alignment. When the site is the
output of block ``i`` of a stack (an ``nn.ModuleList`` the model's forward walks in
order, each block once: ``model.layers`` of a Hugging Face decoder, ``blocks`` of
TransformerLens), that output, ``(batch, seq, width)``, can be computed once
(:func:`block_output`) and the forward resumed from it any number of times
(:func:`resumed_at`): for the duration of one call, blocks ``0..i-1`` pass their
input through untouched and block ``i`` returns the cached states (with the
replacement written in), so the model's own forward still builds the attention
masks, position ids and rotary embeddings the later blocks get, per layer type
(Gemma-3's sliding-window and global layers included), and runs the later blocks,
the final norm and the unembedding exactly as a full run does. The blocks are
stood in for by swapping their ``forward`` (the modules themselves, and
attributes the model's forward may read from them, stay in place), and always
restored.

Exact when the blocks after ``i`` depend on the earlier ones only through the
residual stream (true of Llama, Gemma-3, GPT-2 and TransformerLens models; not of
models that share key/value caches across layers). :func:`check_resume_exact` tests
that on one batch, so a caller can fall back to full runs.

The adapters expose this as an optional capability, beside the protocol:
``supports_prefix(site)``, ``prefix(inputs, site)`` (the states, no gradient)
and ``run_from_prefix(inputs, site, prefix, positions, replace)`` (logits, as
``run_with_replacement`` gives them). The inputs are still passed, for the masks
and positions; only the embedding (a lookup) runs before the resumed block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import ModelInputs, Replacement, RowReplacementHook, SiteError, StopForward, with_first_argument


@dataclass(frozen=True)
class BlockSite:
    """Where a site sits in a block stack: ``stack[index]`` outputs it."""

    stack: nn.ModuleList
    index: int


def find_block(model: nn.Module, block: nn.Module) -> BlockSite | None:
    """The ``ModuleList`` of ``model`` holding ``block`` and its index there, or ``None``."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for index, child in enumerate(module):
                if child is block:
                    return BlockSite(module, index)
    return None


class _Output:
    """How a block shapes its output: a tensor, or a tuple whose element 0 is the hidden states."""

    def __init__(self, output: Any) -> None:
        self.tuple_length = len(output) if isinstance(output, tuple) else None

    def wrap(self, hidden: Tensor) -> Any:
        if self.tuple_length is None:
            return hidden
        return (hidden,) + (None,) * (self.tuple_length - 1)


def hidden_of(output: Any) -> Tensor:
    """A block output's hidden states: the output, or its element 0."""
    return output[0] if isinstance(output, tuple) else output


def block_output(block_site: BlockSite, run: Callable[[], Any]) -> tuple[Tensor, _Output]:
    """The states block ``index`` outputs in ``run()`` (which is stopped there), and its output's shape.

    ``run`` is the model's forward on the inputs, as the adapter calls it.
    """
    found: list[tuple[Tensor, _Output]] = []

    def capture(module: nn.Module, args: Any, output: Any) -> None:
        found.append((hidden_of(output).detach(), _Output(output)))
        raise StopForward

    handle = block_site.stack[block_site.index].register_forward_hook(capture)
    try:
        with torch.no_grad():
            run()
    except StopForward:
        pass
    finally:
        handle.remove()
    if not found:
        raise SiteError(f"block {block_site.index} of the stack did not run in the forward pass")
    return found[0]


class _StandIn:
    """A block's ``forward`` for one resumed call: pass the input through, or return ``states``."""

    def __init__(self, output: _Output, states: Tensor | None) -> None:
        self.output, self.states, self.calls = output, states, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.states is not None:
            return self.output.wrap(self.states)
        hidden = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
        return self.output.wrap(hidden)


@contextlib.contextmanager
def resumed_at(block_site: BlockSite, states: Tensor, output: _Output) -> Iterator[None]:
    """Within the block, the model's forward resumes at block ``index``'s output ``states``."""
    blocks = [block_site.stack[j] for j in range(block_site.index + 1)]
    stand_ins = [_StandIn(output, None) for _ in blocks[:-1]] + [_StandIn(output, states)]
    # An instance attribute ``forward`` (accelerate's hooks set one) is put back as it was.
    saved = [vars(block).get("forward") for block in blocks]
    # object's own set and delete: wrappers such as TransformerLens's bridge components
    # forward attribute writes to the module they wrap.
    try:
        for block, stand_in in zip(blocks, stand_ins):
            object.__setattr__(block, "forward", stand_in)
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                object.__delattr__(block, "forward")
            else:
                object.__setattr__(block, "forward", forward)
    ran = [stand_in.calls for stand_in in stand_ins]
    if any(calls != 1 for calls in ran):
        raise SiteError(
            f"resuming at block {block_site.index}: the blocks before it ran {ran} times, not once each in order; "
            "this model's forward does not walk its block stack as prefix caching needs (use prefix_cache=False)"
        )


class Resumer:
    """An adapter's prefix and resumed runs; remembers how each site's block shapes its output."""

    def __init__(self) -> None:
        self.outputs: dict[str, _Output] = {}

    def learn_output(self, site: str, output: Any) -> None:
        """Remember how the block at ``site`` shapes its output (from one output of it)."""
        self.outputs.setdefault(site, _Output(output))

    def prefix(self, block_site: BlockSite, site: str, run: Callable[[], Any]) -> Tensor:
        """The ``(batch, seq, width)`` states at the block's output, without gradient; ``run()`` stops there."""
        states, self.outputs[site] = block_output(block_site, run)
        return states

    def resume(
        self, block_site: BlockSite, site: str, prefix: Tensor, replacement: RowReplacementHook, run: Callable[[], Tensor]
    ) -> Tensor:
        """Logits of ``run()`` resumed at the block's output: ``prefix`` with ``replacement`` applied."""
        if site not in self.outputs:
            self.prefix(block_site, site, run)  # once, to learn the block's output shape
        states = replacement(prefix)
        with resumed_at(block_site, states, self.outputs[site]):
            logits = run()
        replacement.check_gradient_reached(logits)
        return logits


def check_prefix(prefix: Tensor | KeyValuePrefix, inputs_shape: tuple[int, ...], width: int, site: str) -> None:
    """Refuse a prefix that is not ``(batch, seq, width)`` for these inputs (the states of a :class:`KeyValuePrefix`)."""
    if isinstance(prefix, KeyValuePrefix):
        prefix = prefix.states
    if not isinstance(prefix, Tensor) or prefix.dim() != 3 or tuple(prefix.shape) != (*inputs_shape[:2], width):
        got = tuple(prefix.shape) if isinstance(prefix, Tensor) else type(prefix).__name__
        raise ValueError(
            f"the prefix for {site!r} must be the (batch, seq, width) = {(*inputs_shape[:2], width)} states that "
            f"prefix(inputs, {site!r}) gives for these inputs; got {got}"
        )


def check_resume_exact(
    adapter: Any, inputs: ModelInputs, site: str, positions: Tensor, replace: Replacement, tolerance: float = 1e-4
) -> float:
    """Largest absolute difference of resumed and full logits on ``inputs``; raises if above ``tolerance``.

    Relative to the logits' scale (``tolerance * max(1, max |logit|)``).
    """
    with torch.no_grad():
        full = adapter.run_with_replacement(inputs, site, positions, replace)
        resumed = adapter.run_from_prefix(inputs, site, adapter.prefix(inputs, site), positions, replace)
    difference = float((full.float() - resumed.float()).abs().max())
    scale = max(1.0, float(full.float().abs().max()))
    if not difference <= tolerance * scale:
        raise SiteError(
            f"resuming at {site!r} from cached states gives logits {difference:.3g} away from the full run's; "
            "this model's later blocks depend on more than the residual stream at the site"
        )
    return difference


# -- keys and values before the first changed position (Hugging Face caches) -------------------


@dataclass(frozen=True)
class KeyValuePrefix:
    """A prefix (:meth:`prefix`'s states) with the later blocks' keys and values before ``start``.

    An interchange at a block's output changes no position before the first one it
    writes, and in a causal model nothing at a position depends on later ones: so
    when every written position and every labelled position of a dataset is at or
    after ``start``, each step need only run positions ``start..seq-1`` through the
    blocks after the site, attending to the cached keys and values of the earlier
    ones (a Hugging Face ``past_key_values`` cache), instead of all ``seq`` positions.
    The logits before ``start`` are then zero; nothing reads them, since no label lies there.

    ``keys[j]`` / ``values[j]``: ``(rows, kv_heads, start, head_dim)`` of block
    ``first_block + j`` of the ``n_blocks`` in the stack (the blocks up to the site
    are stood in for and never read theirs). Rows are gathered with ``[index]`` and
    moved with ``.to(device)``, as a plain prefix tensor is.
    """

    states: Tensor
    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    start: int
    first_block: int
    n_blocks: int

    @property
    def shape(self) -> torch.Size:
        return self.states.shape

    def tensors(self) -> tuple[Tensor, ...]:
        """Every per-row tensor: the states, then the keys, then the values."""
        return (self.states, *self.keys, *self.values)

    def with_tensors(self, parts: list[Tensor] | tuple[Tensor, ...]) -> KeyValuePrefix:
        """The same prefix over other per-row tensors, in :meth:`tensors`' order."""
        n = len(self.keys)
        return KeyValuePrefix(parts[0], tuple(parts[1 : 1 + n]), tuple(parts[1 + n :]), self.start, self.first_block, self.n_blocks)

    def with_start(self, start: int) -> KeyValuePrefix:
        """The same prefix with keys and values up to an earlier ``start`` only (views, no copy)."""
        if not 0 < start <= self.start:
            raise ValueError(f"a prefix with keys and values up to position {self.start} cannot start at {start}")
        keys = tuple(k[:, :, :start] for k in self.keys)
        values = tuple(v[:, :, :start] for v in self.values)
        return KeyValuePrefix(self.states, keys, values, start, self.first_block, self.n_blocks)

    def __getitem__(self, index: Tensor) -> KeyValuePrefix:
        return self.with_tensors([t[index] for t in self.tensors()])

    def to(self, device: torch.device | str) -> KeyValuePrefix:
        return self.with_tensors([t.to(device) for t in self.tensors()])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


@contextlib.contextmanager
def left_padded_unembedding(module: nn.Module, start: int) -> Iterator[None]:
    """Within the block, ``module`` (the unembedding) gets its ``(batch, L, width)`` input with
    ``start`` zero rows in front, so that a run of positions ``start..`` yields logits
    laid out as a full run's. Registered first: :func:`adapters.base.logits_only_at`
    then gathers label positions as in a full run."""

    def padded(hidden: Tensor) -> Tensor:
        return torch.cat([hidden.new_zeros(hidden.shape[0], start, *hidden.shape[2:]), hidden], dim=1)

    def pad(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return with_first_argument(args, kwargs, padded)

    handle = module.register_forward_pre_hook(pad, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()
