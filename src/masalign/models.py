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
:func:`reference_model` trains each architecture with its recipe
(:data:`REFERENCE_RECIPES`): the transformer as the reference trains it (void tokens
with probability 0.2, lr 5e-4, batch 128, at most 20,000 steps); it solves the
held-out counts.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from .data import IGNORE_INDEX
from .arithmetic import ArithmeticTask
from .objectives import correct_counts
from .storage import FORMAT_VERSION, atomic_folder, read_save, write_json, write_tensors
from .tasks import VOCAB_SIZE, VOID_VOCAB_SIZE, NumericTask


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


@torch.random.fork_rng()  # training seeds torch; the caller's random state is left alone
def train_lm(
    task: NumericTask | ArithmeticTask,
    config: ModelConfig = RecurrentConfig(),
    seed: int = 0,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 3e-3,
    target_accuracy: float = 0.995,
    check_every: int = 100,
    model: nn.Module | None = None,
    check_split: str = "held_out",
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 1000,
    log: Callable[[str], Any] | None = None,
) -> tuple[nn.Module, TrainingSummary]:
    """Build and train a reference model on ``task`` (held-out counts excluded), seeded.

    Stops early once trial accuracy on sequences with held-out counts reaches
    ``target_accuracy``. Returns the model in eval mode, and a summary. Pass
    ``model`` (tokens -> logits, or an output with ``.logits``) to train your own
    architecture instead of building one from ``config``. ``check_split="train"``
    checks on the training counts instead, for models that cannot interpolate to
    unseen counts (e.g. learned absolute position embeddings). The Arithmetic task
    has no held-out split: it checks on fresh sequences. Sequences come from
    ``task`` as it is (with its void tokens, if any); the check uses the same task
    without voids, the sequences the model will be aligned on.

    ``checkpoint``: a folder where the model, the optimiser and the step are saved
    every ``checkpoint_every`` steps; a run that finds one there resumes from it and
    ends exactly where an uninterrupted run would (batches are seeded by step).
    ``log`` receives a progress line at every check. The caller's torch random state is
    left as it was.
    """
    torch.manual_seed(seed)
    # What a checkpoint must have been written with to be resumed by this call: the config a
    # model is built from, or the class of the model given.
    model_settings = repr(config) if model is None else type(model).__name__
    model = build_model(config, seed) if model is None else model
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    # Tasks without held-out counts (Arithmetic) sample without a split and check on fresh sequences.
    has_splits = isinstance(task, NumericTask)
    check = replace(task, void_p=0.0).sample(1000, seed=seed + 10_000, split=check_split) if has_splits else task.sample(1000, seed=seed + 10_000)
    check_split = check_split if has_splits else "fresh"
    start = time.perf_counter()
    loss_value, accuracy, step, first_step, seconds_before = float("nan"), 0.0, 0, 1, 0.0
    settings = {"task": repr(task), "config": model_settings, "seed": seed,
                "steps": steps, "batch_size": batch_size, "lr": lr}
    if checkpoint is not None and (Path(checkpoint) / CHECKPOINT_FILES[0]).is_file():
        first_step, seconds_before = _resume(Path(checkpoint), model, optimizer, scheduler, settings)
        if log is not None:
            log(f"    resuming from {checkpoint} at step {first_step}")
    model.train()
    for step in range(first_step, steps + 1):
        batch_seed = seed * 1_000_003 + step
        batch = task.sample(batch_size, seed=batch_seed, split="train") if has_splits else task.sample(batch_size, seed=batch_seed)
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
            if log is not None:
                elapsed = seconds_before + time.perf_counter() - start
                log(f"    step {step}: loss {loss_value:.4f}, {check_split} trial accuracy {accuracy:.3f} ({elapsed:.0f} s)")
            if accuracy >= target_accuracy:
                break
        if checkpoint is not None and step % checkpoint_every == 0 and step < steps:
            _save_checkpoint(Path(checkpoint), model, optimizer, step, seconds_before + time.perf_counter() - start, settings)
    optimizer.zero_grad(set_to_none=True)  # leave no stale gradients on the returned model
    model.eval()
    return model, TrainingSummary(step, loss_value, accuracy, seconds_before + time.perf_counter() - start)


CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "progress.json")


def _save_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, seconds: float, settings: dict[str, Any]
) -> None:
    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value for index, entry in state["state"].items() for name, value in entry.items()}
    with atomic_folder(folder, "masalign.training_checkpoint", overwrite=True, replaceable=CHECKPOINT_FILES) as temporary:
        write_tensors(temporary / "model.safetensors", model.state_dict())
        write_tensors(temporary / "optimizer.safetensors", tensors)
        write_json(temporary / "progress.json", {"format_version": FORMAT_VERSION, "step": step, "seconds": seconds, "settings": settings})


def _resume(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, settings: dict[str, Any]) -> tuple[int, float]:
    saved = read_save(folder, "masalign.training_checkpoint", CHECKPOINT_FILES, "training checkpoint", "progress.json")
    progress = saved.json("progress.json")
    written_with = progress.get("settings", {})
    differ = sorted(k for k in settings if written_with.get(k) != settings[k])
    if differ:  # resuming another run's state would give a model no single run produces
        raise ValueError(
            f"the checkpoint in {folder} was written by a training with other {', '.join(differ)} "
            f"({'; '.join(f'{k}: {written_with.get(k)!r} there, {settings[k]!r} here' for k in differ)}); delete it to "
            "start over, or pass the same settings"
        )
    step = int(progress["step"])
    if not 0 < step < settings["steps"]:
        raise ValueError(f"the checkpoint in {folder} is at step {step}, outside this run's 1..{settings['steps']}; delete it to start over")
    try:
        model.load_state_dict(saved.tensors("model.safetensors"))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in saved.tensors("optimizer.safetensors").items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ValueError(f"the checkpoint in {folder} does not fit this model ({exc}); delete it to start over") from exc
    with warnings.catch_warnings():  # torch warns about scheduler steps without optimiser steps
        warnings.simplefilter("ignore")
        for _ in range(step):  # the learning rate where the interrupted run left it
            scheduler.step()
    return step + 1, float(progress.get("seconds", 0.0))


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


MODEL_SAVE_KIND = "masalign.reference_model"
MODEL_FILES = ("model.safetensors", "config.json")


def save_model(model: nn.Module, folder: str | Path, overwrite: bool = False) -> Path:
    """Write a reference model as ``model.safetensors`` + ``config.json`` + ``manifest.json``.

    Atomic (an interrupted save leaves ``folder`` as it was); an existing save in
    ``folder`` raises ``FileExistsError`` unless ``overwrite=True``.
    """
    config = model.config if isinstance(model, RecurrentLM) else getattr(model, "masalign_config", None)
    if not isinstance(config, (RecurrentConfig, TransformerConfig)):
        raise TypeError("save_model saves the reference models built by masalign.models; save other models with their own library")
    architecture = "recurrent" if isinstance(config, RecurrentConfig) else "transformer"
    with atomic_folder(folder, MODEL_SAVE_KIND, overwrite, replaceable=MODEL_FILES) as temporary:
        write_tensors(temporary / "model.safetensors", model.state_dict())
        write_json(temporary / "config.json", {"format_version": FORMAT_VERSION, "architecture": architecture, **asdict(config)})
    return Path(folder)


def load_model(folder: str | Path) -> nn.Module:
    """Load a model written by :func:`save_model` (safetensors; nothing is unpickled)."""
    saved = read_save(folder, MODEL_SAVE_KIND, MODEL_FILES, "masalign reference model", "config.json")
    fields = saved.json("config.json")
    fields.pop("format_version", None)
    architecture = fields.pop("architecture", "recurrent")
    config_class = {"recurrent": RecurrentConfig, "transformer": TransformerConfig}.get(architecture)
    try:
        if config_class is None:
            raise TypeError(f"unknown architecture {architecture!r}")
        config: ModelConfig = config_class(**fields)
    except TypeError as exc:  # unknown architecture or fields
        raise ValueError(f"{Path(folder) / 'config.json'} is not a reference model's config ({exc})") from exc
    with torch.random.fork_rng(devices=[]):  # building seeds torch; a load must leave the caller's random state alone
        model = build_model(config)
    try:
        model.load_state_dict(saved.tensors("model.safetensors"))
    except RuntimeError as exc:  # missing, extra or reshaped tensors
        raise ValueError(f"{Path(folder) / 'model.safetensors'} does not fit the model in config.json: {exc}") from exc
    return model.eval()


# -- the demo's reference models, trained once and cached ------------------------------------


def default_cache() -> Path:
    """Where trained reference models and converted pretrained models are kept:
    ``$MASALIGN_CACHE``, else ``~/.cache/masalign``."""
    return Path(os.environ.get("MASALIGN_CACHE", Path.home() / ".cache" / "masalign"))


DEMO_PAIRS: dict[str, tuple[tuple[str, int], tuple[str, int]]] = {
    # pair name: ((architecture, seed), (architecture, seed))
    "gru-gru": (("gru", 0), ("gru", 1)),
    "gru-transformer": (("gru", 0), ("transformer", 1)),
    "gru-lstm": (("gru", 0), ("lstm", 0)),
}
DEMO_SITES = {"gru": "rnn.h_l0", "lstm": "rnn.hc_l0", "transformer": "blocks.0.hook_resid_post"}
ARCHITECTURES = tuple(DEMO_SITES)


def reference_config(architecture: str) -> ModelConfig:
    """The papers' shapes: a 1-layer GRU of width 128, a 1-layer LSTM of two 64-wide cells (its
    site ``[h; c]`` is 128 wide), or the 2-layer rotary transformer (whose vocabulary has the void token)."""
    if architecture == "gru":
        return RecurrentConfig("gru", hidden_size=128, embedding_size=128)
    if architecture == "lstm":
        return RecurrentConfig("lstm", hidden_size=64, embedding_size=128)
    if architecture == "transformer":
        return TransformerConfig(vocab_size=VOID_VOCAB_SIZE)
    raise ValueError(f"unknown reference architecture {architecture!r}; choose one of {list(ARCHITECTURES)}")


@dataclass(frozen=True)
class TrainingRecipe:
    """How a reference model is trained (:func:`train_lm`'s settings)."""

    steps: int
    lr: float
    void_p: float = 0.0  # void tokens in the training sequences' demo phase
    target_accuracy: float = 0.995
    check_every: int = 100


REFERENCE_RECIPES = {
    "gru": TrainingRecipe(steps=3000, lr=3e-3),
    "lstm": TrainingRecipe(steps=3000, lr=3e-3),
    # The reference's transformers: lr 5e-4, batch 128, about 20,000 steps, void tokens
    # with probability 0.2 (its "_unk" models, the ones it aligned).
    "transformer": TrainingRecipe(steps=20_000, lr=5e-4, void_p=0.2, target_accuracy=0.99, check_every=250),
}


def reference_folder(architecture: str, task_name: str, seed: int, cache: str | Path | None = None) -> Path:
    """Where :func:`reference_model` keeps a trained reference model."""
    recipe = REFERENCE_RECIPES[architecture] if architecture in REFERENCE_RECIPES else None
    voids = f"-void{recipe.void_p:g}" if recipe is not None and recipe.void_p else ""
    return Path(cache if cache is not None else default_cache()) / f"{task_name}-{architecture}128{voids}-seed{seed}"


def reference_model(
    architecture: str,
    task_name: str,
    seed: int,
    cache: str | Path | None = None,
    log: Any = print,
) -> tuple[Any, dict[str, Any]]:
    """A reference model trained on ``task_name`` with ``seed``, wrapped in its adapter.

    Trained once and kept in ``cache`` (default :func:`default_cache`); later calls
    load it. Returns ``(adapter, info)``: ``info`` says whether it came from the
    cache, the folder, and the training time and steps when it was trained now.
    """
    from .adapters import TorchModuleAdapter, TransformerLensAdapter
    from .tasks import get_task

    config = reference_config(architecture)
    folder = reference_folder(architecture, task_name, seed, cache)
    if folder.exists():
        log(f"  reusing {folder}")
        try:
            model = load_model(folder)
        except (ValueError, FileNotFoundError, OSError) as error:
            raise ValueError(
                f"the cached reference model in {folder} cannot be loaded ({error}); delete that folder "
                f"(rm -r '{folder}') and it will be trained again"
            ) from error
        info = {"cached": True, "folder": str(folder)}
    else:
        recipe = REFERENCE_RECIPES[architecture]
        log(f"  training {architecture} seed {seed} on {task_name} ({recipe.steps} steps at most) ...")
        # A checkpoint beside the folder: an interrupted training resumes where it stopped.
        checkpoint = folder.parent / f"{folder.name}.training"
        model, summary = train_lm(
            replace(get_task(task_name), void_p=recipe.void_p), config, seed=seed, steps=recipe.steps, lr=recipe.lr,
            target_accuracy=recipe.target_accuracy, check_every=recipe.check_every, checkpoint=checkpoint, log=log,
        )
        save_model(model, folder)
        shutil.rmtree(checkpoint, ignore_errors=True)
        log(
            f"  done in {summary.seconds:.0f}s ({summary.steps} steps, held-out accuracy "
            f"{summary.check_trial_accuracy:.3f}); saved to {folder}"
        )
        info = {
            "cached": False, "folder": str(folder), "training_seconds": summary.seconds, "training_steps": summary.steps,
            "held_out_trial_accuracy": summary.check_trial_accuracy,
        }
    name = f"{architecture}_seed{seed}"
    if architecture in ("gru", "lstm"):
        return TorchModuleAdapter(model, name=name), info
    return TransformerLensAdapter(model, name=name), info
