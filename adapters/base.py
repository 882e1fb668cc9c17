"""The one protocol every model backend implements, and the checks they share.

An adapter turns a model into four operations on named *sites* (hook points):

- ``sites()``: the site names with their widths;
- ``activations(inputs, site, positions)``: read the site at chosen positions;
- ``run_with_replacement(inputs, site, positions, replace)``: run the model with
  the site's activations at those positions replaced by ``replace(...)``, out of
  place and differentiably, and return the logits;
- ``logits(inputs)``: a plain run.

Optional, for prefix caching (:mod:`adapters.resume`; the TransformerLens and
nnsight adapters have it, at a block's output): ``supports_prefix(site)``,
``prefix(inputs, site)`` (the ``(batch, seq, width)`` states there) and
``run_from_prefix(inputs, site, prefix, positions, replace)`` (the logits of
``run_with_replacement``, running only what comes after the site).

Optional, for logits at chosen positions only: ``output_module()``, the module
that turns the final ``(batch, seq, width)`` states into logits (the
unembedding), or ``None``. Within :func:`logits_only_at` it sees only the rows
at the given positions, so the model returns ``(batch, n, vocab)`` logits: with
a 262,144-token vocabulary the unembedding costs more than a late layer's
blocks, and a loss needs it only where there are labels.

Shapes, once for the whole library (samples are rows):

- ``inputs``: a ``(batch, seq)`` tensor of token ids (or ``(batch, seq, features)``),
  or a mapping of such tensors (``{"input_ids": ..., "attention_mask": ...}``);
- ``positions``: ``(batch, n_slots)`` long; slot ``j`` of example ``b`` is
  intervened at sequence position ``positions[b, j]``, or nowhere where it is
  ``EMPTY_SLOT`` (-1: rows with fewer slots than the batch's widest);
- activations: ``(batch, n_slots, width)``;
- logits: ``(batch, seq, vocab)``.

A :data:`Replacement` receives only the rows being intervened on, so one
signature serves position-indexed models (all rows at once) and recurrent ones
(the rows of one time step at a time, in time order)::

    replace(hidden, example_index, slot_index) -> new_hidden
    hidden: (n_rows, width); example_index, slot_index: (n_rows,) long

The shared pieces, so that every backend checks and patches the same way:
:func:`check_inputs` (token ids inside the vocabulary, the context length, the
attention mask's shape, and the positions through :func:`check_positions`:
shape, range, repeats, padding), each error naming the row of ``inputs`` at
fault, so that an adapter's ``check_inputs(inputs, positions)`` on a whole
dataset names the dataset's row; :func:`gather_rows` and :func:`replace_rows`
(read and out-of-place write of a position-indexed ``(batch, seq, *features)``
activation); :class:`ObservedReplacement` (``replace`` with its result checked,
:func:`refuse_inference_weights`, and a check that the gradient reached the
logits) and :class:`RowReplacementHook` (``replace_rows`` for a hook that must
fire once); :func:`probing` (eval mode and no gradient for a probing run, every
module's flag restored); :func:`logits_from_output`.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, Union, runtime_checkable

import torch
from torch import Tensor, nn

ModelInputs = Union[Tensor, Mapping[str, Tensor]]
# A slot with no position (``positions[b, j] == EMPTY_SLOT``): nothing is read or
# written there. Rows of one batch may then intervene at different numbers of
# positions, e.g. the stepwise protocol's prefixes of different lengths.
EMPTY_SLOT = -1
Replacement = Callable[[Tensor, Tensor, Tensor], Tensor]


@runtime_checkable
class ModelAdapter(Protocol):
    """What the MAS core needs from a model; see the module docstring for shapes."""

    @property
    def model(self) -> nn.Module: ...

    @property
    def device(self) -> torch.device: ...

    def sites(self) -> dict[str, int]:
        """Site name -> width of the activation vector there."""
        ...

    def activations(self, inputs: ModelInputs, site: str, positions: Tensor) -> Tensor:
        """``(batch, n_slots, width)`` activations at ``site`` and ``positions``."""
        ...

    def run_with_replacement(
        self, inputs: ModelInputs, site: str, positions: Tensor, replace: Replacement
    ) -> Tensor:
        """Logits ``(batch, seq, vocab)`` with the site replaced at ``positions``."""
        ...

    def logits(self, inputs: ModelInputs) -> Tensor:
        """Logits ``(batch, seq, vocab)`` of a plain run."""
        ...


class SiteError(ValueError):
    """A site name that the model does not have, or that cannot be used."""


def unknown_site_error(site: str, valid: Mapping[str, int] | list[str], model_name: str = "model") -> SiteError:
    """Error naming the unknown site, its closest matches and every valid site."""
    names = list(valid)
    close = difflib.get_close_matches(site, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    listing = ", ".join(names) if len(names) <= 40 else ", ".join(names[:40]) + f", ... ({len(names)} in all)"
    return SiteError(f"{model_name} has no site {site!r}.{hint} Valid sites: {listing}")


def batch_size_of(inputs: ModelInputs) -> int:
    return first_tensor(inputs).shape[0]


def first_tensor(inputs: ModelInputs) -> Tensor:
    if isinstance(inputs, Tensor):
        return inputs
    if isinstance(inputs, Mapping) and inputs:
        return next(iter(inputs.values()))
    raise TypeError(f"inputs must be a tensor or a non-empty mapping of tensors, got {type(inputs).__name__}")


def check_positions(
    positions: Tensor,
    batch: int,
    seq_len: int,
    lengths: Tensor | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Validate ``(batch, n_slots)`` positions against the sequence; returns them as long.

    Refused: a shape other than ``(batch, n_slots)``, non-integer dtypes, negative
    positions other than :data:`EMPTY_SLOT`, positions at or past the end of the
    sequence, and a position repeated within one example (each slot needs its own
    row to write to).

    ``lengths`` ``(batch,)`` gives each example's true length when inputs are
    right-padded. ``attention_mask`` ``(batch, seq)`` (any padding side; other
    shapes are ignored) refuses positions on padding (mask 0), naming the span of
    that example's real tokens.
    """
    if not isinstance(positions, Tensor):
        positions = torch.as_tensor(positions)
    if positions.dim() == 1:
        raise ValueError(
            f"positions must be (batch, n_slots); got shape {tuple(positions.shape)}. "
            "For one position per example use positions[:, None]."
        )
    if positions.dim() != 2 or positions.shape[0] != batch:
        raise ValueError(f"positions must have shape (batch={batch}, n_slots); got {tuple(positions.shape)}")
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise TypeError(f"positions must be integer indices, got dtype {positions.dtype}")
    positions = positions.long()
    if positions.numel() == 0:
        return positions
    if int(positions.min()) < EMPTY_SLOT:
        bad = (positions < EMPTY_SLOT).nonzero()[0].tolist()
        raise IndexError(
            f"position {int(positions[bad[0], bad[1]])} of example {bad[0]} is negative; positions index the sequence "
            f"from 0 ({EMPTY_SLOT} marks an empty slot)"
        )
    limit = lengths.to(positions.device)[:, None] if lengths is not None else torch.full_like(positions[:, :1], seq_len)
    outside = positions >= limit
    if bool(outside.any()):
        b, j = outside.nonzero()[0].tolist()
        raise IndexError(
            f"position {int(positions[b, j])} (slot {j}) of example {b} is outside its sequence of length "
            f"{int(limit[b, 0])}; valid positions are 0..{int(limit[b, 0]) - 1}"
        )
    if positions.shape[1] > 1:
        ordered = positions.sort(dim=1).values
        repeats = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != EMPTY_SLOT)).any(1)
        if bool(repeats.any()):
            b = int(repeats.nonzero()[0])
            raise ValueError(f"example {b} repeats a position in {positions[b].tolist()}; each slot needs its own position")
    if attention_mask is not None and attention_mask.dim() == 2:
        real = attention_mask.to(positions.device).bool()
        on_padding = ~real.gather(1, positions.clamp(min=0)) & (positions != EMPTY_SLOT)
        if bool(on_padding.any()):
            b, j = on_padding.nonzero()[0].tolist()
            tokens_at = real[b].nonzero().flatten().tolist()
            span = f"{tokens_at[0]}..{tokens_at[-1]}" if tokens_at else "nowhere (all padding)"
            raise IndexError(
                f"position {int(positions[b, j])} (slot {j}) of example {b} is padding (attention_mask 0); "
                f"that example's tokens are at positions {span} of the padded sequence"
            )
    return positions


def check_positions_for(inputs: Tensor, positions: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """:func:`check_positions` against a ``(batch, seq, ...)`` input tensor; the result is on its device."""
    positions = torch.as_tensor(positions, device=inputs.device)
    seq_len = inputs.shape[1] if inputs.dim() > 1 else 0
    return check_positions(positions, inputs.shape[0], seq_len, attention_mask=attention_mask)


# -- inputs: token ids, context length, attention mask ---------------------------------------

TOKEN_KEYS = ("input_ids", "input", "tokens", "inputs_embeds")


def tokens_and_mask(inputs: ModelInputs) -> tuple[Tensor, Tensor | None]:
    """The ``(batch, seq, ...)`` input tensor of ``inputs`` and its ``attention_mask`` (any shape), if any.

    The tensor is the one under the first of :data:`TOKEN_KEYS` present, else a
    mapping's first tensor.
    """
    if isinstance(inputs, Tensor):
        return inputs, None
    if not isinstance(inputs, Mapping) or not inputs:
        raise TypeError(f"inputs must be a tensor or a non-empty mapping of tensors, got {type(inputs).__name__}")
    key = next((k for k in TOKEN_KEYS if k in inputs), next(iter(inputs)))
    mask = inputs.get("attention_mask")
    return inputs[key], mask if isinstance(mask, Tensor) else None


def check_attention_mask(tokens: Tensor, attention_mask: Tensor | None, model_name: str = "model") -> None:
    """Raise unless the mask is ``(batch, seq)`` like the tokens, or ``(batch, *, seq, seq)``."""
    if attention_mask is None:
        return
    batch, seq_len = tokens.shape[0], tokens.shape[1] if tokens.dim() > 1 else 0
    shape = tuple(attention_mask.shape)
    if shape == (batch, seq_len):
        return
    if len(shape) == 4 and shape[0] == batch and shape[2:] == (seq_len, seq_len):
        return
    raise ValueError(
        f"{model_name}: attention_mask has shape {shape} but the tokens have shape {tuple(tokens.shape[:2])}; "
        f"the mask needs one entry per token, (batch, seq) = {(batch, seq_len)} (1 for a real token, 0 for "
        "padding); build it with the same tokenizer call and padding as the tokens"
    )


def check_token_ids(tokens: Tensor, vocab_size: int | None, model_name: str = "model") -> None:
    """Raise if an integer token id is negative or ``>= vocab_size``, naming its row and position."""
    if vocab_size is None or tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.numel() == 0:
        return
    outside = (tokens < 0) | (tokens >= vocab_size)
    if not bool(outside.any()):
        return
    where = outside.nonzero()[0].tolist()
    rows = outside.reshape(outside.shape[0], -1).any(1).nonzero().flatten().tolist()
    listed = ", ".join(map(str, rows[:10])) + (f", ... ({len(rows)} rows in all)" if len(rows) > 10 else "")
    at = f"row {where[0]}, position {where[1]}" if len(where) > 1 else f"row {where[0]}"
    raise ValueError(
        f"{model_name}: token id {int(tokens[tuple(where)])} at {at} is outside the model's vocabulary of "
        f"{vocab_size} token ids (0..{vocab_size - 1}); rows with such ids: {listed}. Encode the inputs with the "
        "model's own tokenizer or vocabulary (and pad with an id inside it)"
    )


def check_context_length(
    tokens: Tensor, n_ctx: int | None, model_name: str = "model", attention_mask: Tensor | None = None
) -> None:
    """Raise if the inputs are longer than the model's context of ``n_ctx`` positions."""
    seq_len = tokens.shape[1] if tokens.dim() > 1 else 0
    if n_ctx is None or seq_len <= n_ctx:
        return
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape == tokens.shape[:2]:
        lengths = attention_mask.bool().sum(1)
    else:
        lengths = torch.full((tokens.shape[0],), seq_len)
    longest = int(lengths.argmax())
    raise ValueError(
        f"{model_name}: the inputs are {seq_len} positions long (row {longest} has {int(lengths[longest])} tokens) "
        f"but the model's context holds {n_ctx} positions; shorten the prompts to at most {n_ctx} tokens "
        "(truncate them, or drop the longer rows), and remove padding beyond that"
    )


def check_inputs(
    inputs: ModelInputs,
    positions: Tensor | None = None,
    vocab_size: int | None = None,
    n_ctx: int | None = None,
    model_name: str = "model",
) -> Tensor | None:
    """Every input check, on every row; returns the checked positions (long) or ``None``.

    Errors name the row of ``inputs`` at fault: called on a whole dataset, the
    dataset's row.
    """
    tokens, attention_mask = tokens_and_mask(inputs)
    check_attention_mask(tokens, attention_mask, model_name)
    check_token_ids(tokens, vocab_size, model_name)
    check_context_length(tokens, n_ctx, model_name, attention_mask)
    if positions is None:
        return None
    return check_positions_for(tokens, positions, attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None)



def run_context(adapter: Any) -> contextlib.AbstractContextManager[Any]:
    """The adapter's optional ``run_context()``, else a context that does nothing.

    ``fit``, ``evaluate`` and patching enter it for their duration: an adapter may lay out
    its model's own tensors there for faster runs (values unchanged, put back on exit),
    as :class:`TransformerLensAdapter` does with a ``HookedTransformer``'s unembedding.
    """
    enter = getattr(adapter, "run_context", None)
    return enter() if callable(enter) else contextlib.nullcontext()


@contextlib.contextmanager
def probing(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradient for a run that only looks at shapes; each module's mode restored.

    Eval mode keeps the run from changing the model (batch-norm statistics).
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


# -- rows at positions: the read and the out-of-place write of position-indexed sites ---------


def row_index(activation: Tensor, positions: Tensor, site: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(example_index, slot_index, flat_positions)``, each ``(n_rows,)``, on the activation's device.

    Row ``r`` is slot ``slot_index[r]`` of example ``example_index[r]``, at sequence
    position ``flat_positions[r]``; examples are major, as ``positions.reshape(-1)``,
    and empty slots (:data:`EMPTY_SLOT`) have no row.
    """
    batch, n_slots = positions.shape
    if activation.dim() < 3 or activation.shape[0] != batch:
        raise SiteError(
            f"site {site!r} gave an activation of shape {tuple(activation.shape)} for {batch} examples; "
            "expected (batch, seq, width) or (batch, seq, *features)"
        )
    device = activation.device
    example_index = torch.arange(batch, device=device).repeat_interleave(n_slots)
    slot_index = torch.arange(n_slots, device=device).repeat(batch)
    flat_positions = positions.to(device).reshape(-1)
    real = flat_positions != EMPTY_SLOT
    if bool(real.all()):
        return example_index, slot_index, flat_positions
    return example_index[real], slot_index[real], flat_positions[real]


def gather_rows(activation: Tensor, positions: Tensor, site: str) -> Tensor:
    """``(batch, n_slots, width)`` rows of a ``(batch, seq, *features)`` activation; features flattened.

    Empty slots (:data:`EMPTY_SLOT`) read as zeros.
    """
    example_index, slot_index, flat_positions = row_index(activation, positions, site)
    rows = activation[example_index, flat_positions]
    rows = rows.reshape(rows.shape[0], math.prod(activation.shape[2:]))  # not -1: there may be no rows
    if rows.shape[0] == positions.numel():
        return rows.reshape(positions.shape[0], positions.shape[1], -1)
    out = rows.new_zeros((positions.shape[0], positions.shape[1], rows.shape[1]))
    return out.index_put((example_index, slot_index), rows)


def replace_rows(activation: Tensor, positions: Tensor, replace: Replacement, site: str) -> Tensor:
    """A new ``(batch, seq, *features)`` activation whose rows at ``positions`` are ``replace(...)``'s.

    ``replace`` gets the ``(batch * n_slots, width)`` rows (trailing features
    flattened, e.g. heads and ``d_head``) with their example and slot indices and
    must return the same shape. Out of place: ``activation`` is never written to;
    ``index_put`` builds the new tensor, so autograd reaches whatever ``replace``
    used. The new rows are cast to the activation's dtype.
    """
    example_index, slot_index, flat_positions = row_index(activation, positions, site)
    rows = activation[example_index, flat_positions]
    width = math.prod(rows.shape[1:])
    flat_rows = rows.reshape(rows.shape[0], width)
    new_rows = checked_rows(replace(flat_rows, example_index, slot_index), flat_rows, site)
    return activation.index_put((example_index, flat_positions), new_rows.reshape(rows.shape))


def checked_rows(new_rows: Any, rows: Tensor, site: str) -> Tensor:
    """``replace``'s result, refused unless a tensor of ``rows``' shape; cast to ``rows``' dtype and device."""
    if not isinstance(new_rows, Tensor) or new_rows.shape != rows.shape:
        got = tuple(new_rows.shape) if isinstance(new_rows, Tensor) else type(new_rows).__name__
        raise ValueError(
            f"replace() must return a tensor of shape (n_rows, width) = {tuple(rows.shape)} at {site!r}, got {got}; "
            "return the new rows for the rows it was given (`return hidden` leaves them unchanged)"
        )
    return new_rows.to(rows.device, rows.dtype)


# Models whose weights were found to be ordinary tensors: checked once, not in every
# training step (a pass over every parameter, 0.4 ms a step on a 2-layer GPT-2).
# Weights swapped for inference tensors later still fail the forward, and
# explaining_inference_weights then checks again, without this record.
_WEIGHTS_CHECKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def refuse_inference_weights(model: nn.Module, model_name: str, once: bool = True) -> None:
    """Raise if ``model``'s weights are inference tensors, through which no gradient can flow.

    With ``once``, a model found fine before is not checked again."""
    # Inference tensors cannot be saved for backward; torch would fail deep in the
    # forward with no hint of which model or why.
    if once and model in _WEIGHTS_CHECKED:
        return
    if not any(tensor.is_inference() for tensor in model.parameters()):
        _WEIGHTS_CHECKED.add(model)
    else:
        raise RuntimeError(
            f"{model_name}: its weights are inference tensors (created or loaded under "
            "torch.inference_mode()), so gradients cannot flow through it to the alignment; load the model "
            "outside inference_mode (torch.no_grad() is fine)"
        )


@contextlib.contextmanager
def explaining_inference_weights(model: nn.Module, model_name: str) -> Iterator[None]:
    """Torch's failure to save inference tensors for backward, said as :func:`refuse_inference_weights` says it.

    Inference-mode weights that require grad fail every forward pass under
    autograd, before any site is reached.
    """
    try:
        yield
    except Exception as error:
        if "Inference tensors cannot be saved for backward" in str(error):
            try:
                refuse_inference_weights(model, model_name, once=False)
            except RuntimeError as explained:
                raise explained from error
        raise


class ObservedReplacement:
    """``replace`` with its result checked (:func:`checked_rows`) and its gradient watched.

    When ``replace`` returns rows that require grad, it refuses a model whose
    weights are inference tensors (before the forward goes on) and, through
    :meth:`check_gradient_reached` after the forward, a model whose forward
    switches autograd off after the site. Use one instance per forward pass.
    """

    def __init__(self, replace: Replacement, site: str, model: nn.Module, model_name: str) -> None:
        self.replace = replace
        self.site = site
        self.model = model
        self.model_name = model_name
        self.rows_require_grad = False

    def __call__(self, rows: Tensor, example_index: Tensor, slot_index: Tensor) -> Tensor:
        new_rows = self.replace(rows, example_index, slot_index)
        if isinstance(new_rows, Tensor) and new_rows.requires_grad:
            self.rows_require_grad = True
            refuse_inference_weights(self.model, self.model_name)
        return checked_rows(new_rows, rows, self.site)

    def check_gradient_reached(self, logits: Tensor) -> None:
        """Raise if the replacement required grad, grad mode is on, and ``logits`` do not require grad."""
        if self.rows_require_grad and torch.is_grad_enabled() and not logits.requires_grad:
            raise RuntimeError(
                f"{self.model_name}: the replacement at {self.site!r} requires grad but the logits do not: the "
                "model's forward switches autograd off after the site (torch.no_grad or inference_mode inside "
                "forward), so the alignment cannot be trained through it"
            )


class RowReplacementHook:
    """:func:`replace_rows` as a hook body, for a site that must run once per forward pass.

    Beyond :func:`replace_rows`, it refuses a second call in one forward pass and
    watches ``replace`` through :class:`ObservedReplacement`. Use one instance per
    forward pass; after it, :meth:`check_fired` and :meth:`check_gradient_reached`.
    """

    def __init__(self, positions: Tensor, replace: Replacement, site: str, model: nn.Module, model_name: str) -> None:
        self.positions = positions
        self.site = site
        self.model_name = model_name
        self.observed = ObservedReplacement(replace, site, model, model_name)
        self.calls = 0

    @property
    def rows_require_grad(self) -> bool:
        return self.observed.rows_require_grad

    def __call__(self, activation: Tensor) -> Tensor:
        """The new ``(batch, seq, *features)`` activation."""
        self.calls += 1
        if self.calls > 1:
            raise SiteError(
                f"{self.model_name}: site {self.site!r} was reached a second time in one forward pass; "
                "a replacement at positions needs a site that runs once"
            )
        return replace_rows(activation, self.positions, self.observed, self.site)

    def check_fired(self) -> None:
        """Raise if the site never ran, so that ``replace`` was never applied."""
        if self.calls == 0:
            raise site_did_not_run(self.model_name, self.site)

    def check_gradient_reached(self, logits: Tensor) -> None:
        self.observed.check_gradient_reached(logits)


def site_did_not_run(model_name: str, site: str) -> SiteError:
    return SiteError(
        f"{model_name}: site {site!r} did not run in the forward pass on these inputs (its hook never fired), so "
        "nothing was read or replaced there; choose a site on the path these inputs take through the model"
    )


# -- outputs ------------------------------------------------------------------------------------


class StopForward(Exception):
    """Raised from inside a model's forward pass once everything to be read has been read."""


def with_first_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], change: Callable[[Any], Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A forward pre-hook's ``(args, kwargs)`` with the module's first argument (positional, or
    else the first keyword) replaced by ``change(it)``."""
    if args:
        return (change(args[0]), *args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: change(kwargs[key])}


@contextlib.contextmanager
def logits_only_at(module: nn.Module, positions: Tensor) -> Iterator[None]:
    """Within the block, ``module`` (a model's unembedding) sees only the rows at ``positions``.

    ``positions`` ``(batch, n)``: the model's logits come out ``(batch, n, vocab)``,
    row ``[b, j]`` being position ``positions[b, j]`` of a full run's, when nothing
    after ``module`` mixes positions (true of a Hugging Face causal LM's head,
    Gemma's soft-capping included, and of TransformerLens' unembed;
    :func:`masalign.logit_rows.restricts_logits` checks it on a model). The
    module must run exactly once.
    """
    calls = []

    def rows_at(hidden: Any) -> Tensor:
        calls.append(None)
        if not isinstance(hidden, Tensor) or hidden.dim() != 3 or hidden.shape[0] != positions.shape[0]:
            got = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise ValueError(
                f"the unembedding got {got}, not the (batch={positions.shape[0]}, seq, width) states that logits at "
                "chosen positions need"
            )
        return hidden[torch.arange(hidden.shape[0], device=hidden.device)[:, None], positions.to(hidden.device)]

    def gather(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return with_first_argument(args, kwargs, rows_at)

    handle = module.register_forward_pre_hook(gather, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
    if len(calls) != 1:
        raise SiteError(f"the unembedding ran {len(calls)} times in one forward pass, not once; logits at chosen positions need one call")


def logits_from_output(output: Any, adapter: str) -> Tensor:
    """``(batch, seq, vocab)`` logits of a model output: the output itself, its ``.logits``, or its first element.

    ``adapter`` is the adapter's class name, for the error's hint.
    """
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in the model's output of type {type(output).__name__}; "
        f"pass logits_fn=... to {adapter} to extract them"
    )


def check_finite(tensor: Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        n_bad = int((~torch.isfinite(tensor)).sum())
        raise FloatingPointError(
            f"{what} contains {n_bad} NaN or inf values; check the model's inputs and weights "
            "(and the standardisation statistics if standardize=True)"
        )


def parameter_devices(model: nn.Module) -> list[torch.device]:
    """The devices that hold ``model``'s parameters and buffers, in order of first use; several
    for a model sharded across devices (``device_map``, TransformerLens's ``n_devices``)."""
    seen: dict[torch.device, None] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        seen.setdefault(tensor.device, None)
    return list(seen)


def module_device(model: nn.Module, module_path: str, fallback: torch.device) -> torch.device:
    """Where the module at ``module_path`` (or its closest ancestor that holds weights) computes.

    accelerate's dispatch hook names the device a module runs on, whatever holds
    its weights (offloaded weights sit on the CPU and run on the GPU); otherwise
    a module runs where its own parameters are. A path that names no module
    (a TransformerLens hook point's parent, a root-level site) falls back to
    its ancestors, then to ``fallback``.
    """
    parts = module_path.split(".") if module_path else []
    for end in range(len(parts), -1, -1):
        try:
            module = model.get_submodule(".".join(parts[:end]))
        except AttributeError:
            continue
        execution = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if execution is not None:
            return torch.device("cuda", execution) if isinstance(execution, int) else torch.device(execution)
        own = next(itertools.chain(module.parameters(), module.buffers()), None)
        if own is not None and own.device.type != "meta":
            return own.device
    return fallback


@contextlib.contextmanager
def recurrent_layers_ready_for_backward(model: nn.Module) -> Iterator[None]:
    """Let gradients flow back through the model's fused RNNs on a GPU while it stays in eval mode.

    cuDNN keeps what an RNN's backward needs only in training mode ("cudnn RNN backward
    can only be called in training mode"), but an interchange's loss must flow back
    through the target's recurrence, which must not be trained or dropped out. An RNN
    without inter-layer dropout computes the same in both modes, so it is switched to
    training mode for the forward pass; one with dropout runs without cuDNN instead
    (the native kernels differentiate in eval mode). Nothing changes on a CPU, without
    gradients, or for modules already training.
    """
    switched: list[nn.RNNBase] = []
    needs_native = False
    if torch.is_grad_enabled():
        for module in model.modules():
            if not isinstance(module, nn.RNNBase) or module.training or not module.weight_ih_l0.is_cuda:
                continue
            if module.dropout and module.num_layers > 1:
                needs_native = True
            else:
                switched.append(module)
    for module in switched:
        module.training = True  # this module only, not its children (an RNN has none)
    try:
        with torch.backends.cudnn.flags(enabled=False) if needs_native else contextlib.nullcontext():
            yield
    finally:
        for module in switched:
            module.training = False
