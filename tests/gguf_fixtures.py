"""Tiny GGUF files written with the ``gguf`` package's own writer, for the conversion tests.

Each is a real model file in llama.cpp's layout (its metadata keys, its tokenizer
metadata, its tensor names ``token_embd.weight``, ``blk.0.attn_q.weight``, ...), with
random float32 weights and a vocabulary of a few hundred tokens: a few tens of KB,
loaded by transformers in well under a second.

- :func:`write_tiny_llama_gguf`: architecture ``llama`` with a byte-level BPE
  (``gpt2``) tokenizer, as SmolLM2's file has: 2 layers, width 16, 4 query heads
  and 2 key/value heads of width 4, tied embeddings.
- :func:`write_tiny_gemma3_gguf`: architecture ``gemma3`` with a sentencepiece
  (``llama``) tokenizer, as Gemma-3's file has: 2 layers, width 16, 2 query heads
  and 1 key/value head of width 8, query/key norms and the four Gemma norms.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_CONTROL, _NORMAL = 3, 1  # llama.cpp token types

# Byte-level BPE merges over GPT-2's byte alphabet ("Ġ" is the space byte).
_BPE_MERGES = ("Ġ t", "h e", "Ġt he", "Ġ c", "a p", "Ġc ap", "i t", "Ġ i", "Ġi s", "Ġ P", "a r", "Ġ F", "r a")
_SENTENCEPIECE_WORDS = ("▁the", "▁is", "▁day", "▁Mon", "▁Tues", "▁Wednes", "▁Thurs", "day", "on", "es", "ur")


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for _, code in sorted(zip(printable, codes))]


def _normal(rng: np.random.Generator, *shape: int, scale: float = 0.3) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _around_one(rng: np.random.Generator, width: int) -> np.ndarray:
    return (1.0 + 0.1 * rng.standard_normal(width)).astype(np.float32)


def write_tiny_llama_gguf(path: str | Path, seed: int = 0) -> Path:
    """A 2-layer llama-architecture GGUF with a byte-level BPE tokenizer; returns ``path``."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + _byte_alphabet() + ["".join(merge.split(" ")) for merge in _BPE_MERGES]
    hidden, ffn, heads, kv_heads, head_dim, layers = 16, 32, 4, 2, 4, 2

    writer = _writer(path, "llama", hidden, ffn, heads, kv_heads, layers)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    _add_tokenizer(writer, "gpt2", "smollm", tokens, len(specials), bos=1, eos=2, unk=0, pad=2, add_bos=False)
    writer.add_token_merges(list(_BPE_MERGES))

    writer.add_tensor("token_embd.weight", _normal(rng, len(tokens), hidden))
    for block in range(layers):
        prefix = f"blk.{block}."
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(prefix + norm + ".weight", _around_one(rng, hidden))
        _add_block_weights(writer, rng, prefix, hidden, ffn, heads, kv_heads, head_dim)
    _finish(writer, rng, hidden)
    return path


def write_tiny_gemma3_gguf(path: str | Path, seed: int = 0) -> Path:
    """A 2-layer gemma3-architecture GGUF with a sentencepiece tokenizer; returns ``path``."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    characters = ["▁", ",", "."] + [chr(code) for code in range(ord("a"), ord("z") + 1)] + ["M", "T", "W", "F"]
    tokens = specials + characters + list(_SENTENCEPIECE_WORDS)
    hidden, ffn, heads, kv_heads, head_dim, layers = 16, 32, 2, 1, 8, 2

    writer = _writer(path, "gemma3", hidden, ffn, heads, kv_heads, layers)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(512)
    _add_tokenizer(writer, "llama", "default", tokens, len(specials), bos=2, eos=1, unk=3, pad=0, add_bos=True)
    writer.add_token_scores([0.0] * len(specials) + [-float(index) for index in range(len(tokens) - len(specials))])

    writer.add_tensor("token_embd.weight", _normal(rng, len(tokens), hidden))
    for block in range(layers):
        prefix = f"blk.{block}."
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            writer.add_tensor(prefix + norm + ".weight", _around_one(rng, hidden))
        writer.add_tensor(prefix + "attn_q_norm.weight", _around_one(rng, head_dim))
        writer.add_tensor(prefix + "attn_k_norm.weight", _around_one(rng, head_dim))
        _add_block_weights(writer, rng, prefix, hidden, ffn, heads, kv_heads, head_dim)
    _finish(writer, rng, hidden)
    return path


def _writer(path: Path, architecture: str, hidden: int, ffn: int, heads: int, kv_heads: int, layers: int):
    """A ``GGUFWriter`` with the shape metadata both architectures share."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"tiny {architecture}")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    return writer


def _add_tokenizer(
    writer, model: str, pre: str, tokens: list[str], n_special: int, *, bos: int, eos: int, unk: int, pad: int, add_bos: bool
) -> None:
    """The tokenizer metadata: ``tokens[:n_special]`` are control tokens, the rest normal ones."""
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([_CONTROL] * n_special + [_NORMAL] * (len(tokens) - n_special))
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_unk_token_id(unk)
    writer.add_pad_token_id(pad)
    writer.add_add_bos_token(add_bos)


def _add_block_weights(writer, rng, prefix: str, hidden: int, ffn: int, heads: int, kv_heads: int, head_dim: int) -> None:
    """One block's attention and gated-MLP matrices, in llama.cpp's names (numpy shape = torch's (out, in))."""
    writer.add_tensor(prefix + "attn_q.weight", _normal(rng, heads * head_dim, hidden))
    writer.add_tensor(prefix + "attn_k.weight", _normal(rng, kv_heads * head_dim, hidden))
    writer.add_tensor(prefix + "attn_v.weight", _normal(rng, kv_heads * head_dim, hidden))
    writer.add_tensor(prefix + "attn_output.weight", _normal(rng, hidden, heads * head_dim))
    writer.add_tensor(prefix + "ffn_gate.weight", _normal(rng, ffn, hidden))
    writer.add_tensor(prefix + "ffn_up.weight", _normal(rng, ffn, hidden))
    writer.add_tensor(prefix + "ffn_down.weight", _normal(rng, hidden, ffn))


def _finish(writer, rng, hidden: int) -> None:
    """The final norm (embeddings are tied: no ``output.weight``), then the file."""
    writer.add_tensor("output_norm.weight", _around_one(rng, hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
