"""Which model packages ``SOTA_SERVE_MODEL`` names: one package, a comma-separated list of
packages or model-store tags, or a repository directory of packages.

A repository is laid out as Triton's and TorchServe's are: each subfolder a model, named by the
folder, holding one package (``name/card.json``) or one folder per version
(``name/<version>/card.json``), of which the latest serves (versions compare as numbers where
they are numbers: ``10`` is after ``9``). Anything else in it (files, hidden folders, a folder
without a package) is ignored, so that a version being copied in is not taken before its
``card.json`` is. A package on its own, or in a list, is named and versioned by its card.

Nothing here opens a package: :func:`sota_serve.package.loading.open_package` does, when a
server loads what :func:`scan` found.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sota_serve.constants import CARD_FILE
from sota_serve.errors import CardError, PackageError
from sota_serve.package.loading import read_card, store_model_dir

#: a model's name: a URL path segment as it is (routes /models/{name}/..., /v2/models/{name})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Entry:
    """One model to serve: its name and version, where its package is (a directory or file, or
    a model-store tag), and, for a repository folder, a signature of what is on disk: the
    modification time of the version's card, which changes when a version is replaced."""

    name: str
    version: str
    source: str
    signature: int = 0


def is_repository(path: Path) -> bool:
    """A directory that is not a package itself."""
    return path.is_dir() and not (path / CARD_FILE).exists()


def scan(spec: str, resolve: Callable[[str], str] | None = None) -> list[Entry]:
    """The models ``spec`` names, in its order (a repository's: by name). ``resolve``: a
    model-store tag to its directory (the front end's store; default: BentoML's local store).
    Raises PackageError naming the problem: a package that is not there, an empty repository,
    two models of one name, a name that cannot be a URL segment."""
    items = [part.strip() for part in spec.split(",") if part.strip()] if "," in spec else [spec]
    if len(items) == 1 and is_repository(Path(items[0])):
        entries = scan_repository(Path(items[0]))
        if not entries:
            raise PackageError(f"{items[0]}: no {CARD_FILE} here and no model package in its subfolders (a package"
                               f" directory holds {CARD_FILE}; a repository holds a subfolder per model, with"
                               f" {CARD_FILE} or one subfolder per version holding it)")
    else:
        entries = [_single(item, resolve) for item in items]
    seen: dict[str, str] = {}
    for entry in entries:
        if entry.name in seen:
            raise PackageError(f"two models are named {entry.name!r} ({seen[entry.name]} and {entry.source});"
                               " give each package a name of its own")
        seen[entry.name] = entry.source
    return entries


def scan_repository(root: Path) -> list[Entry]:
    """Each model folder's serving version, by name."""
    entries = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        entry = model_folder(folder)
        if entry is not None:
            entries.append(entry)
    return entries


def model_folder(folder: Path) -> Entry | None:
    """The version of one model folder that serves (None when it holds no package yet)."""
    _check_name(folder.name, folder)
    if (folder / CARD_FILE).exists():
        return Entry(folder.name, _card_version(folder), str(folder), _signature(folder))
    versions = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / CARD_FILE).exists()]
    if not versions:
        return None
    latest = max(versions, key=lambda p: version_key(p.name))
    return Entry(folder.name, latest.name, str(latest), _signature(latest))


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Orders versions as people number them: ``2`` < ``10``, ``1.9`` < ``1.10``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[.\-_]", version))


def _single(item: str, resolve: Callable[[str], str] | None) -> Entry:
    """A package directory or file, or a model-store tag, named on its own: by its card."""
    path = Path(item)
    if not path.exists():
        stored = resolve(item) if resolve else store_model_dir(item)
        if stored is None or not Path(stored).exists():
            raise PackageError(f"{item}: no such package directory, model file or BentoML model-store tag"
                               " (see `bentoml models list`)")
        path = Path(stored)
    card = read_card(path)
    _check_name(card.name, item)
    return Entry(card.name, card.version, str(path), _signature(path))


def _card_version(folder: Path) -> str:
    try:
        return read_card(folder).version
    except CardError:
        return "1"  # loading it says what is wrong with the card


def _signature(folder: Path) -> int:
    try:
        return (folder / CARD_FILE).stat().st_mtime_ns
    except OSError:
        return 0


def _check_name(name: str, where: object) -> None:
    if not _NAME.match(name):
        raise PackageError(f"{where}: {name!r} cannot name a model: use letters, digits, '.', '_' and '-'"
                           " (it is a URL path segment), at most 128, starting with a letter or digit")
