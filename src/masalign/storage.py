"""Saving folders safely: atomic writes, no silent overwrite, checksums checked on load.

A save is a folder of safetensors and JSON files (nothing is pickled) plus
``manifest.json``::

    {"format_version": 2, "kind": "masalign.alignment",
     "files": {"alignment.json": {"sha256": "...", "bytes": 1234}, ...}}

:func:`atomic_folder` writes into a temporary sibling ``.<name>.tmp-<random>``,
fsyncs it and renames it into place, so an interrupted save (an exception, Ctrl-C)
leaves the destination absent or unchanged. :func:`read_save` checks the manifest
(version, kind, every file's SHA-256) before anything is parsed.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_tensor_bytes
from safetensors.torch import save_file
from torch import Tensor

FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1  # safetensors + JSON without a manifest; loaded with a warning
MANIFEST = "manifest.json"


# -- writing -----------------------------------------------------------------------------


def write_json(path: Path, document: Any) -> None:
    path.write_text(json.dumps(document, indent=2))


def write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(path))


def check_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and check that files can be written in it.

    Call it before long work whose results go there; raises ``OSError`` naming
    the folder (``NotADirectoryError`` when it is a file).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".masalign-write-check-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"cannot write into {folder}: {exc.strerror or exc}") from exc
    return folder


@contextmanager
def atomic_folder(folder: str | Path, kind: str, overwrite: bool = False, replaceable: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary folder to write into; on success it becomes ``folder``.

    When the block ends, ``manifest.json`` (this format version, ``kind`` and a
    SHA-256 per file) is written, everything is fsynced and the temporary folder
    is renamed to ``folder``. On any exception, ``KeyboardInterrupt`` included, the
    temporary folder is removed and ``folder`` is left as it was.

    An existing ``folder`` raises ``FileExistsError`` unless it is empty or
    ``overwrite=True``; then it is replaced only after the new save is complete,
    and only if it holds nothing but a manifest and the names in ``replaceable``
    (a previous save of this kind), so that a wrong path cannot delete other files.
    """
    folder = Path(folder)
    _check_destination(folder, overwrite, set(replaceable) | {MANIFEST})
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.parent / f".{folder.name}.tmp-{secrets.token_hex(4)}"
    temporary.mkdir()
    try:
        yield temporary
        files = sorted(p for p in temporary.rglob("*") if p.is_file())
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "files": {p.relative_to(temporary).as_posix(): _file_entry(p.read_bytes()) for p in files},
        }
        write_json(temporary / MANIFEST, manifest)
        for path in [*files, temporary / MANIFEST]:
            _fsync(path)
        _fsync(temporary)
        _move_into_place(temporary, folder, overwrite)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _fsync(folder.parent)


def _check_destination(folder: Path, overwrite: bool, replaceable: set[str]) -> None:
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; choose a folder name for the save")
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(f"{folder} already exists; pass overwrite=True (--overwrite on the command line) to replace it")
    foreign = [name for name in entries if name not in replaceable]
    if foreign:
        raise FileExistsError(
            f"refusing to replace {folder}: it holds {foreign}, which a masalign save does not write; "
            "remove them yourself or save elsewhere"
        )


def _move_into_place(temporary: Path, folder: Path, overwrite: bool) -> None:
    if not folder.exists() or not any(folder.iterdir()):
        try:
            os.replace(temporary, folder)  # an empty folder is replaced atomically
        except OSError as exc:  # something appeared there meanwhile
            raise FileExistsError(f"{folder} appeared while saving; nothing was written there") from exc
        return
    if not overwrite:  # it was empty when the save began
        raise FileExistsError(f"{folder} was filled while saving; nothing was written there")
    old = folder.parent / f".{folder.name}.old-{secrets.token_hex(4)}"
    os.replace(folder, old)
    try:
        os.replace(temporary, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    if path.is_dir() and os.name != "posix":
        return  # directories cannot be opened for fsync on Windows
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _file_entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


# -- reading -----------------------------------------------------------------------------


class SavedFolder:
    """The checked contents of a save; parse them with :meth:`json` and :meth:`tensors`.

    ``checked`` is ``False`` for a legacy save without a manifest.
    """

    def __init__(self, folder: Path, contents: dict[str, bytes], checked: bool) -> None:
        self.folder = folder
        self.contents = contents
        self.checked = checked

    def json(self, name: str) -> dict[str, Any]:
        try:
            document = json.loads(self.contents[name])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.folder / name} is not valid JSON ({exc}); the save is truncated or corrupted") from exc
        if not isinstance(document, dict):
            raise ValueError(f"{self.folder / name} holds a JSON {type(document).__name__}, not an object; the save is corrupted")
        return document

    def tensors(self, name: str) -> dict[str, Tensor]:
        try:
            return load_tensor_bytes(self.contents[name])
        except Exception as exc:  # safetensors raises its own error type for every malformed header
            raise ValueError(
                f"{self.folder / name} is not a readable safetensors file ({exc}); the save is truncated or corrupted"
            ) from exc


def read_save(folder: str | Path, kind: str, files: tuple[str, ...], description: str, metadata_file: str) -> SavedFolder:
    """Read a folder written by :func:`atomic_folder`, checked against its manifest.

    ``files`` must all be present. Errors name the file: a missing one
    (``FileNotFoundError``), a checksum that differs (the save is corrupted or was
    edited), a format version this code does not know, a save of another ``kind``.
    A folder without a manifest whose ``metadata_file`` has ``format_version`` 1 (or
    none) is a legacy save: it is read unchecked, with a warning.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return _read_legacy(folder, files, description, metadata_file)
    manifest = SavedFolder(folder, {MANIFEST: manifest_path.read_bytes()}, False).json(MANIFEST)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{manifest_path} has format_version {version!r}, but this masalign reads format_version {FORMAT_VERSION} "
            f"(and {LEGACY_FORMAT_VERSION} without a manifest); it was written by another masalign version"
        )
    if manifest.get("kind") != kind:
        raise ValueError(f"{folder} holds a {manifest.get('kind')!r} save, not a {description} ({kind!r})")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise ValueError(f"{manifest_path} lists no files; the save is corrupted or was edited")
    for name in files:
        if name not in listed:
            raise ValueError(f"{manifest_path} does not list {name}; the save is corrupted or was edited")
    contents = {}
    for name, entry in listed.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{manifest_path} lists {name!r}, outside the save; the manifest was edited")
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; the save in {folder} is incomplete")
        data = path.read_bytes()
        if not isinstance(entry, dict) or _file_entry(data)["sha256"] != entry.get("sha256"):
            raise ValueError(
                f"{path} does not match the SHA-256 in {manifest_path}: the save is corrupted or was edited after saving"
            )
        contents[name] = data
    return SavedFolder(folder, contents, checked=True)


def _read_legacy(folder: Path, files: tuple[str, ...], description: str, metadata_file: str) -> SavedFolder:
    present = [name for name in files if (folder / name).is_file()]
    if not present:
        raise FileNotFoundError(f"{folder} does not hold a saved {description} ({', '.join(files)} and {MANIFEST})")
    if (folder / metadata_file).is_file():
        legacy = SavedFolder(folder, {metadata_file: (folder / metadata_file).read_bytes()}, False)
        version = legacy.json(metadata_file).get("format_version", LEGACY_FORMAT_VERSION)
        if version != LEGACY_FORMAT_VERSION:
            raise FileNotFoundError(
                f"{folder / MANIFEST} is missing but {folder / metadata_file} has format_version {version!r}: "
                "the save is incomplete or was edited"
            )
    for name in files:
        if name not in present:
            raise FileNotFoundError(f"{folder / name} is missing; the save in {folder} is incomplete")
    warnings.warn(
        f"{folder} was saved by an older masalign (format_version {LEGACY_FORMAT_VERSION}, no {MANIFEST}): its "
        "files cannot be checked for corruption; load it and save it again to add checksums",
        stacklevel=4,  # the caller of ModelAlignment.load / load_model
    )
    return SavedFolder(folder, {name: (folder / name).read_bytes() for name in files}, checked=False)
