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

Call-based sites are found by one probing run of the model, on ``example_inputs``
if given, else on the first inputs the adapter sees.
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .base import (
    ModelInputs,
    Replacement,
    SiteError,
    StopForward,
    batch_size_of,
    check_positions_for,
    first_tensor,
    logits_from_output,
    replace_rows,
    unknown_site_error,
)


@dataclass(frozen=True)
class _Site:
    kind: str  # "recurrent", "step" or "sequence"
    module_path: str
    width: int
    layer: int = 0  # recurrent: which layer
    state: str = "h"  # recurrent: "h", "c" or "hc"
    element: int | None = None  # step/sequence: tuple element of the output, if any


class TorchModuleAdapter:
    """Wrap a plain ``nn.Module`` whose forward maps ``inputs`` to logits ``(batch, seq, vocab)``.

    Args:
        model: the model; it is not modified (hooks and forward overrides are
            removed on exit, also on error).
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
        self._probed_sites: dict[str, _Site] | None = None
        if example_inputs is not None:
            self._probe(example_inputs)

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
        found = dict(self._recurrent_sites)
        found.update(self._probed_sites or {})
        return {name: site.width for name, site in found.items()}

    def logits(self, inputs: ModelInputs) -> Tensor:
        return self._logits_fn(self._call(inputs))

    def activations(self, inputs: ModelInputs, site: str, positions: Tensor) -> Tensor:
        spec = self._site(site, inputs)
        batch = batch_size_of(inputs)
        positions = self._check_positions(spec, inputs, positions)
        n_slots = positions.shape[1]
        rows: list[tuple[Tensor, Tensor, Tensor]] = []
        n_needed = batch * n_slots

        def record(hidden: Tensor, example_index: Tensor, slot_index: Tensor) -> Tensor:
            rows.append((hidden, example_index, slot_index))
            if sum(r[0].shape[0] for r in rows) >= n_needed:
                raise StopForward
            return hidden

        with contextlib.suppress(StopForward):
            self._run_intervened(inputs, spec, positions, record, stop_when_done=True)
        out = first_tensor(inputs).new_zeros((batch, n_slots, spec.width), dtype=rows[0][0].dtype if rows else torch.float32)
        for hidden, example_index, slot_index in rows:
            out = out.index_put((example_index, slot_index), hidden)
        return out

    def run_with_replacement(
        self, inputs: ModelInputs, site: str, positions: Tensor, replace: Replacement
    ) -> Tensor:
        spec = self._site(site, inputs)
        positions = self._check_positions(spec, inputs, positions)
        return self._logits_fn(self._run_intervened(inputs, spec, positions, replace, stop_when_done=False))

    # -- sites ---------------------------------------------------------------------

    def _find_recurrent_sites(self) -> dict[str, _Site]:
        sites: dict[str, _Site] = {}
        for path, module in self._modules.items():
            if not isinstance(module, nn.RNNBase):
                continue
            hidden = module.hidden_size
            for layer in range(module.num_layers):
                sites[f"{path}.h_l{layer}"] = _Site("recurrent", path, hidden, layer, "h")
                if isinstance(module, nn.LSTM):
                    sites[f"{path}.c_l{layer}"] = _Site("recurrent", path, hidden, layer, "c")
                    sites[f"{path}.hc_l{layer}"] = _Site("recurrent", path, 2 * hidden, layer, "hc")
        return sites

    def _site(self, site: str, inputs: ModelInputs | None) -> _Site:
        if site in self._recurrent_sites:
            return self._recurrent_sites[site]
        if self._probed_sites is None and inputs is not None:
            self._probe(inputs)
        if self._probed_sites and site in self._probed_sites:
            return self._probed_sites[site]
        raise unknown_site_error(site, self.sites(), self.name)

    def _probe(self, inputs: ModelInputs) -> None:
        """Run the model once and classify every submodule's output by shape."""
        batch = batch_size_of(inputs)
        seq_len = first_tensor(inputs).shape[1] if first_tensor(inputs).dim() > 1 else 0
        calls: dict[str, list[Any]] = {}
        inside_rnn = {f"{p}.{q}" for p, m in self._modules.items() if isinstance(m, nn.RNNBase) for q, _ in m.named_modules() if q}

        def shape_of(x: Any) -> Any:
            if isinstance(x, Tensor):
                return tuple(x.shape)
            if isinstance(x, (tuple, list)):
                return tuple(shape_of(e) for e in x)
            return None

        handles = []
        for path, module in self._modules.items():
            if not path or path in inside_rnn or isinstance(module, nn.RNNBase):
                continue
            handles.append(
                module.register_forward_hook(lambda m, i, o, path=path: calls.setdefault(path, []).append(shape_of(o)))
            )
        try:
            with torch.no_grad():
                self._call(inputs)
        finally:
            for h in handles:
                h.remove()

        probed: dict[str, _Site] = {}
        for path, shapes in calls.items():
            first = shapes[0]
            candidates = [(None, first)] if not (first and isinstance(first[0], tuple)) else list(enumerate(first))
            for element, shape in candidates:
                if not isinstance(shape, tuple) or not all(isinstance(s, int) for s in shape):
                    continue
                name = path if element is None else f"{path}[{element}]"
                if len(shapes) == 1 and len(shape) == 3 and shape[0] == batch and shape[1] == seq_len:
                    probed[name] = _Site("sequence", path, shape[2], element=element)
                elif len(shapes) > 1 and len(shape) == 2 and shape[0] == batch:
                    probed[name] = _Site("step", path, shape[1], element=element)
        self._probed_sites = probed

    def _check_positions(self, spec: _Site, inputs: ModelInputs, positions: Tensor) -> Tensor:
        positions = check_positions_for(first_tensor(inputs), positions)
        if spec.kind == "recurrent":
            rnn = self._modules[spec.module_path]
            if rnn.bidirectional:
                raise SiteError(f"{spec.module_path} is bidirectional: a step-wise intervention on it is not defined (later steps feed earlier ones)")
            if getattr(rnn, "proj_size", 0):
                raise SiteError(f"{spec.module_path} uses proj_size; step-wise interventions support LSTMs without projections")
        return positions

    # -- running ---------------------------------------------------------------------

    def _call(self, inputs: ModelInputs) -> Any:
        if isinstance(inputs, Tensor):
            return self._model(inputs)
        return self._model(**inputs)

    def _run_intervened(
        self, inputs: ModelInputs, spec: _Site, positions: Tensor, replace: Replacement, stop_when_done: bool
    ) -> Any:
        module = self._modules[spec.module_path]
        if spec.kind == "recurrent":
            with _split_recurrence(module, spec, positions, replace, stop_when_done):
                return self._call(inputs)
        hook = _sequence_hook if spec.kind == "sequence" else _step_hook
        last_position = int(positions.max()) if positions.numel() else -1
        handle = module.register_forward_hook(hook(spec, positions, replace, stop_when_done, last_position))
        try:
            return self._call(inputs)
        finally:
            handle.remove()


# -- hooks for call-based sites ------------------------------------------------------


def _output_part(output: Any, element: int | None) -> Tensor:
    return output if element is None else output[element]


def _with_part(output: Any, element: int | None, part: Tensor) -> Any:
    if element is None:
        return part
    parts = list(output)
    parts[element] = part
    return type(output)(parts) if isinstance(output, tuple) else parts


def _sequence_hook(spec: _Site, positions: Tensor, replace: Replacement, stop: bool, last: int):
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        part = _output_part(output, spec.element)
        # Out of place (replace_rows builds a new tensor): autograd stays intact.
        site = spec.module_path if spec.element is None else f"{spec.module_path}[{spec.element}]"
        return _with_part(output, spec.element, replace_rows(part, positions, replace, site))

    return hook


def _step_hook(spec: _Site, positions: Tensor, replace: Replacement, stop: bool, last: int):
    state = {"step": 0}

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        step = state["step"]
        state["step"] += 1
        example_index, slot_index = (positions == step).nonzero(as_tuple=True)
        if example_index.numel() == 0:
            return output
        part = _output_part(output, spec.element)
        new_rows = replace(part[example_index], example_index, slot_index)
        new_output = _with_part(output, spec.element, part.index_put((example_index,), new_rows))
        if stop and step >= last:
            raise StopForward
        return new_output

    return hook


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
def _split_recurrence(
    rnn: nn.RNNBase, spec: _Site, positions: Tensor, replace: Replacement, stop_when_done: bool
) -> Iterator[None]:
    calls = {"n": 0}
    original_forward = rnn.forward

    def forward(self: nn.RNNBase, input: Any, hx: Any = None) -> Any:
        calls["n"] += 1
        if calls["n"] > 1:
            raise SiteError(
                f"the model calls its RNN {spec.module_path!r} more than once per forward; a step-wise "
                "intervention needs one call per sequence (for a per-step loop, use the cell as the site)"
            )
        if isinstance(input, PackedSequence):
            raise TypeError(f"{spec.module_path} received a PackedSequence; pass padded (batch, seq, features) inputs")
        if input.dim() != 3:
            raise ValueError(f"{spec.module_path} received input of shape {tuple(input.shape)}; step-wise interventions need batched 3-d input")
        return _split_forward(self, input, hx, spec, positions, replace, stop_when_done)

    rnn.forward = types.MethodType(forward, rnn)
    try:
        yield
    finally:
        # Removing the instance attribute restores the class's forward.
        if rnn.forward.__func__ is forward:  # type: ignore[attr-defined]
            del rnn.forward
        else:  # pragma: no cover - somebody else replaced it meanwhile
            rnn.forward = original_forward


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
    """One layer, split at each example's intervention steps (slots in time order)."""
    batch, seq_len, _ = x.shape
    is_lstm = isinstance(view, nn.LSTM)
    hidden = view.hidden_size
    sorted_positions, slot_order = positions.sort(dim=1)
    rows = torch.arange(batch, device=x.device)
    start = torch.zeros(batch, dtype=torch.long, device=x.device)
    segments: list[Tensor] = []
    segment_starts: list[Tensor] = []
    replaced_h: list[tuple[Tensor, Tensor]] = []  # (position, new h) for the output sequence

    for j in range(sorted_positions.shape[1]):
        stop = sorted_positions[:, j]
        out, state = _run_segment(view, x, start, stop - start + 1, state)
        segments.append(out)
        segment_starts.append(start)
        h, c = state if is_lstm else (state, None)
        current = {"h": h[0], "c": c[0] if c is not None else None}
        current["hc"] = torch.cat([h[0], c[0]], -1) if c is not None else None
        new = replace(current[spec.state], rows, slot_order[:, j])
        if spec.state == "h":
            h = new[None]
        elif spec.state == "c":
            c = new[None]
        else:
            h, c = new[None, :, :hidden], new[None, :, hidden:]
        state = (h, c) if is_lstm else h
        if spec.state != "c":
            replaced_h.append((stop, h[0]))
        start = stop + 1

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
    for position, new_h in replaced_h:
        output = output.index_put((rows, position), new_h)
    return output, state
