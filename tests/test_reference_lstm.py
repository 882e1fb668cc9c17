"""The LSTM reference model: the papers' shape (two 64-wide cells, site [h; c] 128 wide), cached and reloaded."""

from __future__ import annotations

import pytest

from masalign import models


def test_the_lstm_reference_model_is_cached_and_reloaded(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = models.train_lm
    monkeypatch.setattr(models, "train_lm", lambda task, config, seed, **recipe: train(task, config, seed=seed, steps=2, check_every=1))
    adapter, info = models.reference_model("lstm", "multi_object", 0, tmp_path, log=lambda *a: None)
    assert not info["cached"] and adapter.sites()[models.DEMO_SITES["lstm"]] == 128
    again, info = models.reference_model("lstm", "multi_object", 0, tmp_path, log=lambda *a: None)
    assert info["cached"] and type(again.model.rnn).__name__ == "LSTM"
    assert models.DEMO_PAIRS["gru-lstm"] == (("gru", 0), ("lstm", 0))


def test_the_reference_transformer_is_trained_with_void_tokens_and_resumes(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The transformer recipe is the reference's (void tokens 0.2, lr 5e-4); its training leaves a checkpoint
    beside the cache folder while it runs, and removes it once the model is saved."""
    train, seen = models.train_lm, {}

    def short_training(task, config, seed, **recipe):
        seen.update(recipe, void_p=task.void_p, vocab_size=config.vocab_size)
        recipe.update(steps=3, checkpoint_every=2)
        return train(task, config, seed=seed, **recipe)

    monkeypatch.setattr(models, "train_lm", short_training)
    adapter, info = models.reference_model("transformer", "multi_object", 0, tmp_path, log=lambda *a: None)
    assert seen["void_p"] == 0.2 and seen["lr"] == 5e-4 and seen["vocab_size"] == 9
    assert info["folder"].endswith("multi_object-transformer128-void0.2-seed0") and info["training_steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi_object-transformer128-void0.2-seed0"]
