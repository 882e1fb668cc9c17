"""Reference models for the numeric tasks: build, train, save, load.

- ``RecurrentLM``: embedding -> ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` -> linear readout.
  Sites through ``TorchModuleAdapter``: ``embedding``, ``rnn.h_l0`` (and ``rnn.c_l0``,
  ``rnn.hc_l0`` for an LSTM), ``readout``.
- The papers' transformer (2 layers, width 128, one head, rotary positions) as a
  TransformerLens ``TransformerBridge`` built from a config
  (:func:`build_transformer_lm`). Sites through ``TransformerLensAdapter``:
  ``hook_embed``, ``blocks.{0,1}.hook_resid_post``, ...

Both are next-token models over the task vocabulary, trained by :func:`train_lm`
and saved as ``model.safetensors`` plus ``config.json``; nothing is pickled.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .data import IGNORE_INDEX
from .evaluate import correct_counts
from .tasks import VOCAB_SIZE, NumericTask


@dataclass(frozen=True)
class RecurrentConfig:
    cell: str = "gru"  # "gru", "lstm" or "rnn"
    hidden_size: int = 128
    embedding_size: int = 128
    num_layers: int = 1
    vocab_size: int = VOCAB_SIZE


class RecurrentLM(nn.Module):
    """Next-token model: ``(batch, seq)`` token ids -> ``(batch, seq, vocab)`` logits."""

    def __init__(self, config: RecurrentConfig = RecurrentConfig()) -> None:
        super().__init__()
        cells = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}
        if config.cell not in cells:
            raise ValueError(f"unknown cell {config.cell!r}; use one of {sorted(cells)}")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        self.rnn = cells[config.cell](config.embedding_size, config.hidden_size, config.num_layers, batch_first=True)
        self.readout = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embedding(tokens))
        return self.readout(hidden)


@dataclass
class TrainingSummary:
    steps: int
    final_loss: float
    check_trial_accuracy: float  # on the check split (held-out counts by default)
    seconds: float


@dataclass(frozen=True)
class TransformerConfig:
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 1
    n_ctx: int = 96  # counterfactual sequences run up to about 63 tokens
    vocab_size: int = VOCAB_SIZE


ModelConfig = Union[RecurrentConfig, TransformerConfig]


def build_transformer_lm(config: TransformerConfig = TransformerConfig(), seed: int = 0) -> nn.Module:
    """The papers' transformer as a TransformerLens ``TransformerBridge`` (imported lazily)."""
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    bridge_config = TransformerBridgeConfig(
        d_model=config.d_model,
        d_head=config.d_model // config.n_heads,
        n_heads=config.n_heads,
        n_layers=config.n_layers,
        n_ctx=config.n_ctx,
        d_vocab=config.vocab_size,
        positional_embedding_type="rotary",
        act_fn="gelu",
        seed=seed,
    )
    model = TransformerBridge.boot_native(bridge_config, device="cpu")
    model.masalign_config = config  # what save_model writes
    return model


def build_model(config: ModelConfig, seed: int = 0) -> nn.Module:
    if isinstance(config, TransformerConfig):
        return build_transformer_lm(config, seed)
    torch.manual_seed(seed)
    return RecurrentLM(config)


def train_lm(
    task: NumericTask,
    config: ModelConfig = RecurrentConfig(),
    seed: int = 0,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 3e-3,
    target_accuracy: float = 0.995,
    check_every: int = 100,
    model: nn.Module | None = None,
    check_split: str = "held_out",
) -> tuple[nn.Module, TrainingSummary]:
    """Build and train a reference model on ``task`` (held-out counts excluded), seeded.

    Stops early once trial accuracy on sequences with held-out counts reaches
    ``target_accuracy``. Returns the model in eval mode, and a summary. Pass
    ``model`` (tokens -> logits, or an output with ``.logits``) to train your own
    architecture instead of building one from ``config``. ``check_split="train"``
    checks on the training counts instead, for models that cannot interpolate to
    unseen counts (e.g. learned absolute position embeddings).
    """
    torch.manual_seed(seed)
    model = build_model(config, seed) if model is None else model
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    check = task.sample(1000, seed=seed + 10_000, split=check_split)
    start = time.perf_counter()
    loss_value, accuracy, step = float("nan"), 0.0, 0
    model.train()
    for step in range(1, steps + 1):
        batch = task.sample(batch_size, seed=seed * 1_000_003 + step, split="train")
        logits = _logits(model(batch.inputs))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        if step % check_every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                correct_trials, _, _ = correct_counts(_logits(model(check.inputs)), check.labels)
            accuracy = correct_trials / len(check)
            model.train()
            if accuracy >= target_accuracy:
                break
    optimizer.zero_grad(set_to_none=True)  # leave no stale gradients on the returned model
    model.eval()
    return model, TrainingSummary(step, loss_value, accuracy, time.perf_counter() - start)


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def save_model(model: nn.Module, folder: str | Path) -> Path:
    """Write a reference model as ``model.safetensors`` + ``config.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config if isinstance(model, RecurrentLM) else getattr(model, "masalign_config", None)
    if not isinstance(config, (RecurrentConfig, TransformerConfig)):
        raise TypeError("save_model saves the reference models built by masalign.models; save other models with their own library")
    architecture = "recurrent" if isinstance(config, RecurrentConfig) else "transformer"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": architecture, **asdict(config)}, indent=2))
    return folder


def load_model(folder: str | Path) -> nn.Module:
    """Load a model written by :func:`save_model` (safetensors; nothing is unpickled)."""
    folder = Path(folder)
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"{folder} does not hold a saved masalign reference model (config.json and model.safetensors)")
    fields = json.loads((folder / "config.json").read_text())
    architecture = fields.pop("architecture", "recurrent")
    config: ModelConfig = RecurrentConfig(**fields) if architecture == "recurrent" else TransformerConfig(**fields)
    model = build_model(config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()
