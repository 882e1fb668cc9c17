"""fit's progress bar outside a terminal (a log file, CI, a notebook without widgets): a few lines, not one per step."""

from __future__ import annotations

import contextlib
import io

import torch

from masalign import CounterfactualPairs, ModelAlignment, TorchModuleAdapter, fit
from masalign.data import IGNORE_INDEX
from masalign.models import RecurrentConfig, RecurrentLM


def test_a_fit_logged_to_a_file_refreshes_rarely() -> None:
    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig(hidden_size=8, embedding_size=8, vocab_size=12)).eval()
    n, seq = 32, 5
    labels = torch.full((n, seq), IGNORE_INDEX)
    labels[:, -1] = torch.randint(0, 12, (n,))
    pairs = CounterfactualPairs(torch.randint(0, 12, (n, seq)), torch.randint(0, 12, (n, seq)),
                                torch.full((n, 1), 2), torch.full((n, 1), 2), labels)
    alignment = ModelAlignment({"A": TorchModuleAdapter(model)}, "rnn.h_l0", subspace_dim=2)
    log = io.StringIO()  # not a terminal
    with contextlib.redirect_stderr(log):
        result = fit(alignment, pairs, pairs, steps=200, batch_size=8, eval_every=20, target_accuracy=2.0, patience=100)
    assert result.steps == 200
    # The bar's first and last draws and at most one per 10 s, however many steps and validations.
    assert log.getvalue().count("\r") <= 4, log.getvalue()[-500:]
