"""Reference models: an LSTM trains on the task, saves and loads back exactly, and its
[h; c] site works through the adapter."""

from __future__ import annotations

import pytest
import torch

from masalign import TorchModuleAdapter
from masalign.models import RecurrentConfig, load_model, save_model, train_lm


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
