"""examples/align_hf_language_models.py end to end, at its reduced (--quick) size.

Two GPT-2-architecture checkpoints are trained, saved, loaded back through
TransformerLens and nnsight, and aligned; about 30 s on one CPU core.
"""

from __future__ import annotations

import json

import pytest

from example_scripts import load_example


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("hf_example")
    return out_dir, load_example("align_hf_language_models.py").main(out_dir, quick=True)


def test_both_checkpoints_learned_the_task(run):
    _, report = run
    assert set(report.models) == {"tl_w64", "nnsight_w96"}
    for name in report.models:
        assert report.extra["trained_accuracy"][name] >= 0.97, report.extra
        # The ceiling is measured again after the round trip through the folder and the backend.
        assert report.ceiling[name] >= 0.97, report.table()


def test_the_alignment_transfers_the_queried_value_between_the_models(run):
    _, report = run
    # Observed in the quick run: 1.00 within each model, 0.95 and 1.00 across; floor 0.
    for source in report.models:
        for target in report.models:
            assert report.floor[source][target] <= 0.1, report.table()
            assert report.iia[source][target] >= 0.8, report.table()
            assert report.iia[source][target] - report.floor[source][target] >= 0.7, report.table()


def test_the_run_leaves_loadable_checkpoints_and_its_report(run):
    out_dir, report = run
    for name in report.models:
        folder = out_dir / name
        assert (folder / "config.json").exists() and (folder / "word_vocabulary.json").exists()
        assert not (folder / "vocab.json").exists()  # a GPT-2 tokenizer file name would mislead the loaders
    saved = json.loads((out_dir / "report.json").read_text())
    assert saved["iia"] == report.iia and saved["sites"] == {
        "tl_w64": "blocks.0.hook_resid_post",
        "nnsight_w96": "transformer.h.0.output",
    }
    assert (out_dir / "alignment" / "alignment.safetensors").exists()
