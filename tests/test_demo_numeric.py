"""The numeric demo end to end on tiny stand-ins for the cached reference models: the
GRU-transformer pair runs the stepwise protocol and its report carries both models' ceilings."""

from __future__ import annotations

import json
import re

import pytest
import torch

from masalign import TorchModuleAdapter, TransformerLensAdapter, cli
from masalign.models import RecurrentConfig, RecurrentLM, TransformerConfig, build_transformer_lm
from masalign.tasks import VOID_VOCAB_SIZE


def tiny_reference_model(architecture: str, task_name: str, seed: int, cache, log):
    torch.manual_seed(seed)
    if architecture == "transformer":  # the reference transformer reads the void token too
        model = build_transformer_lm(TransformerConfig(d_model=16, n_layers=1, vocab_size=VOID_VOCAB_SIZE), seed)
        return TransformerLensAdapter(model, name=f"transformer_seed{seed}"), {"cached": True}
    return TorchModuleAdapter(RecurrentLM(RecurrentConfig(architecture, 16, 8)).eval(), name=f"{architecture}_seed{seed}"), {"cached": True}


@pytest.mark.parametrize(("pair", "protocol", "expected"), [("gru-transformer", None, "stepwise"), ("gru-transformer", "single", "single"), ("gru-gru", None, "single")])
def test_the_numeric_demo_reports_its_protocol_and_both_ceilings(tmp_path, monkeypatch, pair, protocol, expected) -> None:
    monkeypatch.setattr(cli, "reference_model", tiny_reference_model)
    out = tmp_path / "out"
    arguments = ["demo", "--pair", pair, "--out", str(out), "--cache", str(tmp_path / "cache"), "--quiet", "--steps", "2",
                 "--train-pairs", "64", "--valid-pairs", "16", "--test-pairs", "32", "--batch-size", "16", "--eval-every", "1",
                 "--subspace-dim", "2"]
    assert cli.main(arguments + (["--protocol", protocol] if protocol else [])) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"] == expected
    assert set(report["ceiling"]) == set(report["models"]) and len(report["models"]) == 2
    assert all(0 <= value <= 1 for value in report["ceiling"].values())


def test_protocol_is_refused_for_the_pretrained_demo(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["demo", "--pair", "pretrained-lm", "--protocol", "stepwise", "--out", str(tmp_path / "out")])
    assert "--protocol applies to the numeric pairs" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--pair", "pretrained-lm", "--task", "same_object"], "--task applies to the numeric pairs only"),
        (["--pair", "pretrained-lm", "--transformer-site", "hook_embed"], "--transformer-site applies to the numeric pairs only"),
        (["--pair", "gru-gru", "--lm-low", "3"], "--lm-low applies to --pair pretrained-lm only, not to --pair gru-gru"),
        (["--pair", "gru-lstm", "--layers-smollm2", "3", "--sweep-steps", "4"], "--sweep-steps, --layers-smollm2 applies to --pair pretrained-lm only"),
        (["--pair", "gru-gru", "--transformer-site", "hook_embed"], "--transformer-site applies to --pair gru-transformer only"),
        (["--pair", "pretrained-lm", "--lm-low", "50", "--lm-high", "20"], "--lm-low 50 must be below --lm-high 20"),
        (["--pair", "pretrained-lm", "--layers-gemma3", "20"], r"--layers-gemma3 \[20\]: gemma3-270m has layers 0..17"),
        (["--pair", "pretrained-lm", "--layers-smollm2", "-1", "4"], r"--layers-smollm2 \[-1\]: smollm2-135m has layers 0..29"),
        (["--pair", "pretrained-lm", "--lm-low", "1", "--lm-high", "20"], "1..20 mixes lengths: use e.g. --lm-low 10 --lm-high 98"),
    ],
)
def test_flags_the_pair_would_ignore_or_fail_on_late_are_refused_at_once(tmp_path, capsys, monkeypatch, flags, message) -> None:
    """Refused by the parser before any model is trained, converted or loaded."""
    def no_loading(*args, **kwargs):
        raise AssertionError("nothing may be loaded before the flags are checked")

    monkeypatch.setattr(cli, "reference_model", no_loading)
    monkeypatch.setattr(cli, "run_demo", no_loading)
    with pytest.raises(SystemExit):
        cli.main(["demo", *flags, "--out", str(tmp_path / "out")])
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
