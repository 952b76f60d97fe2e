"""How far an fp16 or int8 artifact agrees with its fp32 sibling: the card's ``fp16`` and
``int8`` records (see :mod:`sota_serve.package.precision` for what the variants are and which serves).

Measuring runs the files through the offline :class:`~sota_serve.classifier.Classifier`, so it
belongs to the side that builds packages (export, quantize, training), not to the side that
reads them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sota_serve.classifier import Classifier
from sota_serve.package.card import PrecisionParity
from sota_serve.package.loading import ModelPackage
from sota_serve.package.precision import MIN_AGREEMENT, REFERENCE
from sota_serve.progress import step


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
