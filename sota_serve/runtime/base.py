"""The one interface every backend implements: uint8 crops in, probabilities out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from sota_serve.device import Device
from sota_serve.package.card import ModelCard


class Runtime(ABC):
    """``predict(batch, crops_per_image=k)``: (N*k, 3, H, W) uint8 -> (N, C) float32.

    ``batch`` is a numpy array, or a torch tensor (crops decoded on the device by
    :mod:`sota_serve.image.device_preprocess` stay there). Softmax (when the model outputs logits)
    and the average over each image's k crops run on the runtime's device, so five-crop TTA
    costs one model call and one small copy back.

    On CUDA, batches are padded to the next power of two of images: every new input shape
    costs the CUDA provider a slow first call (kernel selection, allocations), and a server's
    dynamic batches would otherwise bring a new size for a long while. Warming up the
    :meth:`buckets` at start leaves none to pay for under load.
    """

    backend: ClassVar[str]
    #: the artifact's precision (``fp32``/``fp16``/``int8``), set by ``load_runtime``
    precision: str = "fp32"

    def __init__(self, card: ModelCard, device: Device) -> None:
        self.card = card
        self.device: Device = device
        self._shape = (3, card.input.height, card.input.width)

    #: pad batches to power-of-two image counts (see the class docstring)
    pad_batches: bool = False

    def predict(self, batch: Any, *, crops_per_image: int = 1) -> np.ndarray:
        self._check(batch, crops_per_image)
        images = batch.shape[0] // crops_per_image
        if images == 0:
            return np.zeros((0, self.card.num_classes), dtype=np.float32)
        if not self.card.normalization.in_graph:
            batch = self._normalize(batch if isinstance(batch, np.ndarray) else batch.cpu().numpy())
        x = self._pad(batch, crops_per_image) if self.pad_batches else batch
        x = np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x.contiguous()
        probs = self._run(x, crops_per_image)[:images]
        if probs.shape != (images, self.card.num_classes):
            raise RuntimeError(
                f"{self.backend} returned shape {probs.shape}; expected"
                f" ({images}, {self.card.num_classes}): the model's output does not match the"
                " card's labels"
            )
        return probs

    def buckets(self, max_images: int) -> list[int]:
        """The image counts a batch of up to ``max_images`` is padded to."""
        if not self.pad_batches:
            return [max_images]
        sizes = [1 << i for i in range(max_images.bit_length()) if 1 << i < max_images]
        return [*sizes, max_images]

    def warmup(self, batch_size: int = 1, crops_per_image: int = 1) -> None:
        """One call per batch shape up to ``batch_size`` images (one shape on CPU), so that
        no request pays for a shape's first call."""
        for images in self.buckets(batch_size):
            n = images * crops_per_image
            self.predict(np.zeros((n, *self._shape), dtype=np.uint8), crops_per_image=crops_per_image)

    def _pad(self, x: Any, k: int) -> Any:
        images = x.shape[0] // k
        target = 1 << (images - 1).bit_length()
        if target == images:
            return x
        rows = (target - images) * k
        if isinstance(x, np.ndarray):
            return np.concatenate([x, np.zeros((rows, *x.shape[1:]), dtype=x.dtype)])
        padded = x.new_zeros((x.shape[0] + rows, *x.shape[1:]))  # a torch tensor, on its device
        padded[: x.shape[0]] = x
        return padded

    @abstractmethod
    def _run(self, x: np.ndarray, crops_per_image: int) -> np.ndarray:
        """(N*k, 3, H, W) -> (N, C) float32 probabilities, averaged over each group of k."""

    def _check(self, batch: Any, k: int) -> None:
        if str(batch.dtype) not in ("uint8", "torch.uint8") or batch.ndim != 4 or tuple(batch.shape[1:]) != self._shape:
            raise ValueError(
                f"expected a uint8 batch of shape (N, {', '.join(map(str, self._shape))}),"
                f" got {batch.dtype} {batch.shape}; build it with sota_serve.image.preprocess"
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
