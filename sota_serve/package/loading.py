"""Open a model package (a directory, a lone ``.onnx``, ``.pt2`` or ``.pt``) and check it.

Integrity: a directory's ``card.json`` records each artifact's sha256; :func:`open_package`
checks every one, and :meth:`ModelPackage.read_artifact` checks again the very bytes it hands
to a runtime, so a file swapped after opening is caught too. A lone file has no hash to check
(a file cannot hold its own) but carries its card. Nothing here unpickles or runs model code.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from sota_serve import formats
from sota_serve.constants import CARD_FILE
from sota_serve.errors import IntegrityError, PackageError
from sota_serve.package import keys as artifact_keys
from sota_serve.package.card import ModelCard


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelPackage:
    card: ModelCard
    #: by artifact key: ``onnx``, ``torchscript``, ``onnx-fp16``... (see :mod:`sota_serve.package.keys`)
    artifacts: dict[str, Path]
    root: Path | None = None
    #: True when the bytes are checked against hashes from a card.json.
    verified: bool = False
    source: str = field(default="")

    @property
    def backends(self) -> tuple[str, ...]:
        """The formats it can serve (each at fp32, some also at fp16)."""
        return tuple(f for f in formats.NAMES if self.precisions(f))

    def precisions(self, backend: str) -> tuple[str, ...]:
        return tuple(p for p in artifact_keys.PRECISIONS if artifact_keys.artifact_key(backend, p) in self.artifacts)

    def read_artifact(self, key: str) -> bytes:
        """The bytes of the artifact ``key`` (a format name for fp32, ``onnx-fp16``...),
        checked against the card's sha256 when it has one."""
        fmt = formats.get(_format_of(key))
        if key not in self.artifacts:
            raise PackageError(
                f"{self.source}: the package has no {key} artifact (it has:"
                f" {', '.join(self.artifacts) or 'none'}); pick another backend"
            )
        path = self.artifacts[key]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise PackageError(f"cannot read {path}: {e.strerror}") from e
        spec = self.card.artifacts.get(key)  # type: ignore[call-overload]
        if spec is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != spec.sha256:
                raise IntegrityError(_mismatch(path, spec.sha256, actual))
        fmt.check(data, source=str(path))
        return data


def open_package(path: str | Path) -> ModelPackage:
    """Open and verify a package directory, or read the card embedded in a lone file."""
    path = Path(path)
    if path.is_dir():
        return _open_dir(path)
    if path.is_file():
        fmt = formats.for_file(path)
        if fmt is None:
            suffixes = ", ".join(s for f in formats.REGISTRY.values() for s in f.suffixes)
            raise PackageError(
                f"{path}: not a model package; give a package directory or a model file ({suffixes})"
            )
        card = read_embedded_card(path)
        key = artifact_keys.artifact_key(fmt.name, artifact_keys.of_file(path))
        return ModelPackage(card=card, artifacts={key: path}, source=str(path))
    stored = store_model_dir(str(path))
    if stored is not None:
        return _open_dir(stored)
    raise PackageError(f"{path}: no such package directory, model file or BentoML model-store tag"
                       " (see `bentoml models list`)")


def store_model_dir(tag: str) -> Path | None:
    """The directory of ``name[:version]`` in BentoML's local model store, if it is there.

    Read from the store's documented on-disk layout (``$BENTOML_HOME/models/<name>/<version>``
    with a ``latest`` file) rather than through bentoml, so the core library keeps working
    without it; ``sota-serve import`` writes packages there.
    """
    name, _, version = tag.partition(":")
    if not name or "/" in name or "/" in version or name.startswith("."):
        return None
    root = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml") / "models" / name.lower()
    if version in ("", "latest"):
        try:
            version = (root / "latest").read_text().strip()
        except OSError:
            return None
    folder = root / version.lower()
    return folder if (folder / CARD_FILE).is_file() else None


def _open_dir(root: Path) -> ModelPackage:
    card_path = root / CARD_FILE
    if not card_path.is_file():
        raise PackageError(
            f"{root}: no {CARD_FILE}; a package directory needs its card (to use a lone"
            " model file, give the .onnx or .pt path itself)"
        )
    card = ModelCard.load(card_path)
    if not card.artifacts:
        raise PackageError(f"{card_path}: the card lists no artifacts")
    artifacts: dict[str, Path] = {}
    for backend, spec in card.artifacts.items():
        file = (root / spec.path).resolve()
        if root.resolve() not in file.parents:
            raise PackageError(f"{card_path}: artifact {spec.path!r} lies outside the package")
        if not file.is_file():
            raise PackageError(f"{root}: the card lists {spec.path} but the file is missing")
        actual = sha256_file(file)
        if actual != spec.sha256:
            raise IntegrityError(_mismatch(file, spec.sha256, actual))
        artifacts[backend] = file
    return ModelPackage(card=card, artifacts=artifacts, root=root, verified=True, source=str(root))


def _format_of(key: str) -> str:
    try:
        return artifact_keys.split_key(key)[0]
    except ValueError as e:
        raise PackageError(str(e)) from None


def _mismatch(path: Path, expected: str, actual: str) -> str:
    return (
        f"{path}: sha256 {actual[:16]}... does not match the card's {expected[:16]}...; the"
        " file was modified or corrupted after export. Re-export the package or restore the file."
    )


# --- embedded cards ------------------------------------------------------------------------


def read_card(path: Path) -> ModelCard:
    """The card of a package directory, or the one a lone model file carries, without opening
    or checking any artifact (what a server reads to name and size a package before loading it)."""
    return ModelCard.load(path / CARD_FILE) if path.is_dir() else read_embedded_card(path)


def read_embedded_card(path: Path) -> ModelCard:
    """The card a lone model file carries (the serving part: no artifacts, no records)."""
    fmt = formats.for_file(path)
    if fmt is None:
        raise PackageError(f"{path}: not a model file sota-serve knows ({', '.join(formats.NAMES)})")
    return ModelCard.parse(fmt.read_card(path), source=f"{path} (embedded card)")


def draft_package(card: ModelCard, files: dict[str, Path], root: Path) -> ModelPackage:
    """Freshly exported files with the card they will get, before ``card.json`` is written:
    what training evaluates (nothing is hashed yet, so nothing is verified)."""
    for key in files:
        _format_of(key)
    return ModelPackage(card=card.model_copy(update={"artifacts": {}}), artifacts=dict(files),
                        root=root, source=f"{root} (draft)")


def check_backend(package: ModelPackage, backend: str) -> None:
    """Refuse a backend whose artifact the package does not carry (e.g. a TorchScript Bento on
    a model imported with ``--formats onnx``)."""
    if backend not in package.backends:
        raise PackageError(
            f"{package.source}: SOTA_SERVE_BACKEND={backend}, but the package has only"
            f" {', '.join(package.backends)}; serve or build with that backend, or import the"
            f" package with its {backend} artifact (sota-serve import DIR --formats {backend})")
