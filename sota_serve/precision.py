"""Numeric precision of a model artifact: fp32, the reference, and fp16 / int8 variants beside it.

An fp16 artifact is the same network with its weights and activations in half precision; its
input (uint8 pixels), its normalization and its softmax stay in fp32, so it serves, batches and
does TTA exactly like the fp32 file. In a package it sits beside the fp32 file under the
artifact key ``<format>-fp16`` (``model.fp16.onnx``, ``model.fp16.pt``), and the card's ``fp16``
record says how far it agrees with fp32 (top-1 agreement and largest probability difference,
per format, on the validation set when training made it).

An int8 artifact (ONNX only, ``model.int8.onnx``, key ``onnx-int8``) is the fp32 graph
statically quantized by ONNX Runtime: weights per channel and activations per tensor in 8 bits,
scales calibrated on real preprocessed images, the first convolution and the classifier layer
kept in fp32 (see :mod:`sota_serve.formats.onnx_int8`). Its input and output are those of the
fp32 file. The card's ``int8`` record is the same kind of agreement record as ``fp16``.

Which one serves (``precision="auto"``): on a CUDA device fp16 when the package has it and its
agreement holds; on a CPU int8 when the package has it and its agreement holds; fp32
otherwise. On a CPU fp16 gains nothing (demo model, batch 64, 2 cores: ONNX Runtime 360
against 365 img/s, torch 26x slower), while int8 runs the demo model 2.2-2.5x faster
(one thread, batch 16: 336-399 against 145-178 img/s). On a GPU ONNX Runtime's CUDA provider has
few int8 kernels, so ``auto`` never picks int8 there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from sota_serve import formats
from sota_serve.errors import PackageError, RuntimeBackendError

if TYPE_CHECKING:
    from sota_serve.card import ModelCard, PrecisionParity
    from sota_serve.package import ModelPackage

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
#: What ``--precision`` / ``SOTA_SERVE_PRECISION`` accept.
CHOICES: tuple[str, ...] = ("auto", *PRECISIONS)
REFERENCE = "fp32"
#: ``auto`` serves fp16 / int8 only when it agrees with fp32 on at least this share of top-1 labels.
MIN_AGREEMENT = 0.99
#: The precision ``auto`` prefers on each kind of device, when the package has it and it agrees.
PREFERRED: dict[str, str] = {"cuda": "fp16", "cpu": "int8"}


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


def choose(card: ModelCard, available: Iterable[str], backend: str, device: str, requested: str) -> str:
    """The precision to serve ``backend`` at on ``device`` (already resolved: cpu or cuda),
    among the ``available`` artifact keys."""
    if requested not in CHOICES:
        raise RuntimeBackendError(f"unknown precision {requested!r}; use one of {', '.join(CHOICES)}")
    keys = set(available)
    have = [p for p in PRECISIONS if artifact_key(backend, p) in keys]
    if not have:
        raise PackageError(f"the package has no {backend} artifact (it has: {', '.join(sorted(keys))});"
                           " pick another backend")
    if requested != "auto":
        if requested not in have:
            raise PackageError(
                f"the package has no {requested} {backend} artifact (it has: {', '.join(sorted(keys))});"
                f" export with --{requested} to add one, or serve with precision auto or fp32"
            )
        return requested
    preferred = PREFERRED.get(device)
    if preferred in have and (record := card.parity_of(preferred)) is not None and record.holds(backend):
        return preferred
    # a lone fp16 or int8 file serves as what it is
    return REFERENCE if REFERENCE in have else have[0]


def agreement(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    *,
    source: str,
    device: str,
    min_agreement: float = MIN_AGREEMENT,
) -> PrecisionParity:
    """The ``fp16`` or ``int8`` record: each format's probabilities at that precision
    (``candidate``, by format name) against its fp32 ones (``reference``) on the same images."""
    from sota_serve.card import PrecisionParity

    top1: dict[str, float] = {}
    diff: dict[str, float] = {}
    images = 0
    for backend, half in candidate.items():
        full = reference[backend]
        if half.shape != full.shape:
            raise ValueError(f"{backend}: the variant gave {half.shape}, fp32 {full.shape}")
        images = len(full)
        if not np.isfinite(half).all():  # overflow: nothing agrees (probabilities differ by <= 1)
            top1[backend], diff[backend] = 0.0, 1.0
        elif images:
            top1[backend] = float((half.argmax(1) == full.argmax(1)).mean())
            diff[backend] = float(np.abs(half - full).max())
    return PrecisionParity(images=images, source=source, device=device, min_top1_agreement=min_agreement,
                      top1_agreement=top1, max_abs_diff=diff)


def measure(package: ModelPackage, files: Sequence[Path], variant: str, *, device: str, source: str,
            known: Mapping[str, np.ndarray] | None = None) -> PrecisionParity:
    """The ``fp16`` or ``int8`` record of ``package`` (a draft is fine): each format's
    ``variant`` file against its fp32 file on the image ``files``, plain, both on ``device``
    (where the variant serves: a GPU for fp16, the CPU for int8). ``known``: fp32
    probabilities of ``files`` already computed on ``device``, by format, not run again."""
    from sota_serve.classifier import Classifier
    from sota_serve.progress import step

    step(f"{variant} agreement with fp32 on {len(files)} {source} images ({device})")
    reference, candidate = dict(known or {}), {}
    for backend in package.backends:
        if variant not in package.precisions(backend):
            continue
        for p, into in ((REFERENCE, reference), (variant, candidate)):
            if backend not in into:
                clf = Classifier.from_package(package, backend=backend, device=device, precision=p)
                into[backend] = clf.probabilities_of_files(files, "none", desc=f"{backend} {p}")
    return agreement({b: reference[b] for b in candidate}, candidate, source=source, device=device)
