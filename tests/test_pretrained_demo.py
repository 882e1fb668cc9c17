"""`masalign demo --pair pretrained-lm` end to end, on two tiny llama-architecture models.

The real models are too large for the suite; two tiny models written as GGUF files
and converted like the real ones (one through TransformerLens, one through nnsight,
with their own byte-level tokenizers) go through every stage of the demo: ceilings,
the DAS and MAS layer sweeps, the final fit and the files it writes. The numbers are
meaningless for untrained models; the layout and the plumbing are what is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from masalign import ModelAlignment
from masalign.cli import main as cli_main

pytest.importorskip("gguf")
from gguf_fixtures import write_tiny_llama_gguf  # noqa: E402

import masalign.pretrained  # noqa: E402
from masalign import pretrained_demo  # noqa: E402
from masalign.pretrained import gguf_to_hf_folder, load_pretrained  # noqa: E402


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny-lms")
    return {
        name: gguf_to_hf_folder(write_tiny_llama_gguf(folder / f"{name}.gguf", seed=seed), folder / name)
        for name, seed in (("smollm2", 0), ("gemma3", 1))
    }


def test_pretrained_demo_writes_the_report_the_sweep_and_a_loadable_alignment(tiny_folders, tmp_path, monkeypatch) -> None:
    torch.set_num_threads(1)
    # smollm2 by its name, as the real demo has it: converted into --cache (here: the tiny folder)
    conversions = []

    def pretrained_folder(name, out_folder=None, **kwargs):
        conversions.append((name, out_folder))
        return tiny_folders["smollm2"]

    monkeypatch.setattr(masalign.pretrained, "pretrained_folder", pretrained_folder)
    monkeypatch.setattr(pretrained_demo, "DEMO_LMS", {
        "smollm2": pretrained_demo.DemoModel("smollm2-135m", "transformer_lens", "blocks.{layer}.hook_resid_post", 2, (0, 1)),
        "gemma3": pretrained_demo.DemoModel(str(tiny_folders["gemma3"]), "nnsight", "model.layers.{layer}.output", 2, (1,)),
    })
    out = tmp_path / "out"
    arguments = [
        "demo", "--pair", "pretrained-lm", "--out", str(out), "--cache", str(tmp_path / "cache"), "--quiet",
        "--steps", "4", "--sweep-steps", "2", "--eval-every", "2", "--train-pairs", "32", "--valid-pairs", "8",
        "--test-pairs", "16", "--batch-size", "8", "--subspace-dim", "4", "--layers-gemma3", "1",
        "--lm-position", "item_last", "--lm-low", "1", "--lm-high", "20",
    ]
    assert cli_main(arguments) == 0
    assert conversions == [("smollm2-135m", tmp_path / "cache" / "pretrained" / "smollm2-135m")]
    report = json.loads((out / "report.json").read_text())
    assert report["parametrization"] == "householder" and report["device"] == "cpu"
    assert report["pair"] == "pretrained-lm" and report["models"] == ["smollm2", "gemma3"]
    assert report["positions"] == ["item_last"]
    for key in ("iia", "floor", "iia_token", "floor_token"):
        assert set(report[key]) == {"smollm2", "gemma3"} and all(set(row) == {"smollm2", "gemma3"} for row in report[key].values())
    assert set(report["ceiling"]) == {"smollm2", "gemma3"} and all(0 <= c <= 1 for c in report["ceiling"].values())
    sweep = report["layer_sweep"]
    assert sweep["layers"] == {"smollm2": [0, 1], "gemma3": [1]}  # smollm2's from DemoModel.sweep_layers
    assert set(sweep["mas"]) == {"0,1", "1,1"} and set(sweep["das"]["smollm2"]) == {"0", "1"}
    best = sweep["best"]
    assert report["sites"] == {"smollm2": f"blocks.{best['smollm2']}.hook_resid_post", "gemma3": f"model.layers.{best['gemma3']}.output"}
    assert (out / "iia.png").stat().st_size > 0 and (out / "layer_sweep.png").stat().st_size > 0

    # The saved alignment loads back onto the same models.
    adapters = {name: load_pretrained(str(folder), backend, name=name)[0] for (name, folder), backend in
                zip(tiny_folders.items(), ("transformer_lens", "nnsight"))}
    loaded = ModelAlignment.load(out / "alignment", adapters)
    assert loaded.sites == report["sites"] and loaded.subspace_dim == {"number": 4}

    # A second run into the same folder is refused without --overwrite.
    with pytest.raises(SystemExit, match="--overwrite"):
        cli_main(arguments)


def test_a_layer_outside_the_model_is_an_error() -> None:
    with pytest.raises(ValueError, match="layers 0..29"):
        pretrained_demo.DEMO_LMS["smollm2"].site(30)
