"""What a package's artifacts are called: the card's ``artifacts`` keys and the file names.

An artifact is one format at one precision: key ``onnx`` and file ``model.onnx`` for fp32,
``onnx-fp16`` / ``model.fp16.onnx``, ``onnx-int8`` / ``model.int8.onnx``... (see
:mod:`sota_serve.package.precision` for what the precisions are and which one serves). The card
validates its keys here, so this module knows only the format registry, which knows only files.
"""

from __future__ import annotations

from pathlib import Path

from sota_serve import formats

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
#: The precision every variant is measured against, named by the format alone.
REFERENCE = "fp32"


def artifact_key(backend: str, precision: str) -> str:
    """The card's ``artifacts`` key: ``onnx`` for fp32, ``onnx-fp16`` for fp16, ``onnx-int8``..."""
    return backend if precision == REFERENCE else f"{backend}-{precision}"


def split_key(key: str) -> tuple[str, str]:
    """``(format name, precision)`` of an ``artifacts`` key; unknown keys raise ValueError."""
    backend, _, precision = key.partition("-")
    precision = precision or REFERENCE
    if (backend not in formats.NAMES or precision not in formats.get(backend).precisions
            or key != artifact_key(backend, precision)):
        known = [artifact_key(f.name, p) for f in formats.REGISTRY.values() for p in f.precisions]
        raise ValueError(f"unknown artifact {key!r}; sota-serve reads {', '.join(known)}")
    return backend, precision


def file_name(backend: str, precision: str) -> str:
    """``model.onnx`` / ``model.fp16.onnx`` / ``model.int8.onnx``: the format's file name with the precision before
    its suffix, so a lone fp16 file is still recognised by its suffix."""
    base = formats.get(backend).file_name
    if precision == REFERENCE:
        return base
    stem, dot, suffix = base.rpartition(".")
    return f"{stem}.{precision}{dot}{suffix}"


def of_file(path: Path) -> str:
    """The precision of a lone model file, from its name (``model.fp16.onnx``, ``model.int8.onnx``)."""
    return next((p for p in PRECISIONS if p != REFERENCE and path.name.endswith(f".{p}{path.suffix}")),
                REFERENCE)
