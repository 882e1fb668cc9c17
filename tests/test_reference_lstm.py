"""The LSTM reference model: the papers' shape (two 64-wide cells, site [h; c] 128 wide), cached and reloaded."""

from __future__ import annotations

import pytest

from masalign import models


def test_the_lstm_reference_model_is_cached_and_reloaded(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = models.train_lm
    monkeypatch.setattr(models, "train_lm", lambda task, config, seed: train(task, config, seed=seed, steps=2, check_every=1))
    adapter, info = models.reference_model("lstm", "multi_object", 0, tmp_path, log=lambda *a: None)
    assert not info["cached"] and adapter.sites()[models.DEMO_SITES["lstm"]] == 128
    again, info = models.reference_model("lstm", "multi_object", 0, tmp_path, log=lambda *a: None)
    assert info["cached"] and type(again.model.rnn).__name__ == "LSTM"
    assert models.DEMO_PAIRS["gru-lstm"] == (("gru", 0), ("lstm", 0))
