"""The adapter cases shared by the conformance suite and the bad-input tests.

Six cases, one per adapter and kind of site: a fused GRU and a fused LSTM (split
recurrence), a per-step GRUCell loop and a ``(batch, seq, width)`` module (all
through ``TorchModuleAdapter``), a TransformerLens ``TransformerBridge`` and an
nnsight-wrapped GPT-2 built from a config (nothing downloaded). Models come out
in train mode with every parameter requiring grad, dropout off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformer_fixtures import TinyHookedTransformer, tiny_tl_transformer

from masalign.adapters import NNsightAdapter, TorchModuleAdapter, TransformerLensAdapter

VOCAB = 12
TOKENS = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(0))
POSITIONS = torch.tensor([[1, 5], [7, 0], [3, 4]])  # per example, unsorted, distinct
CASES = ["gru", "lstm", "cell", "sequence", "transformer_lens", "nnsight"]
TORCH_SITES = {"gru": "rnn.h_l1", "lstm": "rnn.hc_l0", "cell": "cell", "sequence": "mixer"}


class ToyRecurrent(nn.Module):
    """embedding -> mixer (Linear) -> a fused GRU / LSTM (2 layers) or a GRUCell loop -> readout.

    ``forward(tokens, attention_mask=None)``; right padding needs no mask, as a
    causal model's real positions never see it. Setting ``misbehave`` to
    ``"too_few"`` or ``"too_many"`` makes the module ``misbehaving`` ("mixer",
    "rnn" or "cell") run too few times (not at all; the cell: 3 steps short) or
    too many (twice; the cell: twice per step).
    """

    def __init__(self, kind: str, misbehaving: str = "") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.embedding = nn.Embedding(VOCAB, 6)
        self.mixer = nn.Linear(6, 6)
        if kind == "cell":
            self.cell = nn.GRUCell(6, 5)
        else:
            self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[kind](6, 5, num_layers=2, batch_first=True)
        self.readout = nn.Linear(5, VOCAB)
        self.misbehaving = misbehaving
        self.misbehave = ""

    def runs(self, module: str) -> int:
        """How often ``module`` runs: 1, or 0 / 2 while it misbehaves."""
        if module != self.misbehaving or not self.misbehave:
            return 1
        return 0 if self.misbehave == "too_few" else 2

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = self.embedding(tokens)
        for _ in range(self.runs("mixer")):
            x = self.mixer(x)
        if self.kind == "cell":
            return self.readout(self._loop(x))
        if self.runs("rnn") == 0:
            return self.readout(x[..., :5])
        return self.readout(sum(self.rnn(x)[0] for _ in range(self.runs("rnn"))))

    def _loop(self, x: Tensor) -> Tensor:
        runs = self.runs("cell")
        h = x.new_zeros(x.shape[0], 5)
        outputs = []
        for t in range(x.shape[1]):
            for _ in range(runs if runs else int(t < x.shape[1] - 3)):
                h = self.cell(x[:, t], h)
            outputs.append(h)
        return torch.stack(outputs, 1)


class MisbehavingHooked(TinyHookedTransformer):
    """TinyHookedTransformer whose ``blocks.0.hook_resid_post`` fires never or twice while ``misbehave`` is set."""

    misbehave = ""

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        resid = self.hook_embed(self.embed(tokens)) + self.pos_embed(torch.arange(tokens.shape[1])[None])
        for index, block in enumerate(self.blocks):
            if index == 0 and self.misbehave == "too_few":
                continue
            resid = block(resid, attention_mask)
            if index == 0 and self.misbehave == "too_many":
                resid = block.hook_resid_post(resid)
        return self.unembed(resid)


def tiny_gpt2() -> nn.Module:
    """A 2-layer GPT-2 of width 32 over ``VOCAB`` tokens, context 16, dropout off; built from a config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(config)


@dataclass
class Case:
    adapter: Any
    model: nn.Module  # the torch module behind the adapter
    site: str
    tokens_key: str  # where a mapping holds the tokens
    padding_sides: tuple[str, ...]

    def inputs(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Any:
        if attention_mask is None:
            return tokens
        return {self.tokens_key: tokens, "attention_mask": attention_mask}


def make_case(name: str) -> Case:
    if name in TORCH_SITES:
        model = ToyRecurrent("gru" if name == "sequence" else name)
        return Case(TorchModuleAdapter(model), model, TORCH_SITES[name], "tokens", ("right",))
    if name == "transformer_lens":
        model = tiny_tl_transformer(d_vocab=VOCAB, n_ctx=16, d_model=32)
        return Case(TransformerLensAdapter(model), model, "blocks.0.hook_resid_post", "input", ("left", "right"))
    adapter = NNsightAdapter(tiny_gpt2())
    return Case(adapter, adapter.model, "transformer.h.0.output", "input_ids", ("left", "right"))


def make_misbehaving_case(name: str) -> tuple[Any, nn.Module, str]:
    """``(adapter, model, site)``: setting ``model.misbehave`` makes the site run too few or too many times."""
    if name in TORCH_SITES:
        kind = "gru" if name == "sequence" else name
        model = ToyRecurrent(kind, misbehaving=TORCH_SITES[name].split(".")[0])
        return TorchModuleAdapter(model), model, TORCH_SITES[name]
    if name == "transformer_lens":
        model = MisbehavingHooked(d_vocab=VOCAB, d_model=16, n_layers=2)
        return TransformerLensAdapter(model), model, "blocks.0.hook_resid_post"
    model = ToyRecurrent("gru", misbehaving="mixer")
    return NNsightAdapter(model, example_inputs=TOKENS), model, "mixer.output"


def identity(hidden: Tensor, example_index: Tensor, slot_index: Tensor) -> Tensor:
    return hidden
