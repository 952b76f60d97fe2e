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

This module chooses. What the files are called is :mod:`sota_serve.package.keys` (re-exported
here), which the card reads too; measuring a variant's agreement writes a card record, and lives
with the code that builds packages (:mod:`sota_serve.building.agreement`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from sota_serve import formats
from sota_serve.errors import PackageError, RuntimeBackendError
from sota_serve.package.card import ModelCard
from sota_serve.package.keys import (
    PRECISIONS,
    REFERENCE,
    artifact_key,
    file_name,
    of_file,
    split_key,
)

Precision = Literal["fp32", "fp16", "int8"]
#: What ``--precision`` / ``SOTA_SERVE_PRECISION`` accept.
CHOICES: tuple[str, ...] = ("auto", *PRECISIONS)
#: ``auto`` serves fp16 / int8 only when it agrees with fp32 on at least this share of top-1 labels.
MIN_AGREEMENT = 0.99
#: The precision ``auto`` prefers on each kind of device, when the package has it and it agrees.
PREFERRED: dict[str, str] = {"cuda": "fp16", "cpu": "int8"}
#: how a package gets a file of each lower precision
_ADD = {"fp16": "export with --fp16 to add one", "int8": "add one with sota-serve quantize"}
#: what to say where the backend's format is never written at that precision
_NOT_WRITTEN = {"fp16": "this backend's files are never written in fp16",
                "int8": "int8 files are ONNX only"}


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
                f" {_ADD[requested] if requested in formats.get(backend).precisions else _NOT_WRITTEN[requested]},"
                " or serve with precision auto or fp32"
            )
        return requested
    preferred = PREFERRED.get(device)
    if preferred in have and (record := card.parity_of(preferred)) is not None and record.holds(backend):
        return preferred
    # a lone fp16 or int8 file serves as what it is
    return REFERENCE if REFERENCE in have else have[0]


__all__ = ["CHOICES", "MIN_AGREEMENT", "PRECISIONS", "PREFERRED", "REFERENCE", "Precision", "artifact_key",
           "choose", "file_name", "of_file", "split_key"]
