"""Reference models: an LSTM trains on the task, saves and loads back exactly, and its
[h; c] site works through the adapter."""

from __future__ import annotations

import pytest
import torch

from masalign import TorchModuleAdapter
from masalign.models import RecurrentConfig, TransformerConfig, load_model, save_model, train_lm


def test_lstm_trains_saves_and_loads(small_task, tmp_path) -> None:
    torch.set_num_threads(2)
    model, summary = train_lm(small_task, RecurrentConfig("lstm", hidden_size=32, embedding_size=16), seed=2, steps=1500, lr=5e-3, check_every=50)
    assert summary.check_trial_accuracy >= 0.98, summary
    save_model(model, tmp_path / "lstm")
    loaded = load_model(tmp_path / "lstm")
    data = small_task.sample(64, seed=5, split="held_out")
    assert torch.equal(model(data.inputs), loaded(data.inputs))
    assert TorchModuleAdapter(loaded).sites()["rnn.hc_l0"] == 64


def test_loading_a_folder_without_a_model(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not hold a saved masalign reference model"):
        load_model(tmp_path)


def test_an_interrupted_training_resumes_exactly_from_its_checkpoint(small_task, tmp_path) -> None:
    """Batches are seeded by step and the optimiser's moments are saved, so a resumed run ends where an
    uninterrupted one does; the checkpoint left after step 4 of 7 is what a second call resumes from."""
    config = RecurrentConfig("gru", hidden_size=16, embedding_size=8)
    settings = dict(seed=1, steps=7, lr=1e-2, check_every=100, target_accuracy=2.0)
    whole, _ = train_lm(small_task, config, **settings, checkpoint=tmp_path / "run", checkpoint_every=4)
    lines: list[str] = []
    resumed, summary = train_lm(small_task, config, **settings, checkpoint=tmp_path / "run", log=lines.append)
    assert any("resuming" in line and "step 5" in line for line in lines) and summary.steps == 7
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_a_checkpoint_of_another_training_is_not_resumed(small_task, tmp_path) -> None:
    config = RecurrentConfig("gru", hidden_size=16, embedding_size=8)
    train_lm(small_task, config, seed=1, steps=5, lr=1e-2, target_accuracy=2.0, checkpoint=tmp_path / "run", checkpoint_every=2)
    with pytest.raises(ValueError, match="other lr, seed.*delete it to start over"):
        train_lm(small_task, config, seed=2, steps=5, lr=3e-3, target_accuracy=2.0, checkpoint=tmp_path / "run")


def test_a_checkpoint_of_another_config_with_the_same_shapes_is_not_resumed(small_task, tmp_path) -> None:
    """A transformer's context length changes no parameter shape (rotary positions): the checkpoint
    records the config itself, so the shapes are not all that is compared."""
    settings = dict(seed=0, steps=5, batch_size=8, target_accuracy=2.0, checkpoint=tmp_path / "run")
    train_lm(small_task, TransformerConfig(d_model=16, n_ctx=96), **settings, checkpoint_every=2)
    with pytest.raises(ValueError, match=r"other config \(config: 'TransformerConfig\(.*n_ctx=96.*' there, 'TransformerConfig\(.*n_ctx=32"):
        train_lm(small_task, TransformerConfig(d_model=16, n_ctx=32), **settings)
    train_lm(small_task, TransformerConfig(d_model=16, n_ctx=96), **settings)  # the same config resumes


def test_loading_and_training_leave_the_callers_random_state_alone(small_task, tmp_path) -> None:
    config = RecurrentConfig("gru", hidden_size=16, embedding_size=8)
    model, _ = train_lm(small_task, config, seed=1, steps=2, target_accuracy=2.0)
    save_model(model, tmp_path / "gru")
    for load in (lambda: load_model(tmp_path / "gru"), lambda: train_lm(small_task, config, seed=1, steps=2, target_accuracy=2.0)):
        draws = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            load()
            draws.append(torch.rand(3))
        assert not torch.equal(draws[0], draws[1])
        torch.manual_seed(2)
        assert torch.equal(torch.rand(3), draws[1])
