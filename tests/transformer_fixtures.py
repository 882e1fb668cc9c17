"""Small transformers built from configs, for the adapter tests and the numeric tasks.

Nothing is downloaded: the Hugging Face hub is switched to offline mode before
``transformers`` is imported, every model is built from a config, and the GPT-2
"pretrained" model is a randomly initialised one written to a local folder with
``save_pretrained``, which is how users hand a pretrained language model to
TransformerLens and nnsight without the hub.

- :func:`tiny_tl_transformer`: the papers' transformer shape (2 layers, d_model
  128, one head, rotary positions) as a TransformerLens 4 ``TransformerBridge``
  around its native model.
- :func:`save_tiny_gpt2`, :func:`gpt2_through_transformer_lens`,
  :func:`gpt2_through_nnsight`: one GPT-2-architecture checkpoint, loaded back
  through each library.
- :class:`TinyHookedTransformer`: a transformer written directly on
  ``HookedRootModule``, as ``HookedTransformer`` (TransformerLens 2.x/3.x) is, for
  the adapter's duck-typed path.

Importing this module imports TransformerLens; ``transformers``, ``tokenizers`` and
nnsight are imported by the functions that use them.
"""

from __future__ import annotations

import os

# Before transformers / huggingface_hub are imported: they read these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from transformer_lens import HookedRootModule, TransformerBridge, TransformerBridgeConfig  # noqa: E402
from transformer_lens.hook_points import HookPoint  # noqa: E402

# Special tokens of the GPT-2 fixture's word-level tokenizer; ordinary tokens are t4, t5, ...
GPT2_PAD, GPT2_BOS, GPT2_EOS, GPT2_UNK = 0, 1, 2, 3


def tiny_tl_transformer(
    d_vocab: int, n_ctx: int = 64, seed: int = 0, d_model: int = 128, n_layers: int = 2
) -> TransformerBridge:
    """A ``TransformerBridge`` over TransformerLens's native model: one head of width ``d_model``, rotary positions.

    Pre-LayerNorm blocks with a GELU MLP of width ``4 * d_model``; seeded, so the
    same arguments give the same weights. Input ``(batch, seq)`` token ids,
    output ``(batch, seq, d_vocab)`` logits.
    """
    config = TransformerBridgeConfig(
        d_model=d_model,
        d_head=d_model,
        n_heads=1,
        n_layers=n_layers,
        n_ctx=n_ctx,
        d_vocab=d_vocab,
        positional_embedding_type="rotary",
        act_fn="gelu",
        seed=seed,
    )
    return TransformerBridge.boot_native(config, device="cpu")


def save_tiny_gpt2(
    folder: str | Path,
    seed: int = 0,
    vocab_size: int = 48,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 2,
    n_positions: int = 64,
) -> Path:
    """Write a random GPT-2-architecture ``GPT2LMHeadModel`` and a word-level tokenizer to ``folder``.

    The tokenizer splits on whitespace and maps ``"t<i>"`` to id ``i``; ids 0..3
    are pad, bos, eos and unknown. Returns the folder.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = Path(folder)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_positions=n_positions,
        bos_token_id=GPT2_BOS,
        eos_token_id=GPT2_EOS,
        pad_token_id=GPT2_PAD,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    word_level = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab_size)}, unk_token=f"t{GPT2_UNK}"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        pad_token=f"t{GPT2_PAD}",
        bos_token=f"t{GPT2_BOS}",
        eos_token=f"t{GPT2_EOS}",
        unk_token=f"t{GPT2_UNK}",
    )
    tokenizer.save_pretrained(folder)
    return folder


def gpt2_from_folder(folder: str | Path) -> nn.Module:
    """The checkpoint as plain ``transformers`` loads it, in eval mode."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(folder)).eval()


def gpt2_through_transformer_lens(folder: str | Path) -> TransformerBridge:
    """The checkpoint in ``folder`` as a ``TransformerBridge`` (TransformerLens 4), on the CPU.

    ``boot_transformers`` takes a local folder where it takes a hub name: config,
    weights and tokenizer are read from the folder. It keeps the HF weights
    unprocessed, so logits match ``transformers`` itself.
    """
    return TransformerBridge.boot_transformers(str(folder), device="cpu").eval()


def gpt2_through_nnsight(folder: str | Path) -> Any:
    """The checkpoint in ``folder`` as an nnsight ``TransformersModel``, weights loaded (eval mode).

    ``TransformersModel`` takes a local folder where it takes a hub name;
    ``task`` is given because transformers cannot infer it offline.
    """
    from nnsight import TransformersModel

    return TransformersModel(str(folder), task="text-generation", dispatch=True)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no parameter requires grad; returns the model."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


class _HookedAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_ctx: int) -> None:
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.register_buffer("causal", torch.tril(torch.ones(n_ctx, n_ctx, dtype=torch.bool)), persistent=False)
        self.hook_z = HookPoint()  # (batch, seq, heads, d_head)
        self.hook_pattern = HookPoint()  # (batch, heads, query, key)

    def forward(self, x: Tensor, attention_mask: Tensor | None) -> Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, self.d_head).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / self.d_head**0.5
        allowed = self.causal[:seq, :seq][None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        # A padding query attends to nothing; nan_to_num keeps its row at zero.
        pattern = self.hook_pattern(scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num())
        z = self.hook_z(torch.einsum("bhqk,bkhd->bqhd", pattern, v))
        return self.out(z.reshape(batch, seq, -1))


class _HookedBlock(nn.Module):
    def __init__(self, cfg: SimpleNamespace) -> None:
        super().__init__()
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = _HookedAttention(cfg.d_model, cfg.n_heads, cfg.n_ctx)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model))
        self.hook_resid_pre = HookPoint()
        self.hook_mlp_in = HookPoint()  # fires only when cfg.use_hook_mlp_in, as in HookedTransformer
        self.hook_resid_post = HookPoint()

    def forward(self, resid: Tensor, attention_mask: Tensor | None) -> Tensor:
        resid = self.hook_resid_pre(resid)
        resid = resid + self.attn(self.ln1(resid), attention_mask)
        mlp_in = self.ln2(resid)
        if self.cfg.use_hook_mlp_in:
            mlp_in = self.hook_mlp_in(mlp_in)
        return self.hook_resid_post(resid + self.mlp(mlp_in))


class TinyHookedTransformer(HookedRootModule):
    """A transformer written on ``HookedRootModule`` with HookedTransformer's hook names.

    Hooks: ``hook_embed``, ``blocks.{i}.hook_resid_pre``, ``blocks.{i}.attn.hook_z``
    (per head), ``blocks.{i}.attn.hook_pattern``, ``blocks.{i}.hook_mlp_in`` (fires
    only when ``cfg.use_hook_mlp_in``), ``blocks.{i}.hook_resid_post``, and
    ``hook_unused``, which never fires. Learned absolute positions, counted from
    each row's first real token under an attention mask. ``forward(tokens,
    attention_mask=None)``: ``(batch, seq)`` ids to ``(batch, seq, d_vocab)`` logits.
    """

    def __init__(
        self, d_vocab: int = 12, d_model: int = 32, n_heads: int = 2, n_layers: int = 2, n_ctx: int = 16, seed: int = 0
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.cfg = SimpleNamespace(
            d_model=d_model,
            n_heads=n_heads,
            n_ctx=n_ctx,
            use_hook_mlp_in=False,
            use_attn_result=False,
            use_split_qkv_input=False,
            use_attn_in=False,
        )
        self.embed = nn.Embedding(d_vocab, d_model)
        self.pos_embed = nn.Embedding(n_ctx, d_model)
        self.hook_embed = HookPoint()
        self.hook_unused = HookPoint()
        self.blocks = nn.ModuleList(_HookedBlock(self.cfg) for _ in range(n_layers))
        self.unembed = nn.Linear(d_model, d_vocab)
        self.setup()

    def set_use_hook_mlp_in(self, value: bool) -> None:
        self.cfg.use_hook_mlp_in = value

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        if attention_mask is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        resid = self.hook_embed(self.embed(tokens)) + self.pos_embed(positions)
        for block in self.blocks:
            resid = block(resid, attention_mask)
        return self.unembed(resid)
