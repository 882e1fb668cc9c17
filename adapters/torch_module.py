"""Adapter for plain PyTorch models (``nn.Module``), recurrent ones in particular.

Three kinds of site, named by module path as in ``model.named_modules()``:

- ``"<rnn>.h_l<k>"`` (and for LSTMs ``c_l<k>`` and ``hc_l<k>`` = ``[h; c]``) for a
  fused ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` at ``<rnn>``: the state of layer ``k``
  after step ``t``. A fused RNN computes all steps in one kernel, so a hook on it
  only sees the finished sequence. Here the recurrence is split at the
  intervention steps instead: the layer runs fused up to step ``t`` (packed
  sequences with a per-example shift, so each example may have its own ``t``),
  the state is replaced, and the layer runs fused on from the replaced state.
  Every later step, and every later layer, sees the replacement; no step is run
  in a Python loop. Replacing ``c_l<k>`` changes steps ``t+1..`` (``h_t`` is
  already computed at that point).
- ``"<cell>"`` for a submodule that the model's own loop calls once per time
  step (a custom cell, ``nn.GRUCell``): its ``t``-th call is position ``t``. When
  the cell returns a tuple, element ``i`` is the site ``"<cell>[i]"``.
- ``"<module>"`` for any other submodule whose output is ``(batch, seq, width)``,
  such as an embedding: position-indexed replacement.

Call-based sites are found by one probing run of the model (eval mode, no
gradient, every module's mode restored): on ``example_inputs`` if given, else,
for a model with an ``nn.Embedding``, on two all-zero token sequences of length
7 the first time the sites are needed (so ``sites()`` lists them on a fresh
adapter), else on the first inputs the adapter sees. The same run finds the
token embedding (the ``nn.Embedding`` that receives the token tensor itself),
whose size bounds the token ids :meth:`TorchModuleAdapter.check_inputs` accepts.

A site must run as its kind says, or the call is an error rather than a silent
no-op: a fused RNN once per forward pass, a per-step cell once per position (at
least up to the last position asked for, at most once per position), any other
module once per forward pass.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .base import (
    EMPTY_SLOT,
    ModelInputs,
    ObservedReplacement,
    Replacement,
    RowReplacementHook,
    SiteError,
    StopForward,
    check_inputs,
    explaining_inference_weights,
    logits_from_output,
    probing,
    recurrent_layers_ready_for_backward,
    tokens_and_mask,
    unknown_site_error,
)

_PROBE_BATCH = 2
_PROBE_SEQ_LEN = 7


@dataclass(frozen=True)
class _Site:
    kind: str  # "recurrent", "step" or "sequence"
    module_path: str
    width: int
    layer: int = 0  # recurrent: which layer
    state: str = "h"  # recurrent: "h", "c" or "hc"
    element: int | None = None  # step/sequence: tuple element of the output, if any
    name: str = ""  # the site's name, for messages


@dataclass
class _Probe:
    """What one probing run showed: call-based sites, modules that cannot be sites, the vocabulary."""

    sites: dict[str, _Site] = field(default_factory=dict)
    unusable: dict[str, str] = field(default_factory=dict)  # site name -> why not
    vocab_size: int | None = None


class TorchModuleAdapter:
    """Wrap a plain ``nn.Module`` whose forward maps ``inputs`` to logits ``(batch, seq, vocab)``.

    Args:
        model: the model; it is not modified (hooks and forward overrides are
            removed on exit, also on error or interrupt).
        example_inputs: optional inputs for discovering call-based sites.
        logits_fn: extracts ``(batch, seq, vocab)`` logits from the model's output
            (default: the output itself, ``.logits``, or its first element).
        name: how the model is called in error messages.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: ModelInputs | None = None,
        logits_fn: Callable[[Any], Tensor] | None = None,
        name: str = "model",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"TorchModuleAdapter wraps an nn.Module, got {type(model).__name__}")
        self._model = model
        self._logits_fn = logits_fn or functools.partial(logits_from_output, adapter="TorchModuleAdapter")
        self.name = name
        self._modules = dict(model.named_modules())
        self._recurrent_sites = self._find_recurrent_sites()
        self._probed: _Probe | None = None
        self._dry_run_tried = False
        if example_inputs is not None:
            self._probed = self._probe(example_inputs)

    # -- the protocol --------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def device(self) -> torch.device:
        for p in self._model.parameters():
            return p.device
        for b in self._model.buffers():
            return b.device
        return torch.device("cpu")

    def sites(self) -> dict[str, int]:
        probe = self._probe_once(None)
        found = dict(self._recurrent_sites)
        found.update(probe.sites if probe is not None else {})
        return {name: site.width for name, site in found.items()}

    def check_inputs(self, inputs: ModelInputs, positions: Tensor | None = None) -> Tensor | None:
        """Check every row of ``inputs`` (and ``positions``) without running the model on them.

        Token ids must lie inside the token embedding, an ``attention_mask`` must
        match the tokens, positions must lie inside each row's tokens. Errors name
        the row of ``inputs``; returns the positions as long, or ``None``.
        """
        probe = self._probe_once(inputs)
        vocab_size = probe.vocab_size if probe is not None else None
        return check_inputs(inputs, positions, vocab_size=vocab_size, model_name=self.name)

    def logits(self, inputs: ModelInputs) -> Tensor:
        self.check_inputs(inputs)
        return self._logits_fn(self._call(inputs))

    def activations(self, inputs: ModelInputs, site: str, positions: Tensor) -> Tensor:
        spec, positions = self._prepare(inputs, site, positions)
        batch, n_slots = positions.shape
        rows: list[tuple[Tensor, Tensor, Tensor]] = []

        def record(hidden: Tensor, example_index: Tensor, slot_index: Tensor) -> Tensor:
            rows.append((hidden, example_index, slot_index))
            return hidden

        if batch * n_slots == 0 or bool((positions == EMPTY_SLOT).all()):  # nothing to read: empty slots are zeros
            return torch.zeros((batch, n_slots, spec.width), device=self.device)
        run = self._site_run(spec, inputs, positions, record, stop_when_done=True)
        try:
            run.forward(lambda: self._call(inputs))
        except StopForward:
            pass
        else:  # the forward pass ended before every slot was read
            run.check_complete()
            raise SiteError(f"{self.name}: site {site!r} was not read at every position")  # pragma: no cover
        out = rows[0][0].new_zeros((batch, n_slots, spec.width))
        for hidden, example_index, slot_index in rows:
            out = out.index_put((example_index, slot_index), hidden)
        return out

    def run_with_replacement(
        self, inputs: ModelInputs, site: str, positions: Tensor, replace: Replacement
    ) -> Tensor:
        spec, positions = self._prepare(inputs, site, positions)
        run = self._site_run(spec, inputs, positions, replace, stop_when_done=False)
        with recurrent_layers_ready_for_backward(self._model):
            logits = self._logits_fn(run.forward(lambda: self._call(inputs)))
        run.check_complete()
        run.observed.check_gradient_reached(logits)
        return logits

    # -- sites ---------------------------------------------------------------------

    def _find_recurrent_sites(self) -> dict[str, _Site]:
        sites: dict[str, _Site] = {}
        for path, module in self._modules.items():
            if not isinstance(module, nn.RNNBase):
                continue
            hidden = module.hidden_size
            for layer in range(module.num_layers):
                states = [("h", hidden)] + ([("c", hidden), ("hc", 2 * hidden)] if isinstance(module, nn.LSTM) else [])
                for state, width in states:
                    name = f"{path}.{state}_l{layer}"
                    sites[name] = _Site("recurrent", path, width, layer, state, name=name)
        return sites

    def _site(self, site: str, inputs: ModelInputs | None) -> _Site:
        if site in self._recurrent_sites:
            return self._recurrent_sites[site]
        probe = self._probe_once(inputs)
        if probe is not None and site in probe.sites:
            return probe.sites[site]
        if probe is not None and site in probe.unusable:
            raise SiteError(f"{self.name}: {site!r} cannot be a site: {probe.unusable[site]}")
        raise unknown_site_error(site, self.sites(), self.name)

    def _probe_once(self, inputs: ModelInputs | None) -> _Probe | None:
        """The probe: from ``example_inputs``, else one dry run on zero tokens, else ``inputs``."""
        if self._probed is None and not self._dry_run_tried:
            self._dry_run_tried = True
            if any(isinstance(module, nn.Embedding) for module in self._modules.values()):
                dummy = torch.zeros((_PROBE_BATCH, _PROBE_SEQ_LEN), dtype=torch.long, device=self.device)
                # A model that takes something else than token ids fails here and
                # is probed on the first inputs it is given instead.
                with contextlib.suppress(Exception):
                    self._probed = self._probe(dummy)
        if self._probed is None and inputs is not None:
            # Two rows show every shape; a whole dataset (check_inputs) would cost a full run.
            first_rows = inputs[:_PROBE_BATCH] if isinstance(inputs, Tensor) else {k: v[:_PROBE_BATCH] for k, v in inputs.items()}
            self._probed = self._probe(first_rows)
        return self._probed

    def _probe(self, inputs: ModelInputs) -> _Probe:
        """Run the model once and classify every submodule's output by shape and number of calls."""
        tokens, _ = tokens_and_mask(inputs)
        batch = tokens.shape[0]
        seq_len = tokens.shape[1] if tokens.dim() > 1 else 0
        calls: dict[str, list[Any]] = {}
        vocab_sizes: list[int] = []
        inside_rnn = {f"{p}.{q}" for p, m in self._modules.items() if isinstance(m, nn.RNNBase) for q, _ in m.named_modules() if q}

        def shape_of(x: Any) -> Any:
            if isinstance(x, Tensor):
                return tuple(x.shape)
            if isinstance(x, (tuple, list)):
                return tuple(shape_of(e) for e in x)
            return None

        def record(path: str, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            calls.setdefault(path, []).append(shape_of(output))
            # The token embedding takes the token tensor itself; its size is the vocabulary.
            if isinstance(module, nn.Embedding) and ((args and args[0] is tokens) or kwargs.get("input") is tokens):
                vocab_sizes.append(module.num_embeddings)

        handles = []
        try:
            for path, module in self._modules.items():
                if not path or path in inside_rnn or isinstance(module, nn.RNNBase):
                    continue
                handles.append(module.register_forward_hook(functools.partial(record, path), with_kwargs=True))
            with probing(self._model):
                self._call(inputs)
        finally:
            for handle in handles:
                handle.remove()

        probe = _Probe(vocab_size=min(vocab_sizes) if vocab_sizes else None)
        for path, shapes in calls.items():
            first = shapes[0]
            candidates = [(None, first)] if not (first and isinstance(first[0], tuple)) else list(enumerate(first))
            for element, shape in candidates:
                if not isinstance(shape, tuple) or not all(isinstance(s, int) for s in shape):
                    continue
                name = path if element is None else f"{path}[{element}]"
                n_calls = len(shapes)
                if len(shape) == 3 and shape[:2] == (batch, seq_len):
                    if n_calls == 1:
                        probe.sites[name] = _Site("sequence", path, shape[2], element=element, name=name)
                    else:
                        probe.unusable[name] = (
                            f"module {path!r} runs {n_calls} times per forward pass; a (batch, seq, width) site "
                            "must run once"
                        )
                elif len(shape) == 2 and shape[0] == batch and n_calls > 1:
                    if n_calls <= seq_len:
                        probe.sites[name] = _Site("step", path, shape[1], element=element, name=name)
                    else:
                        probe.unusable[name] = (
                            f"module {path!r} runs {n_calls} times on sequences of {seq_len} positions; call t of "
                            "a per-step site is position t, so it must run at most once per position"
                        )
        return probe

    def _prepare(self, inputs: ModelInputs, site: str, positions: Tensor) -> tuple[_Site, Tensor]:
        """The site and the checked positions."""
        spec = self._site(site, inputs)
        positions = self.check_inputs(inputs, positions)
        if spec.kind == "recurrent":
            rnn = self._modules[spec.module_path]
            if rnn.bidirectional:
                raise SiteError(f"{spec.module_path} is bidirectional: a step-wise intervention on it is not defined (later steps feed earlier ones)")
            if getattr(rnn, "proj_size", 0):
                raise SiteError(f"{spec.module_path} uses proj_size; step-wise interventions support LSTMs without projections")
        return spec, positions

    # -- running ---------------------------------------------------------------------

    def _call(self, inputs: ModelInputs) -> Any:
        with explaining_inference_weights(self._model, self.name):
            if isinstance(inputs, Tensor):
                return self._model(inputs)
            return self._model(**inputs)

    def _site_run(
        self, spec: _Site, inputs: ModelInputs, positions: Tensor, replace: Replacement, stop_when_done: bool
    ) -> _SiteRun:
        run = {"recurrent": _RecurrentRun, "sequence": _SequenceRun, "step": _StepRun}[spec.kind]
        observed = ObservedReplacement(replace, spec.name, self._model, self.name)
        seq_len = tokens_and_mask(inputs)[0].shape[1]
        return run(spec, self._modules[spec.module_path], positions, observed, stop_when_done, seq_len)


# -- one forward pass with a site intervened -------------------------------------------


class _SiteRun(abc.ABC):
    """One forward pass with ``replace`` applied at a site; :meth:`check_complete` afterwards."""

    def __init__(
        self, spec: _Site, module: nn.Module, positions: Tensor, observed: ObservedReplacement, stop_when_done: bool, seq_len: int
    ) -> None:
        self.spec = spec
        self.module = module
        self.positions = positions
        self.observed = observed
        self.model_name = observed.model_name
        self.stop_when_done = stop_when_done  # raise StopForward once every position is done
        self.seq_len = seq_len
        self.calls = 0  # of the site's module

    @abc.abstractmethod
    def forward(self, call: Callable[[], Any]) -> Any:
        """``call()`` (one forward pass of the model) with the site intervened."""

    @abc.abstractmethod
    def check_complete(self) -> None:
        """Raise if the forward pass did not reach every position."""


class _HookedRun(_SiteRun):
    """A site intervened by a forward hook on its module, for the duration of one forward pass."""

    def forward(self, call: Callable[[], Any]) -> Any:
        handle = self.module.register_forward_hook(self.hook)
        try:
            return call()
        finally:
            handle.remove()

    @abc.abstractmethod
    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        """The forward hook on the site's module: reads and replaces the positions' rows."""


class _SequenceRun(_HookedRun):
    """A ``(batch, seq, width)`` module output, replaced out of place at the positions; one call."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.rows = RowReplacementHook(self.positions, self.observed, self.spec.name, self.observed.model, self.model_name)

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        part = _output_part(output, self.spec.element)
        new_output = _with_part(output, self.spec.element, self.rows(part))
        if self.stop_when_done:
            raise StopForward
        return new_output

    def check_complete(self) -> None:
        self.rows.check_fired()


class _StepRun(_HookedRun):
    """A module called once per time step: call ``t`` is position ``t``."""

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        step = self.calls
        self.calls += 1
        if step >= self.seq_len:
            raise SiteError(
                f"{self.model_name}: site {self.spec.name!r} ran more than {self.seq_len} times in one forward pass on "
                f"sequences of {self.seq_len} positions; call t of a per-step site is position t, so it must run at "
                "most once per position"
            )
        example_index, slot_index = (self.positions == step).nonzero(as_tuple=True)
        if example_index.numel() == 0:
            return output
        part = _output_part(output, self.spec.element)
        if not isinstance(part, Tensor) or part.dim() != 2 or part.shape[0] != self.positions.shape[0]:
            got = tuple(part.shape) if isinstance(part, Tensor) else type(part).__name__
            raise SiteError(
                f"{self.model_name}: call {step} of site {self.spec.name!r} gave {got}, not the "
                f"({self.positions.shape[0]}, width) state of a per-step site"
            )
        new_rows = self.observed(part[example_index], example_index, slot_index)
        new_output = _with_part(output, self.spec.element, part.index_put((example_index,), new_rows))
        if self.stop_when_done and step >= self.last_position:
            raise StopForward
        return new_output

    @functools.cached_property
    def last_position(self) -> int:
        return int(self.positions.max()) if self.positions.numel() else -1

    def check_complete(self) -> None:
        if self.calls > self.last_position:
            return
        b, j = (self.positions >= self.calls).nonzero()[0].tolist()
        position = int(self.positions[b, j])
        raise SiteError(
            f"{self.model_name}: site {self.spec.name!r} ran {self.calls} times in this forward pass, but position "
            f"{position} (slot {j} of example {b}) needs {position + 1}: call t of a per-step site is position t. "
            f"Choose positions below {self.calls}, or a site that runs once per position of the inputs"
        )


class _RecurrentRun(_SiteRun):
    """A fused RNN layer's state, through the split recurrence; one call of the RNN."""

    def forward(self, call: Callable[[], Any]) -> Any:
        with _split_recurrence(self.module, self):
            return call()

    def check_complete(self) -> None:
        if self.calls == 0:
            raise SiteError(
                f"{self.model_name}: the RNN {self.spec.module_path!r} of site {self.spec.name!r} did not run in the "
                "forward pass on these inputs, so nothing was read or replaced there"
            )


def _output_part(output: Any, element: int | None) -> Tensor:
    return output if element is None else output[element]


def _with_part(output: Any, element: int | None, part: Tensor) -> Any:
    if element is None:
        return part
    parts = list(output)
    parts[element] = part
    return type(output)(parts) if isinstance(output, tuple) else parts


# -- split recurrence for fused RNNs ---------------------------------------------------


def _layer_view(rnn: nn.RNNBase, layer: int) -> nn.RNNBase:
    """A one-layer, batch-first RNN of the same class sharing ``rnn``'s layer weights."""
    input_size = rnn.input_size if layer == 0 else rnn.hidden_size
    kwargs: dict[str, Any] = dict(num_layers=1, bias=rnn.bias, batch_first=True, device="meta")
    if isinstance(rnn, nn.LSTM):
        view: nn.RNNBase = nn.LSTM(input_size, rnn.hidden_size, **kwargs)
    elif isinstance(rnn, nn.GRU):
        view = nn.GRU(input_size, rnn.hidden_size, **kwargs)
    else:
        view = nn.RNN(input_size, rnn.hidden_size, nonlinearity=rnn.nonlinearity, **kwargs)
    # RNNBase.__setattr__ keeps the flat weight list in sync with these attributes.
    for name in view._flat_weights_names:
        setattr(view, name, getattr(rnn, name.replace("_l0", f"_l{layer}")))
    view.train(rnn.training)
    return view


def _run_segment(view: nn.RNNBase, x: Tensor, start: Tensor, length: Tensor, state: Any) -> tuple[Tensor, Any]:
    """Run steps ``start[b] .. start[b]+length[b]-1`` of each example, fused.

    Returns outputs aligned to each example's start, ``(batch, max(length), hidden)``,
    and the state after each example's last step.
    """
    steps = int(length.max())
    index = (start[:, None] + torch.arange(steps, device=x.device)[None, :]).clamp(max=x.shape[1] - 1)
    shifted = x.gather(1, index[:, :, None].expand(-1, -1, x.shape[2]))
    packed = pack_padded_sequence(shifted, length.cpu(), batch_first=True, enforce_sorted=False)
    with warnings.catch_warnings():
        # The view's weights live inside the user's flat weight buffer: cuDNN warns
        # that they are not one contiguous chunk, which costs speed, not correctness.
        warnings.filterwarnings("ignore", message=".*contiguous chunk of memory.*")
        packed_out, new_state = view(packed, state)
    out, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=steps)
    return out, new_state


@contextlib.contextmanager
def _split_recurrence(rnn: nn.RNNBase, run: _RecurrentRun) -> Iterator[None]:
    """``rnn.forward`` overridden by the split recurrence of ``run`` inside the block; restored on exit."""
    spec = run.spec
    own_forward = rnn.__dict__.get("forward")  # an instance attribute that someone else set, if any

    def forward(self: nn.RNNBase, input: Any, hx: Any = None) -> Any:
        run.calls += 1
        if run.calls > 1:
            raise SiteError(
                f"{run.model_name} calls its RNN {spec.module_path!r} more than once per forward; a step-wise "
                "intervention needs one call per sequence (for a per-step loop, use the cell as the site)"
            )
        if isinstance(input, PackedSequence):
            raise TypeError(f"{spec.module_path} received a PackedSequence; pass padded (batch, seq, features) inputs")
        if input.dim() != 3:
            raise ValueError(f"{spec.module_path} received input of shape {tuple(input.shape)}; step-wise interventions need batched 3-d input")
        return _split_forward(self, input, hx, spec, run.positions, run.observed, run.stop_when_done)

    rnn.forward = types.MethodType(forward, rnn)
    try:
        yield
    finally:
        # Without an instance attribute the class's forward is back.
        if own_forward is None:
            rnn.__dict__.pop("forward", None)
        else:
            rnn.forward = own_forward


def _split_forward(
    rnn: nn.RNNBase, x: Tensor, hx: Any, spec: _Site, positions: Tensor, replace: Replacement, stop_when_done: bool
) -> Any:
    is_lstm = isinstance(rnn, nn.LSTM)
    if not rnn.batch_first:
        x = x.transpose(0, 1)
    batch, seq_len, _ = x.shape
    hidden = rnn.hidden_size
    if hx is None:
        zeros = x.new_zeros(rnn.num_layers, batch, hidden)
        hx = (zeros, zeros) if is_lstm else zeros
    final_h, final_c = [], []
    layer_input = x
    for layer in range(rnn.num_layers):
        if layer > 0 and rnn.dropout and rnn.training:
            layer_input = nn.functional.dropout(layer_input, rnn.dropout, training=True)
        view = _layer_view(rnn, layer)
        state = (hx[0][layer : layer + 1], hx[1][layer : layer + 1]) if is_lstm else hx[layer : layer + 1]
        if layer == spec.layer:
            layer_output, state = _split_layer(view, layer_input, state, spec, positions, replace, stop_when_done)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*contiguous chunk of memory.*")
                layer_output, state = view(layer_input, state)
        if is_lstm:
            final_h.append(state[0])
            final_c.append(state[1])
        else:
            final_h.append(state)
        layer_input = layer_output
    output = layer_input if rnn.batch_first else layer_input.transpose(0, 1)
    h_n = torch.cat(final_h, 0)
    return (output, (h_n, torch.cat(final_c, 0))) if is_lstm else (output, h_n)


def _split_layer(
    view: nn.RNNBase, x: Tensor, state: Any, spec: _Site, positions: Tensor, replace: Replacement, stop_when_done: bool
) -> tuple[Tensor, Any]:
    """One layer, split at each example's intervention steps (slots in time order).

    Empty slots (``EMPTY_SLOT``) sort last; in a round where an example has no
    step left it runs one dummy step whose state and output are dropped (its
    segment starts where its next one does, and the stitching takes the later).
    """
    batch, seq_len, _ = x.shape
    is_lstm = isinstance(view, nn.LSTM)
    hidden = view.hidden_size
    sorted_positions, slot_order = positions.masked_fill(positions == EMPTY_SLOT, seq_len).sort(dim=1)
    rows = torch.arange(batch, device=x.device)
    start = torch.zeros(batch, dtype=torch.long, device=x.device)
    segments: list[Tensor] = []
    segment_starts: list[Tensor] = []
    replaced_h: list[tuple[Tensor, Tensor, Tensor]] = []  # (examples, position, new h) for the output sequence

    for j in range(sorted_positions.shape[1]):
        stop = sorted_positions[:, j]
        real = stop < seq_len
        if not bool(real.any()):
            break
        everyone = bool(real.all())
        out, new_state = _run_segment(view, x, start, torch.where(real, stop - start + 1, torch.ones_like(start)), state)
        if not everyone:  # examples without a step this round keep their state
            keep = (~real)[None, :, None]
            new_state = (
                (torch.where(keep, state[0], new_state[0]), torch.where(keep, state[1], new_state[1]))
                if is_lstm else torch.where(keep, state, new_state)
            )
        state = new_state
        segments.append(out)
        segment_starts.append(start)
        h, c = state if is_lstm else (state, None)
        current = {"h": h[0], "c": c[0] if c is not None else None}
        current["hc"] = torch.cat([h[0], c[0]], -1) if c is not None else None
        examples = rows if everyone else real.nonzero().flatten()
        new_rows = replace(current[spec.state][examples], examples, slot_order[examples, j])
        new = new_rows if everyone else current[spec.state].index_put((examples,), new_rows)
        if spec.state == "h":
            h = new[None]
        elif spec.state == "c":
            c = new[None]
        else:
            h, c = new[None, :, :hidden], new[None, :, hidden:]
        state = (h, c) if is_lstm else h
        if spec.state != "c":
            replaced_h.append((examples, stop[examples], h[0][examples]))
        start = torch.where(real, stop + 1, start)

    if stop_when_done:
        raise StopForward
    remaining = seq_len - start
    if bool((remaining > 0).any()):
        out, end_state = _run_segment(view, x, start, remaining.clamp(min=1), state)
        # Examples whose last intervention was at the final step ran one dummy step:
        # keep their state as it was.
        done = (remaining == 0)[None, :, None]
        if is_lstm:
            state = (torch.where(done, state[0], end_state[0]), torch.where(done, state[1], end_state[1]))
        else:
            state = torch.where(done, state, end_state)
        segments.append(out)
        segment_starts.append(start)

    # Stitch the per-example-shifted segments back into one (batch, seq, hidden) output.
    time = torch.arange(seq_len, device=x.device)[None, :].expand(batch, -1)
    starts = torch.stack(segment_starts, 1)  # (batch, n_segments)
    segment_id = (time[:, :, None] >= starts[:, None, :]).sum(-1) - 1
    offsets = torch.tensor([0] + [s.shape[1] for s in segments[:-1]], device=x.device).cumsum(0)
    index = offsets[segment_id] + time - starts.gather(1, segment_id)
    stacked = torch.cat(segments, 1)
    output = stacked.gather(1, index[:, :, None].expand(-1, -1, hidden))
    for examples, position, new_h in replaced_h:
        output = output.index_put((examples, position), new_h)
    return output, state
