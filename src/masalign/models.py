"""Reference recurrent models for the numeric tasks: build, train, save, load.

``RecurrentLM`` is embedding -> ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` -> linear readout, a
next-token model over the task vocabulary. Its sites (through
``TorchModuleAdapter``): ``embedding``, ``rnn.h_l0`` (and ``rnn.c_l0``, ``rnn.hc_l0``
for an LSTM), ``readout``.

Models are saved as ``model.safetensors`` plus ``config.json``; nothing is pickled.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
    held_out_trial_accuracy: float
    seconds: float


def train_recurrent_lm(
    task: NumericTask,
    config: RecurrentConfig = RecurrentConfig(),
    seed: int = 0,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 3e-3,
    target_accuracy: float = 0.995,
    check_every: int = 100,
) -> tuple[RecurrentLM, TrainingSummary]:
    """Train a reference model on ``task`` (held-out counts excluded), seeded.

    Stops early once trial accuracy on sequences with held-out counts reaches
    ``target_accuracy``. Returns the model in eval mode, and a summary.
    """
    torch.manual_seed(seed)
    model = RecurrentLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    check = task.sample(1000, seed=seed + 10_000, split="held_out")
    start = time.perf_counter()
    loss_value, accuracy, step = float("nan"), 0.0, 0
    for step in range(1, steps + 1):
        batch = task.sample(batch_size, seed=seed * 1_000_003 + step, split="train")
        logits = model(batch.inputs)
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
                correct_trials, _, _ = correct_counts(model(check.inputs), check.labels)
            accuracy = correct_trials / len(check)
            model.train()
            if accuracy >= target_accuracy:
                break
    optimizer.zero_grad(set_to_none=True)  # leave no stale gradients on the returned model
    model.eval()
    return model, TrainingSummary(step, loss_value, accuracy, time.perf_counter() - start)


def save_recurrent_lm(model: RecurrentLM, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(asdict(model.config), indent=2))


def load_recurrent_lm(folder: str | Path) -> RecurrentLM:
    folder = Path(folder)
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"{folder} does not hold a saved RecurrentLM (config.json and model.safetensors)")
    config = RecurrentConfig(**json.loads((folder / "config.json").read_text()))
    model = RecurrentLM(config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()
