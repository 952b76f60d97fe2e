"""Model artifact formats: one module per format, and the registry that everything else uses
(package loading, export, runtimes, the OIP metadata) instead of comparing format names.

Adding a format is one module with an :class:`ArtifactFormat` and one line in ``REGISTRY``,
and its runtime in :mod:`sota_serve.runtime` (``RUNTIMES``).
"""

from __future__ import annotations

from pathlib import Path

from sota_serve.errors import RuntimeBackendError
from sota_serve.formats.base import ArtifactFormat
from sota_serve.formats.onnx import ONNX
from sota_serve.formats.pt2 import PT2
from sota_serve.formats.torchscript import TORCHSCRIPT

REGISTRY: dict[str, ArtifactFormat] = {f.name: f for f in (ONNX, PT2, TORCHSCRIPT)}
#: Every format name, in order of preference.
NAMES: tuple[str, ...] = tuple(REGISTRY)
#: What serves when nobody says: ONNX Runtime needs neither torch nor fastai.
DEFAULT: str = ONNX.name


def get(name: str) -> ArtifactFormat:
    try:
        return REGISTRY[name]
    except KeyError:
        raise RuntimeBackendError(f"unknown backend {name!r}; use one of {', '.join(NAMES)}") from None


def for_file(path: Path) -> ArtifactFormat | None:
    """The format of a lone file, by its suffix."""
    suffix = path.suffix.lower()
    return next((f for f in REGISTRY.values() if suffix in f.suffixes), None)


__all__ = ["DEFAULT", "NAMES", "REGISTRY", "ArtifactFormat", "for_file", "get"]
