"""The one interface every backend implements: uint8 crops in, probabilities out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from sota_serve.card import ModelCard
from sota_serve.device import Device


class Runtime(ABC):
    """``predict(batch, crops_per_image=k)``: (N*k, 3, H, W) uint8 -> (N, C) float32.

    Softmax (when the model outputs logits) and the average over each image's k crops run
    on the runtime's device, so five-crop TTA costs one model call and one small copy back.
    """

    backend: ClassVar[str]

    def __init__(self, card: ModelCard, device: Device) -> None:
        self.card = card
        self.device: Device = device
        self._shape = (3, card.input.height, card.input.width)

    def predict(self, batch: np.ndarray, *, crops_per_image: int = 1) -> np.ndarray:
        self._check(batch, crops_per_image)
        if batch.shape[0] == 0:
            return np.zeros((0, self.card.num_classes), dtype=np.float32)
        x = batch if self.card.normalization.in_graph else self._normalize(batch)
        probs = self._run(np.ascontiguousarray(x), crops_per_image)
        if probs.shape != (batch.shape[0] // crops_per_image, self.card.num_classes):
            raise RuntimeError(
                f"{self.backend} returned shape {probs.shape}; expected"
                f" ({batch.shape[0] // crops_per_image}, {self.card.num_classes}): the model's"
                " output does not match the card's labels"
            )
        return probs

    def warmup(self, batch_size: int = 1, crops_per_image: int = 1) -> None:
        """One call at the serving batch shape, so the first request does not pay for setup."""
        n = batch_size * crops_per_image
        self.predict(np.zeros((n, *self._shape), dtype=np.uint8), crops_per_image=crops_per_image)

    @abstractmethod
    def _run(self, x: np.ndarray, crops_per_image: int) -> np.ndarray:
        """(N*k, 3, H, W) -> (N, C) float32 probabilities, averaged over each group of k."""

    def _check(self, batch: np.ndarray, k: int) -> None:
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != self._shape:
            raise ValueError(
                f"expected a uint8 batch of shape (N, {', '.join(map(str, self._shape))}),"
                f" got {batch.dtype} {batch.shape}; build it with sota_serve.preprocess"
            )
        if k < 1 or batch.shape[0] % k:
            raise ValueError(f"batch of {batch.shape[0]} rows is not a whole number of {k}-crop groups")

    def _normalize(self, batch: np.ndarray) -> np.ndarray:
        """Only for cards with ``normalization.in_graph: false`` (third-party graphs)."""
        norm = self.card.normalization
        mean = np.asarray(norm.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(norm.std, dtype=np.float32).reshape(1, 3, 1, 1)
        return ((batch.astype(np.float32) / norm.pixel_scale - mean) / std).astype(np.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.card.tag!r}, device={self.device!r})"
