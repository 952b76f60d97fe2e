"""Open a model package (a directory, a lone ``.onnx`` or a lone ``.pt``) and check it.

Integrity: a directory's ``card.json`` records each artifact's sha256; :func:`open_package`
checks every one, and :meth:`ModelPackage.read_artifact` checks again the very bytes it hands
to a runtime, so a file swapped after opening is caught too. A lone file has no hash to check
(a file cannot hold its own) but carries its card. Nothing here unpickles or runs model code.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from sota_serve.card import ModelCard
from sota_serve.constants import CARD_FILE, ONNX_CARD_KEY, TORCHSCRIPT_CARD_FILE
from sota_serve.errors import CardError, IntegrityError, PackageError

_SUFFIX_BACKEND = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript"}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelPackage:
    card: ModelCard
    artifacts: dict[str, Path]
    root: Path | None = None
    #: True when the bytes are checked against hashes from a card.json.
    verified: bool = False
    source: str = field(default="")

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self.artifacts)

    def read_artifact(self, backend: str) -> bytes:
        """The artifact's bytes, checked against the card's sha256 when it has one."""
        if backend not in self.artifacts:
            raise PackageError(
                f"{self.source}: the package has no {backend} artifact (it has:"
                f" {', '.join(self.artifacts) or 'none'}); pick another backend"
            )
        path = self.artifacts[backend]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise PackageError(f"cannot read {path}: {e.strerror}") from e
        spec = self.card.artifacts.get(backend)  # type: ignore[call-overload]
        if spec is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != spec.sha256:
                raise IntegrityError(_mismatch(path, spec.sha256, actual))
        if backend == "onnx":
            check_onnx_external_data(data, source=str(path))
        return data


def open_package(path: str | Path) -> ModelPackage:
    """Open and verify a package directory, or read the card embedded in a lone file."""
    path = Path(path)
    if path.is_dir():
        return _open_dir(path)
    if path.is_file():
        backend = _SUFFIX_BACKEND.get(path.suffix.lower())
        if backend is None:
            raise PackageError(
                f"{path}: not a model package; give a package directory, a .onnx or a .pt file"
            )
        card = read_embedded_card(path)
        return ModelPackage(card=card, artifacts={backend: path}, source=str(path))
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


def _mismatch(path: Path, expected: str, actual: str) -> str:
    return (
        f"{path}: sha256 {actual[:16]}... does not match the card's {expected[:16]}...; the"
        " file was modified or corrupted after export. Re-export the package or restore the file."
    )


# --- embedded cards ------------------------------------------------------------------------


def read_embedded_card(path: Path) -> ModelCard:
    if _SUFFIX_BACKEND.get(path.suffix.lower()) == "onnx":
        return _onnx_card(path)
    return _torchscript_card(path)


def _onnx_card(path: Path) -> ModelCard:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise PackageError(f"{path}: not a readable ONNX file ({e})") from e
    props = {p.key: p.value for p in model.metadata_props}
    if ONNX_CARD_KEY not in props:
        raise CardError(
            f"{path}: no sota-serve card in the ONNX metadata (key {ONNX_CARD_KEY!r}); export"
            " it with sota-serve, or put it in a package directory with a card.json"
        )
    return ModelCard.parse(props[ONNX_CARD_KEY], source=f"{path} (embedded card)")


def _torchscript_card(path: Path) -> ModelCard:
    # A TorchScript file is a zip archive; reading the card from it runs no code.
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{TORCHSCRIPT_CARD_FILE}")]
            if not names:
                raise CardError(
                    f"{path}: no sota-serve card in the TorchScript archive (extra file"
                    f" {TORCHSCRIPT_CARD_FILE!r}); export it with sota-serve"
                )
            text = archive.read(names[0])
    except zipfile.BadZipFile as e:
        raise PackageError(f"{path}: not a TorchScript archive ({e})") from e
    return ModelCard.parse(text, source=f"{path} (embedded card)")


def check_onnx_external_data(data: bytes, *, source: str) -> None:
    """Refuse ONNX graphs whose weights point at files: they could read any path."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load_from_string(data)
    except Exception as e:
        raise PackageError(f"{source}: not a readable ONNX file ({e})") from e
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            raise PackageError(
                f"{source}: tensor {tensor.name!r} keeps its data in an external file; sota-serve"
                " loads self-contained ONNX files only (re-export with the weights inside)"
            )
