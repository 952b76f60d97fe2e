"""Bytes in, predictions out: the offline pipeline the CLI, benchmarks and training use.

The server runs the same two stages (``preprocessor`` then ``runtime``) but batches across
requests between them; this class batches the images of one call.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sota_serve import formats
from sota_serve.card import ModelCard
from sota_serve.decode import DecodeLimits
from sota_serve.device_preprocess import DevicePreprocessor, concat_rows
from sota_serve.errors import BadRequestError, ImageError
from sota_serve.ood import Screen
from sota_serve.package import ModelPackage, open_package
from sota_serve.predictions import (
    DEFAULT_TOP_K,
    Classified,
    OODResult,
    check_top_k,
    top_k_predictions,
)
from sota_serve.preprocess import Preprocessor
from sota_serve.progress import progress
from sota_serve.runtime import Runtime, load_runtime

DECODERS: tuple[str, ...] = ("pillow", "torchvision")


@dataclass
class Classifier:
    package: ModelPackage
    runtime: Runtime
    preprocessor: Preprocessor
    batch_size: int = 32
    #: decodes and crops on the runtime's device instead (``decode="torchvision"``)
    device_preprocessor: DevicePreprocessor | None = None
    #: the card's out-of-distribution check, when it has one
    screen: Screen | None = None

    @classmethod
    def open(cls, path: str | Path, **options: Any) -> Classifier:
        """Open and verify the package at ``path``; ``options`` as for :meth:`from_package`."""
        return cls.from_package(open_package(path), **options)

    @classmethod
    def from_package(
        cls,
        package: ModelPackage,
        *,
        backend: str = formats.DEFAULT,
        device: str = "auto",
        intra_op_threads: int | None = None,
        limits: DecodeLimits | None = None,
        jpeg_draft: bool = False,
        batch_size: int = 32,
        decode: str = "pillow",
        precision: str = "auto",
    ) -> Classifier:
        """A classifier over an opened (or a draft, see ``package.draft_package``) package.
        ``decode``: ``pillow`` (CPU), or ``torchvision`` (nvJPEG on the runtime's GPU, see
        :mod:`sota_serve.device_preprocess`); ``precision``: see :func:`load_runtime`."""
        if decode not in DECODERS:
            raise BadRequestError(f"unknown decode {decode!r}; use one of {', '.join(DECODERS)}")
        runtime = load_runtime(package, backend, device=device, intra_op_threads=intra_op_threads,
                               precision=precision)
        pre = Preprocessor.from_card(package.card, limits=limits, jpeg_draft=jpeg_draft)
        device_pre = DevicePreprocessor(pre, runtime.device) if decode == "torchvision" else None
        return cls(package, runtime, pre, batch_size, device_pre, Screen.from_card(package.card))

    def crops(self, data: bytes, tta: str = "none") -> Any:
        """(k, 3, H, W) uint8: numpy, or a tensor on the device when decoding there."""
        return (self.device_preprocessor or self.preprocessor)(data, tta)

    def policy(self, tta: str | None) -> str:
        """``tta``, or the card's ``tta.default`` when it is None."""
        return tta or self.card.tta.default

    @property
    def card(self) -> ModelCard:
        return self.package.card

    def probabilities(self, images: Iterable[bytes], tta: str | None = None) -> np.ndarray:
        """(N, C) probabilities; raises the first image's typed error if one is bad."""
        tta = self.policy(tta)
        k = self.preprocessor.crops_per_image(tta)
        crops = [self.crops(data, tta) for data in images]
        if not crops:
            return np.zeros((0, self.card.num_classes), dtype=np.float32)
        return self.predict_crops(concat_rows(crops), k)

    def probabilities_of_files(self, files: Sequence[Path], tta: str | None = None, *,
                               desc: str = "predict", step: int = 64) -> np.ndarray:
        """(N, C) probabilities of image files, read ``step`` at a time (bounded memory, a
        progress bar on long evaluations)."""
        parts = [self.probabilities([f.read_bytes() for f in files[i : i + step]], tta)
                 for i in progress(range(0, len(files), step), desc=desc)]
        return np.concatenate(parts) if parts else self.probabilities([], tta)

    def predict_crops(self, crops: Any, crops_per_image: int = 1) -> np.ndarray:
        """Run preprocessed crops through the runtime in batches of ``batch_size`` images."""
        step = self.batch_size * crops_per_image
        parts = [
            self.runtime.predict(crops[i : i + step], crops_per_image=crops_per_image)
            for i in range(0, len(crops), step)
        ]
        return np.concatenate(parts)

    def classify(
        self, images: Sequence[bytes], *, tta: str | None = None, top_k: int = DEFAULT_TOP_K
    ) -> list[Classified | ImageError]:
        """One entry per image, in order: its predictions (and OOD check), or the error that
        image raised. ``tta`` None: the card's default policy."""
        tta = self.policy(tta)
        k = check_top_k(top_k, self.card.num_classes)
        crops_per_image = self.preprocessor.crops_per_image(tta)
        items: list[tuple[Any, OODResult | None] | ImageError] = []
        for data in images:
            try:
                crops = self.crops(data, tta)
            except ImageError as e:
                items.append(e)
                continue
            items.append((crops, self.screen.check(crops, tta) if self.screen else None))
        good = [item for item in items if not isinstance(item, ImageError)]
        probs = self.predict_crops(concat_rows([c for c, _ in good]), crops_per_image) if good else []
        rows = iter(probs)  # one row per decoded image, in order
        return [item if isinstance(item, ImageError)
                else Classified(predictions=top_k_predictions(next(rows), self.card.labels, k), ood=item[1])
                for item in items]
