"""Bytes in, predictions out: the one offline pipeline, which the CLI, training-time
evaluation, the benchmark's reference and the server use.

Two stages: :meth:`Classifier.crops` (decode and cut an upload's crops) and
:meth:`Classifier.score` (the model, each image's ranking and its out-of-distribution check,
for a batch at once). :meth:`Classifier.classify` runs them on the images of one call; the
server (:mod:`sota_serve.serving.pipeline`) runs the same two on its decode threads and, with
the crops of concurrent requests batched together, on its model threads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sota_serve import formats
from sota_serve.errors import BadRequestError, ImageError
from sota_serve.explain import occlusion
from sota_serve.image.decode import DecodeLimits
from sota_serve.image.device_preprocess import DevicePreprocessor, concat_rows
from sota_serve.image.ood import Screen
from sota_serve.image.preprocess import Preprocessor
from sota_serve.package.card import ModelCard
from sota_serve.package.loading import ModelPackage, open_package
from sota_serve.predictions import (
    DEFAULT_TOP_K,
    Classified,
    OODResult,
    Ranked,
    check_top_k,
    rank_rows,
    top_k_predictions,
)
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
        :mod:`sota_serve.image.device_preprocess`); ``precision``: see :func:`load_runtime`."""
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

    def ood(self, crops: Any, tta: str) -> list[OODResult] | None:
        """Each image's out-of-distribution check from its (k, 3, H, W) crops, a batch of
        images at once (None: the card has no ``ood``)."""
        return self.screen.check_batch(crops, tta) if self.screen else None

    def score(self, crops: Any, tta: str) -> Ranked:
        """A batch's (n*k, 3, H, W) crops cut with policy ``tta`` -> the n images' probabilities,
        their ranked class indices and their OOD checks (the server calls this on its model
        threads)."""
        probs = self.runtime.predict(crops, crops_per_image=self.preprocessor.crops_per_image(tta))
        return Ranked(probs, rank_rows(probs), self.ood(crops, tta))

    def classify(
        self, images: Sequence[bytes], *, tta: str | None = None, top_k: int = DEFAULT_TOP_K
    ) -> list[Classified | ImageError]:
        """One entry per image, in order: its predictions (and OOD check), or the error that
        image raised. ``tta`` None: the card's default policy."""
        tta = self.policy(tta)
        k = check_top_k(top_k, self.card.num_classes)
        items: list[Any | ImageError] = []
        for data in images:
            try:
                items.append(self.crops(data, tta))
            except ImageError as e:
                items.append(e)
        good = [item for item in items if not isinstance(item, ImageError)]
        step = self.batch_size * self.preprocessor.crops_per_image(tta)
        crops = concat_rows(good) if good else None
        scored = [self.score(crops[i : i + step], tta) for i in range(0, len(crops), step)] if good else []
        return ranked_answers(items, scored, self.card.labels, k)

    def explain(self, data: bytes, label: str | None = None, grid: int = occlusion.DEFAULT_GRID
                ) -> occlusion.Explanation:
        """The occlusion map of ``label`` (None: the top-1) over the plain crop of one image, its
        grid*grid occluded crops and the unoccluded one in one runtime call
        (:mod:`sota_serve.explain.occlusion`). Raises BadRequestError (422) for a label the card lacks or a
        grid outside 2..16, and the image's typed error."""
        grid = occlusion.check_grid(grid)
        index = occlusion.label_index(self.card.labels, label)
        occluded = occlusion.occlusions(self.preprocessor, self.card.normalization, data, grid=grid, label=index)
        return occlusion.explanation(self.card.tag, self.card.labels, occluded, self.runtime.predict(occluded.batch))


def ranked_answers(items: Sequence[object], batches: Sequence[Ranked], labels: Sequence[str],
                   top_k: int) -> list[Classified | ImageError]:
    """Each image's answer, in order: the typed error in its place in ``items``, or its next row
    of ``batches`` (the scored images, in order) ranked into ``top_k`` predictions."""
    rows = ((p, r, n) for b in batches
            for p, r, n in zip(b.probs, b.ranked, b.notes or [None] * len(b.probs), strict=True))
    answers: list[Classified | ImageError] = []
    for item in items:
        if isinstance(item, ImageError):
            answers.append(item)
            continue
        probs, ranked, ood = next(rows)
        answers.append(Classified(predictions=top_k_predictions(probs, labels, top_k, ranked), ood=ood))
    return answers
