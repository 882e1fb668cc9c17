"""Adapter for TransformerLens models: anything with ``hook_dict`` and ``run_with_hooks``.

That is every ``HookedRootModule``: TransformerLens 4's ``TransformerBridge``
(``boot_transformers``, ``boot_native``), ``HookedTransformer`` of TransformerLens
2.x/3.x, and a user's own ``HookedRootModule``. The backend is recognised by what
it does, not by class, and ``transformer_lens`` itself is never imported here, so
``import masalign.adapters`` works without it.

Sites are the model's hook names, aliases included (``"blocks.1.hook_resid_post"``
and, on the bridge, its canonical ``"blocks.1.hook_out"``; ``"hook_embed"``;
``"blocks.0.mlp.hook_post"``). A site's activation is ``(batch, seq, width)``, or
``(batch, seq, heads, d_head)`` for per-head hooks (``attn.hook_z``, ``hook_q``,
...), whose heads are flattened: width ``heads * d_head``, head-major, as
``activation.reshape(batch, seq, -1)`` lays them out. Attention patterns and
scores ``(batch, heads, query, key)`` are not indexed by position and are not
sites.

Widths come from one probing forward pass on ``example_inputs`` (default: two
all-zero token sequences) that records the shape at every hook point that
fires. Hook points that fire only behind a config flag (``hook_mlp_in``,
``hook_attn_in``, ``hook_q_input``/``k``/``v``, ``attn.hook_result``) are sites once
the flag is on; asking for one while it is off names the flag.

``inputs`` are a ``(batch, seq)`` token tensor, or a mapping whose tokens are under
``"input"``, ``"input_ids"`` or ``"tokens"``; every other entry (``attention_mask``,
...) is passed to the model's forward by keyword. With an ``attention_mask``,
positions index the padded sequence and must point at real tokens (mask 1), on
either padding side.

Runs can resume at a block's output (``supports_prefix``). On a ``TransformerBridge``
over a Hugging Face model they can also skip the positions before the first changed
one, over the later blocks' cached keys and values, and read shared prompt beginnings
once (``supports_key_values``; :mod:`masalign.adapters.key_values`): those runs call
the bridge's ``original_model``, whose layers and ``lm_head`` are the bridge's blocks
and unembedding, so every hook point in them still fires. A ``HookedTransformer``
(TransformerLens 2.x/3.x) runs from cached keys and values through its own forward
(``start_at_layer`` and ``past_kv_cache``; :class:`_HookedTransformerKeyValues`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
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
    site_did_not_run,
    unknown_site_error,
)
from .key_values import KeyValueRuns, left_padding_position_ids
from .resume import BlockSite, KeyValuePrefix, Resumer, check_prefix, left_padded_unembedding

# The output of block i, where a run can resume (the bridge's canonical name, then HookedTransformer's).
_BLOCK_OUTPUT = re.compile(r"^blocks\.(?P<index>\d+)\.(?:hook_out|hook_resid_post)$")

# Hook points that TransformerLens fires only when a config flag is on (gated by the
# name of the hook point, as HookedTransformer and TransformerBridge both do).
_FLAG_OF_SUFFIX = (
    ("attn.hook_result", "use_attn_result"),
    ("hook_q_input", "use_split_qkv_input"),
    ("hook_k_input", "use_split_qkv_input"),
    ("hook_v_input", "use_split_qkv_input"),
    ("mlp_in", "use_hook_mlp_in"),
    ("attn_in", "use_attn_in"),
)
_FLAGS = tuple(dict.fromkeys(flag for _, flag in _FLAG_OF_SUFFIX))

# (batch, heads, query, key) activations: dim 1 is heads, not positions.
_ATTENTION_MAP_SUFFIXES = ("hook_pattern", "hook_attn_scores")

_TOKEN_KEYS = ("input", "input_ids", "tokens")

_PROBE_BATCH = 2
_PROBE_SEQ_LEN = 7


@dataclass(frozen=True)
class _HookRecord:
    """What one hook point showed in the probing forward pass."""

    shape: tuple[int, ...]
    is_float: bool
    calls: int


@dataclass(frozen=True)
class _HookSite:
    hook_name: str  # the canonical name hooks are attached under
    feature_shape: tuple[int, ...]  # activation shape after (batch, seq)

    @property
    def width(self) -> int:
        return math.prod(self.feature_shape)


class TransformerLensAdapter:
    """Wrap a TransformerLens model (``TransformerBridge``, ``HookedTransformer``, any ``HookedRootModule``).

    Args:
        model: the model; hooks are added per call and always removed, also on error.
        example_inputs: inputs for the probing forward pass that finds the sites'
            widths (default: ``(2, 7)`` zero tokens, shortened to the model's
            ``n_ctx``); needed when the model does not take token ids.
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
        if not (isinstance(model, nn.Module) and hasattr(model, "run_with_hooks") and hasattr(model, "hook_dict")):
            raise TypeError(
                "TransformerLensAdapter wraps a TransformerLens model (an nn.Module with hook_dict and "
                f"run_with_hooks, such as TransformerBridge or HookedTransformer), got {type(model).__name__}. "
                "Wrap a plain nn.Module with TorchModuleAdapter instead."
            )
        self._model = model
        self._example_inputs = example_inputs
        self._logits_fn = logits_fn or functools.partial(logits_from_output, adapter="TransformerLensAdapter")
        self._own_logits_fn = logits_fn is not None
        self.name = name
        # One probe per setting of the hook flags: turning a flag on adds hook points.
        self._probes: dict[tuple[Any, ...], dict[str, _HookRecord]] = {}
        self._resumer = Resumer()

    # -- the protocol --------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def device(self) -> torch.device:
        for p in self._model.parameters():
            return p.device
        cfg_device = getattr(getattr(self._model, "cfg", None), "device", None)
        return torch.device(cfg_device) if cfg_device is not None else torch.device("cpu")

    def sites(self) -> dict[str, int]:
        """Every hook name (aliases included) with a position-indexed activation, and its width."""
        found: dict[str, int] = {}
        hooks = self._hooks()
        for name, hook_point in hooks.items():
            try:
                found[name] = self._hook_site(name, hook_point, hooks).width
            except SiteError:
                continue
        return found

    def check_inputs(self, inputs: ModelInputs, positions: Tensor | None = None) -> Tensor | None:
        """Check every row of ``inputs`` (and ``positions``) without running the model on them.

        Token ids must lie inside ``cfg.d_vocab``, sequences inside ``cfg.n_ctx``,
        an ``attention_mask`` must match the tokens, positions must lie on real
        tokens. Errors name the row of ``inputs``; returns the positions as long,
        or ``None``.
        """
        tokens, kwargs = _split_inputs(inputs)
        cfg = getattr(self._model, "cfg", None)
        return check_inputs(
            {"input": tokens, **kwargs},
            positions,
            vocab_size=_positive_int(getattr(cfg, "d_vocab", None)),
            n_ctx=_positive_int(getattr(cfg, "n_ctx", None)),
            model_name=self.name,
        )

    def logits(self, inputs: ModelInputs) -> Tensor:
        self.check_inputs(inputs)
        tokens, kwargs = _split_inputs(inputs)
        with explaining_inference_weights(self._model, self.name):
            return self._logits_fn(self._model(tokens, **kwargs))

    def activations(self, inputs: ModelInputs, site: str, positions: Tensor) -> Tensor:
        """``(batch, n_slots, width)`` activations; the forward pass stops at the site."""
        spec = self._site(site)
        positions = self.check_inputs(inputs, positions)
        tokens, kwargs = _split_inputs(inputs)
        gathered: list[Tensor] = []

        def read(activation: Tensor, hook: Any = None) -> None:
            gathered.append(gather_rows(activation, positions, site))
            raise StopForward

        try:
            with explaining_inference_weights(self._model, self.name):
                self._model.run_with_hooks(tokens, fwd_hooks=[(spec.hook_name, read)], **kwargs)
        except StopForward:
            pass
        if not gathered:
            raise site_did_not_run(self.name, site)
        return gathered[0]

    def run_with_replacement(
        self, inputs: ModelInputs, site: str, positions: Tensor, replace: Replacement
    ) -> Tensor:
        """Logits ``(batch, seq, vocab)`` with the site's rows at ``positions`` replaced, differentiably."""
        spec = self._site(site)
        positions = self.check_inputs(inputs, positions)
        tokens, kwargs = _split_inputs(inputs)
        replacement = RowReplacementHook(positions, replace, site, self._model, self.name)

        # TransformerLens calls a hook as hook(activation, hook=hook_point).
        def replace_at_hook(activation: Tensor, hook: Any = None) -> Tensor:
            return replacement(activation)

        with explaining_inference_weights(self._model, self.name):
            output = self._model.run_with_hooks(tokens, fwd_hooks=[(spec.hook_name, replace_at_hook)], **kwargs)
        logits = self._logits_fn(output)
        replacement.check_fired()
        replacement.check_gradient_reached(logits)
        return logits

    def run_context(self) -> contextlib.AbstractContextManager[None]:
        """Entered by ``fit``, ``evaluate`` and patching for their duration: a ``HookedTransformer``'s
        unembedding laid out so that TransformerLens 3.x does not copy it at every call
        (:func:`unembedding_without_copies`; same values, put back on exit)."""
        return unembedding_without_copies(self._model)

    def output_module(self) -> nn.Module | None:
        """The unembedding (``unembed``), for :func:`adapters.base.logits_only_at`."""
        unembed = getattr(self._model, "unembed", None)
        return unembed if isinstance(unembed, nn.Module) else None

    # -- prefix caching (optional; see adapters/resume.py) ---------------------------

    def supports_prefix(self, site: str) -> bool:
        """Whether ``site`` is a block's output (``blocks.{i}.hook_resid_post`` / ``hook_out``), so runs can resume there."""
        return self._block_site(site) is not None

    def prefix(self, inputs: ModelInputs, site: str) -> Tensor:
        """``(batch, seq, width)`` states at ``site`` on ``inputs``, without gradient; the forward stops there."""
        block_site = self._resumable(site)
        self.check_inputs(inputs)
        tokens, kwargs = _split_inputs(inputs)
        with explaining_inference_weights(self._model, self.name):
            return self._resumer.prefix(block_site, site, lambda: self._model(tokens, **kwargs))

    def run_from_prefix(
        self, inputs: ModelInputs, site: str, prefix: Tensor, positions: Tensor, replace: Replacement
    ) -> Tensor:
        """:meth:`run_with_replacement`'s logits, resumed from ``prefix`` (:meth:`prefix` of the same inputs)."""
        block_site = self._resumable(site)
        positions = self.check_inputs(inputs, positions)
        tokens, kwargs = _split_inputs(inputs)
        check_prefix(prefix, tuple(tokens.shape), self._site(site).width, site)
        if isinstance(prefix, KeyValuePrefix):
            return self._key_value_runs().run_from(inputs, site, block_site, prefix, positions, replace)
        replacement = RowReplacementHook(positions, replace, site, self._model, self.name)
        with explaining_inference_weights(self._model, self.name):
            return self._resumer.resume(
                block_site, site, prefix, replacement, lambda: self._logits_fn(self._model(tokens, **kwargs))
            )

    # -- and the keys and values before the first changed position ---------------------

    def supports_key_values(self, site: str) -> bool:
        """Whether runs resumed at ``site`` can also skip the positions before the first changed one:
        a block output of a ``TransformerBridge`` whose ``original_model`` is a Hugging Face model
        that takes a key/value cache and runs the bridge's blocks, or of a ``HookedTransformer``
        (its forward takes ``start_at_layer`` and ``past_kv_cache``), unless the adapter was given
        its own ``logits_fn`` (which reads the model's output, not these runs')."""
        if not self.supports_prefix(site):
            return False
        return self._hooked_key_values is not None or (self._key_values is not None and self._key_values.supported())

    @functools.cached_property
    def _hooked_key_values(self) -> _HookedTransformerKeyValues | None:
        """The cached-key/value runs of a ``HookedTransformer``, through its own forward."""
        if self._own_logits_fn or not isinstance(getattr(self._model, "blocks", None), nn.ModuleList):
            return None
        try:
            parameters = inspect.signature(self._model.forward).parameters
        except (TypeError, ValueError):
            return None
        if not {"start_at_layer", "past_kv_cache", "attention_mask"} <= set(parameters) or self.output_module() is None:
            return None
        return _HookedTransformerKeyValues(self._model, self.name, self.output_module())

    @functools.cached_property
    def _key_values(self) -> KeyValueRuns | None:
        """The cached-key/value runs (:mod:`masalign.adapters.key_values`) of a bridge's
        ``original_model``, called directly: its layers are the bridge's blocks and its
        ``lm_head`` the bridge's unembedding, so those runs go through the same modules (and
        ``fit`` checks their logits against the bridge's own on its first rows)."""
        original = getattr(self._model, "original_model", None)
        blocks = getattr(self._model, "blocks", None)
        if self._own_logits_fn:
            return None  # it reads the bridge's output, not the Hugging Face model's
        if not isinstance(original, nn.Module) or getattr(original, "config", None) is None:
            return None
        if not isinstance(blocks, nn.ModuleList) or not len(blocks) or not any(module is blocks[0] for module in original.modules()):
            return None
        get_output = getattr(original, "get_output_embeddings", None)
        return KeyValueRuns(
            original,
            self.name,
            functools.partial(_forward_handing_caches_on, original, _bridge_attentions(original)),
            self._hf_call_arguments,
            functools.partial(logits_from_output, adapter="TransformerLensAdapter"),
            lambda: get_output() if callable(get_output) else None,
            self._resumer,
            self.prefix,
        )

    def _key_value_runs(self) -> KeyValueRuns | _HookedTransformerKeyValues:
        if self._hooked_key_values is not None:
            return self._hooked_key_values
        if self._key_values is None:
            why = (
                "this adapter was given its own logits_fn, which reads the model's output"
                if self._own_logits_fn
                else f"this is a {type(self._model).__name__}"
            )
            raise SiteError(
                f"{self.name}: runs from cached keys and values need a HookedTransformer or a TransformerBridge "
                f"over a Hugging Face model, and the adapter's default logits; {why} (see supports_key_values)"
            )
        return self._key_values

    def key_value_prefix(self, inputs: ModelInputs, site: str, start: int, cuts: Sequence[int] | None = None) -> KeyValuePrefix:
        """:meth:`prefix`'s states, and the keys and values of the blocks after ``site`` at positions
        ``0..start-1``, without gradient (see :meth:`supports_key_values`). Rows whose prompts
        begin alike run those positions once (:mod:`masalign.adapters.shared_prefix`), cut where
        that saves most or at ``cuts`` (``0 < c_1 < ... < seq``; ``[0, seq]`` for one run) on a
        bridge. A ``HookedTransformer`` runs each row whole, once: ``cuts``, which only say how
        to split the same computation, change nothing there."""
        block_site = self._resumable(site)
        self.check_inputs(inputs)
        runs = self._key_value_runs()
        if isinstance(runs, _HookedTransformerKeyValues):
            return runs.prefix(inputs, self._site(site).hook_name, block_site, start)
        return runs.prefix(inputs, site, block_site, start, cuts)

    def key_value_activations(self, inputs: ModelInputs, site: str, positions: Tensor, cuts: Sequence[int] | None = None) -> Tensor:
        """:meth:`activations` at a block output (:meth:`supports_key_values`): the positions before
        the first read one run only until the site's block has stored their keys and values, then
        the positions from it on run up to the site, attending to them; shared prompt beginnings
        run once (``cuts`` as in :meth:`key_value_prefix`)."""
        block_site = self._resumable(site)
        positions = self.check_inputs(inputs, positions)
        read = positions[positions >= 0]
        runs = self._key_value_runs()
        if not read.numel() or int(read.min()) == 0 or isinstance(runs, _HookedTransformerKeyValues):
            return self.activations(inputs, site, positions)  # a HookedTransformer: its plain read
        return runs.activations(inputs, site, block_site, positions, cuts)

    def _hf_call_arguments(self, inputs: ModelInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The Hugging Face forward's arguments for ``inputs``: token ids, the attention mask, and
        mask-derived position ids for left-padded rows (as the bridge's own forward derives them)."""
        tokens, kwargs = _split_inputs(inputs)
        extra = sorted(set(kwargs) - {"attention_mask"})
        if extra:
            raise ValueError(f"{self.name}: runs from cached keys and values take token ids and an attention_mask only; got {extra}")
        call: dict[str, Any] = {"input_ids": tokens}
        mask = kwargs.get("attention_mask")
        if mask is not None:
            call["attention_mask"] = mask
            if mask.dim() == 2 and mask.shape == tokens.shape[:2]:
                position_ids = left_padding_position_ids(mask)
                if position_ids is not None:
                    call["position_ids"] = position_ids
        return (), call

    def _block_site(self, site: str) -> BlockSite | None:
        hooks = self._hooks()
        hook_point = hooks.get(site)
        if hook_point is None:
            return None
        parsed = _BLOCK_OUTPUT.match(self._canonical_name(site, hook_point, hooks))
        blocks = getattr(self._model, "blocks", None)
        if parsed is None or not isinstance(blocks, nn.ModuleList) or int(parsed["index"]) >= len(blocks):
            return None
        return BlockSite(blocks, int(parsed["index"]))

    def _resumable(self, site: str) -> BlockSite:
        self._site(site)
        block_site = self._block_site(site)
        if block_site is None:
            raise SiteError(
                f"{self.name}: runs can resume only at a block's output (blocks.{{i}}.hook_resid_post); "
                f"{site!r} is not one, run it with run_with_replacement"
            )
        return block_site

    # -- sites ---------------------------------------------------------------------

    def _site(self, site: str) -> _HookSite:
        hooks = self._hooks()
        hook_point = hooks.get(site)
        if hook_point is None:
            raise unknown_site_error(site, self.sites(), self.name)
        return self._hook_site(site, hook_point, hooks)

    def _hooks(self) -> Mapping[str, Any]:
        # A bridge builds its hook_dict anew at each access (aliases included: about 1.4 ms
        # for SmolLM2's 30 blocks), so each operation reads it once and passes it on.
        return self._model.hook_dict

    def _hook_site(self, site: str, hook_point: Any, hooks: Mapping[str, Any]) -> _HookSite:
        hook_name = self._canonical_name(site, hook_point, hooks)
        flag = self._flag_turned_off(hook_name)
        if flag is not None:
            raise SiteError(
                f"{self.name}: hook {site!r} fires only when cfg.{flag} is True; "
                f"call model.set_{flag}(True) first"
            )
        pos_dim = getattr(hook_point, "pos_dim", None)
        is_attention_map = hook_name.endswith(_ATTENTION_MAP_SUFFIXES) or site.endswith(_ATTENTION_MAP_SUFFIXES)
        if is_attention_map or pos_dim not in (None, 1):
            raise SiteError(
                f"{self.name}: hook {site!r} is not indexed by position on dim 1 (attention maps are "
                "(batch, heads, query, key)); sites must be (batch, seq, width) or (batch, seq, heads, d_head)"
            )
        record = self._probe().get(hook_name)
        if record is None:
            raise SiteError(
                f"{self.name}: hook {site!r} exists but did not fire in a forward pass of this model: its "
                "code path is not used by this architecture or configuration"
            )
        if record.calls > 1:
            raise SiteError(
                f"{self.name}: hook {site!r} fires {record.calls} times per forward pass; a replacement at "
                "positions needs a hook that fires once"
            )
        batch, seq_len = self._probe_dims()
        if not record.is_float or len(record.shape) < 3 or record.shape[:2] != (batch, seq_len):
            raise SiteError(
                f"{self.name}: hook {site!r} holds a {'float' if record.is_float else 'non-float'} tensor of shape "
                f"{record.shape} on {batch} sequences of length {seq_len}; sites must be float (batch, seq, width) "
                "or (batch, seq, heads, d_head) activations"
            )
        return _HookSite(hook_name, record.shape[2:])

    def _canonical_name(self, site: str, hook_point: Any, hooks: Mapping[str, Any]) -> str:
        # The bridge lists one hook point under several names (hook_resid_post is an
        # alias of hook_out); keyed by the canonical name, one probe record serves
        # every spelling, and each point is hooked once.
        canonical = getattr(hook_point, "name", None)
        if isinstance(canonical, str) and hooks.get(canonical) is hook_point:
            return canonical
        return site

    def _flag_turned_off(self, hook_name: str) -> str | None:
        """The config flag that ``hook_name`` needs to fire, if that flag is off."""
        flag = _gating_flag(hook_name)
        cfg = getattr(self._model, "cfg", None)
        if flag is None or cfg is None or getattr(cfg, flag, False):
            return None
        return flag

    def _probe_dims(self) -> tuple[int, int]:
        if self._example_inputs is not None:
            tokens, _ = _split_inputs(self._example_inputs)
            return tokens.shape[0], tokens.shape[1]
        n_ctx = getattr(getattr(self._model, "cfg", None), "n_ctx", None)
        seq_len = min(_PROBE_SEQ_LEN, n_ctx) if isinstance(n_ctx, int) and n_ctx > 0 else _PROBE_SEQ_LEN
        return _PROBE_BATCH, seq_len

    def _probe(self) -> dict[str, _HookRecord]:
        """Shapes at every hook point that fires, keyed by canonical name (cached per flag setting)."""
        cfg = getattr(self._model, "cfg", None)
        flags = tuple(getattr(cfg, flag, None) for flag in _FLAGS)
        if flags in self._probes:
            return self._probes[flags]

        if self._example_inputs is not None:
            tokens, kwargs = _split_inputs(self._example_inputs)
        else:
            tokens, kwargs = torch.zeros(self._probe_dims(), dtype=torch.long, device=self.device), {}
        records: dict[str, _HookRecord] = {}

        def recorder(hook_name: str) -> Callable[..., None]:
            def record(activation: Tensor, hook: Any = None) -> None:
                previous = records.get(hook_name)
                calls = previous.calls + 1 if previous is not None else 1
                shape = previous.shape if previous is not None else tuple(activation.shape)
                records[hook_name] = _HookRecord(shape, activation.is_floating_point(), calls)

            return record

        # The bridge refuses hooks on a gated-off point; HookedTransformer accepts them and
        # never fires them. Either way there is nothing to record there.
        hooks = self._hooks()
        canonical_names = (self._canonical_name(name, point, hooks) for name, point in hooks.items())
        hook_names = [name for name in dict.fromkeys(canonical_names) if self._flag_turned_off(name) is None]
        with probing(self._model):
            try:
                self._model.run_with_hooks(tokens, fwd_hooks=[(n, recorder(n)) for n in hook_names], **kwargs)
            except (RuntimeError, ValueError, TypeError, IndexError) as error:
                raise RuntimeError(
                    f"{self.name}: the probing forward pass that finds the sites' widths failed on "
                    f"{'example_inputs' if self._example_inputs is not None else 'zero token ids'} "
                    f"({type(error).__name__}: {error}); pass example_inputs=... that the model accepts"
                ) from error
        self._probes[flags] = records
        return records


# -- TransformerLens 3.x's unembedding, without its copy per call -------------------------


@contextlib.contextmanager
def unembedding_without_copies(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model.unembed.W_U`` is laid out so that its transpose is contiguous.

    TransformerLens 3.x's ``Unembed`` computes ``F.linear(x, W_U.T.contiguous(), b_U)``:
    a copy of the whole unembedding at every call (Gemma-3-270M's 262,144 x 640: 670 MB,
    about 0.5 s on a 2-core CPU, most of a DAS step there). Stored as the transpose of a
    ``(vocab, d_model)`` matrix, ``W_U`` has the same values and shape, ``W_U.T`` is
    contiguous and the copy is skipped. One copy is made on entry; the original storage
    is put back on exit (the ``Parameter`` object stays the same throughout, so an
    optimiser holding it is unaffected). A model without ``unembed.W_U`` is left alone.

    ``fit``, ``evaluate`` and patching enter it themselves (the adapter's :meth:`run_context`);
    around one's own runs: ``with unembedding_without_copies(model): model.run_with_hooks(...)``.
    """
    weight = getattr(getattr(model, "unembed", None), "W_U", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.T.is_contiguous():
        yield
        return
    original = weight.data
    weight.data = original.T.contiguous().T
    try:
        yield
    finally:
        weight.data = original


# -- a HookedTransformer's runs from cached keys and values -----------------------------


class _HookedTransformerKeyValues:
    """Runs of a ``HookedTransformer`` (TransformerLens 2.x/3.x) over cached keys and values.

    Its forward takes them as ``past_kv_cache``: per block an entry with ``past_keys``
    ``(batch, pos, kv_heads, d_head)`` (before rotary embeddings, which each run applies
    from the attention mask) and ``append(keys, values)``, which returns the keys and
    values to attend to. :class:`_CacheEntry` is such an entry, so no TransformerLens
    class (renamed between 2.x and 3.x) is needed. :meth:`prefix` reads one row's states
    at the site and the later blocks' keys and values in one run, which stops once the
    last block has stored its own; :meth:`run_from` runs the blocks after the site on
    positions ``start..`` only, with ``start_at_layer``.
    """

    def __init__(self, model: nn.Module, name: str, unembed: nn.Module) -> None:
        self.model, self.name, self.unembed = model, name, unembed

    def prefix(self, inputs: ModelInputs, hook_name: str, block_site: BlockSite, start: int) -> KeyValuePrefix:
        tokens, mask = self._tokens_and_mask(inputs)
        if not 0 < start < tokens.shape[1]:
            raise ValueError(f"{self.name}: keys and values before position {start} of {tokens.shape[1]}: start must lie in 1..{tokens.shape[1] - 1}")
        cfg = self.model.cfg
        heads = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        blocks = block_site.stack
        entries = _KeyValueCache(
            _CacheEntry(*(torch.empty(tokens.shape[0], 0, heads, cfg.d_head, dtype=_dtype_of(block), device=_device_of(block)),) * 2, record=True)
            for block in blocks
        )
        site_is_last = block_site.index == len(blocks) - 1
        # The run stops once it has what it reads: the last block's keys and values (its
        # attention and MLP are not needed), or the site's states when no block follows it.
        entries[-1].stop_after_append = not site_is_last
        states: list[Tensor] = []

        def read(activation: Tensor, hook: Any = None) -> None:
            states.append(activation)
            if site_is_last:
                raise StopForward

        with torch.no_grad(), explaining_inference_weights(self.model, self.name):
            try:
                self.model.run_with_hooks(
                    tokens,
                    fwd_hooks=[(hook_name, read)],
                    attention_mask=torch.ones_like(tokens) if mask is None else mask,
                    past_kv_cache=entries,
                )
            except StopForward:
                pass
        if len(states) != 1 or entries[-1].past_keys.shape[1] != tokens.shape[1]:
            raise SiteError(f"{self.name}: the run that reads keys and values did not reach every block once")
        later = entries[block_site.index + 1 :]
        return KeyValuePrefix(
            states=states[0],
            keys=tuple(entry.past_keys[:, :start].transpose(1, 2) for entry in later),
            values=tuple(entry.past_values[:, :start].transpose(1, 2) for entry in later),
            start=start,
            first_block=block_site.index + 1,
            n_blocks=len(blocks),
        )

    def run_from(
        self, inputs: ModelInputs, site: str, block_site: BlockSite, prefix: KeyValuePrefix, positions: Tensor, replace: Replacement
    ) -> Tensor:
        """The logits of the run with the replacement, over positions ``prefix.start..`` only
        (laid out as a full run's; those before ``prefix.start`` are the unembedding of zeros)."""
        written = positions[positions >= 0]
        if written.numel() and int(written.min()) < prefix.start:
            raise ValueError(
                f"{self.name}: this prefix holds keys and values up to position {prefix.start}, but the interchange "
                f"writes position {int(written.min())}; build it with a start at or before the first written position"
            )
        _, mask = self._tokens_and_mask(inputs)
        replacement = RowReplacementHook(positions, replace, site, self.model, self.name)
        states = replacement(prefix.states)[:, prefix.start :]
        # Blocks before first_block do not run (start_at_layer) and never read their entries.
        entries = _KeyValueCache([None] * prefix.first_block)
        entries.extend(_CacheEntry(keys.transpose(1, 2), values.transpose(1, 2)) for keys, values in zip(prefix.keys, prefix.values))
        with explaining_inference_weights(self.model, self.name), left_padded_unembedding(self.unembed, prefix.start):
            logits = self.model(states, start_at_layer=prefix.first_block, past_kv_cache=entries, attention_mask=mask)
        replacement.check_gradient_reached(logits)
        return logits

    def _tokens_and_mask(self, inputs: ModelInputs) -> tuple[Tensor, Tensor | None]:
        tokens, kwargs = _split_inputs(inputs)
        extra = sorted(set(kwargs) - {"attention_mask"})
        if extra:
            raise ValueError(f"{self.name}: runs from cached keys and values take token ids and an attention_mask only; got {extra}")
        return tokens, kwargs.get("attention_mask")


class _CacheEntry:
    """One block's keys and values in the form a ``HookedTransformer`` attention reads.

    ``append`` returns the cached keys and values followed by the new ones; it stores
    them only when ``record`` is set, and then raises :class:`StopForward` when
    ``stop_after_append`` is set.
    """

    def __init__(self, past_keys: Tensor, past_values: Tensor, record: bool = False) -> None:
        self.past_keys, self.past_values, self.record = past_keys, past_values, record
        self.stop_after_append = False

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        keys = torch.cat([self.past_keys.to(keys.dtype), keys], dim=1)
        values = torch.cat([self.past_values.to(values.dtype), values], dim=1)
        if self.record:
            self.past_keys, self.past_values = keys, values
            if self.stop_after_append:
                raise StopForward
        return keys, values


class _KeyValueCache(list):
    """The per-block entries, with the one method a ``HookedTransformer``'s embedding step calls."""

    def append_attention_mask(self, attention_mask: Tensor) -> Tensor:
        return attention_mask  # nothing cached before: the mask is the run's own


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype())


def _device_of(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


# -- helpers ---------------------------------------------------------------------------


def _bridge_attentions(model: nn.Module) -> list[nn.Module]:
    """The bridge's attention components in ``model``: those that store keys and values themselves."""
    return [module for module in model.modules() if callable(getattr(module, "_update_kv_cache", None))]


def _forward_handing_caches_on(model: nn.Module, attentions: list[nn.Module], *args: Any, **kwargs: Any) -> Any:
    """``model(*args, **kwargs)`` with each bridge attention given the key/value cache under the
    name it reads (``past_key_values``) when the Hugging Face layer hands it on as ``cache``
    (transformers >= 5.20): without it the attention neither stores nor reads cached keys
    (``fit`` would find the run from them wrong on its first rows and run every position)."""

    def hand_on(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
            kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
        return args, kwargs

    handles = [module.register_forward_pre_hook(hand_on, with_kwargs=True) for module in attentions]
    try:
        return model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def _gating_flag(hook_name: str) -> str | None:
    for suffix, flag in _FLAG_OF_SUFFIX:
        if hook_name.endswith(suffix):
            return flag
    return None


def _positive_int(value: Any) -> int | None:
    """A config size (``d_vocab``, ``n_ctx``) when set; TransformerLens marks an unset one with -1."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _split_inputs(inputs: ModelInputs) -> tuple[Tensor, dict[str, Any]]:
    """``(tokens, forward keyword arguments)`` from a token tensor or a mapping."""
    if isinstance(inputs, Tensor):
        return inputs, {}
    if isinstance(inputs, Mapping):
        keys = [key for key in _TOKEN_KEYS if key in inputs]
        if len(keys) != 1:
            raise KeyError(
                f"inputs must hold the tokens under exactly one of {list(_TOKEN_KEYS)}; got keys {list(inputs)}"
            )
        kwargs = {key: value for key, value in inputs.items() if key != keys[0]}
        return inputs[keys[0]], kwargs
    raise TypeError(f"inputs must be a tensor or a mapping of tensors, got {type(inputs).__name__}")
