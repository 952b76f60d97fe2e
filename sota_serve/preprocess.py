"""Resize + center crop and five-crop, exactly as the model card says.

One implementation serves the CLI, the server and training-time evaluation (the training
pipeline calls :func:`resize_center_crop` for its validation images). The semantics match
torchvision's ``Resize(int)`` + ``CenterCrop`` and ``FiveCrop`` on PIL images; the tests
check that pixel for pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from sota_serve.card import ModelCard
from sota_serve.constants import N_FIVE_CROPS
from sota_serve.decode import DecodeLimits, decode_image
from sota_serve.errors import BadRequestError

TTA = Literal["none", "five_crop"]
TTA_MODES: tuple[str, ...] = ("none", "five_crop")

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def resized_size(width: int, height: int, edge: int) -> tuple[int, int]:
    """(w, h) after resizing the shortest edge to ``edge`` (torchvision's arithmetic)."""
    if width <= height:
        return edge, int(edge * height / width)
    return int(edge * width / height), edge


def resize_shortest_edge(img: Image.Image, edge: int, interpolation: str = "bilinear") -> Image.Image:
    size = resized_size(img.width, img.height, edge)
    if size == img.size:
        return img
    return img.resize(size, _FILTERS[interpolation])


def center_crop_box(width: int, height: int, crop_w: int, crop_h: int) -> tuple[int, int]:
    """(left, top) of a center crop, rounded as torchvision rounds."""
    return int(round((width - crop_w) / 2.0)), int(round((height - crop_h) / 2.0))


def _chw(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _require_fit(img: Image.Image, crop_w: int, crop_h: int) -> None:
    if img.width < crop_w or img.height < crop_h:
        # Resize(edge) with edge >= crop always fits; this guards callers that skip it.
        raise ValueError(f"cannot crop {crop_w}x{crop_h} from a {img.width}x{img.height} image")


def resize_center_crop(
    img: Image.Image, edge: int, height: int, width: int, interpolation: str = "bilinear"
) -> Image.Image:
    """The card's plain preprocessing as a PIL image (used by training's validation pipeline)."""
    resized = resize_shortest_edge(img, edge, interpolation)
    _require_fit(resized, width, height)
    left, top = center_crop_box(resized.width, resized.height, width, height)
    return resized.crop((left, top, left + width, top + height))


def five_crops(
    img: Image.Image, edge: int, height: int, width: int, interpolation: str = "bilinear"
) -> np.ndarray:
    """(5, 3, H, W) uint8: top-left, top-right, bottom-left, bottom-right, center."""
    resized = resize_shortest_edge(img, edge, interpolation)
    _require_fit(resized, width, height)
    arr = np.asarray(resized)
    h, w = arr.shape[:2]
    left, top = center_crop_box(w, h, width, height)
    origins = [(0, 0), (0, w - width), (h - height, 0), (h - height, w - width), (top, left)]
    return np.stack([_chw(arr[y : y + height, x : x + width]) for y, x in origins])


def check_tta(tta: str) -> TTA:
    if tta not in TTA_MODES:
        raise BadRequestError(f"unknown tta {tta!r}; use one of {', '.join(TTA_MODES)}")
    return tta  # type: ignore[return-value]


@dataclass(frozen=True)
class Preprocessor:
    """Everything between the bytes a user sends and the uint8 batch a runtime takes.

    Built only from a card (:meth:`from_card`), so the card's field names are its knobs.
    """

    height: int
    width: int
    resize_shortest_edge: int
    interpolation: str = "bilinear"
    exif_transpose: bool = True
    five_crop_edge: int | None = None
    limits: DecodeLimits = DecodeLimits()
    jpeg_draft: bool = False

    @classmethod
    def from_card(
        cls, card: ModelCard, *, limits: DecodeLimits | None = None, jpeg_draft: bool = False
    ) -> Preprocessor:
        return cls(
            height=card.input.height,
            width=card.input.width,
            resize_shortest_edge=card.preprocess.resize_shortest_edge,
            interpolation=card.preprocess.interpolation,
            exif_transpose=card.preprocess.exif_transpose,
            five_crop_edge=card.tta.five_crop.resize_shortest_edge if card.tta.five_crop else None,
            limits=limits or DecodeLimits(),
            jpeg_draft=jpeg_draft,
        )

    def crops_per_image(self, tta: str) -> int:
        """1 or 5; refuses an unknown ``tta``, or five-crop on a card without its settings."""
        if check_tta(tta) == "five_crop":
            self._five_crop_edge()
            return N_FIVE_CROPS
        return 1

    def _five_crop_edge(self) -> int:
        if self.five_crop_edge is None:
            raise BadRequestError("this model's card has no tta.five_crop settings; use tta=none")
        return self.five_crop_edge

    def decode(self, data: bytes) -> Image.Image:
        # Draft only down to twice the largest resize edge, so the final resize still
        # averages over >= 2x2 source pixels.
        edge = max(self.resize_shortest_edge, self.five_crop_edge or 0)
        return decode_image(
            data,
            limits=self.limits,
            exif_transpose=self.exif_transpose,
            draft_edge=2 * edge if self.jpeg_draft else None,
        )

    def plain(self, img: Image.Image) -> np.ndarray:
        """(1, 3, H, W) uint8."""
        crop = resize_center_crop(
            img, self.resize_shortest_edge, self.height, self.width, self.interpolation
        )
        return _chw(np.asarray(crop))[None]

    def five_crop(self, img: Image.Image) -> np.ndarray:
        """(5, 3, H, W) uint8."""
        return five_crops(img, self._five_crop_edge(), self.height, self.width, self.interpolation)

    def crops(self, img: Image.Image, tta: str = "none") -> np.ndarray:
        return self.five_crop(img) if check_tta(tta) == "five_crop" else self.plain(img)

    def __call__(self, data: bytes, tta: str = "none") -> np.ndarray:
        """Bytes -> (k, 3, H, W) uint8 with k = 1 or 5."""
        self.crops_per_image(tta)  # refuse a bad tta before paying for the decode
        return self.crops(self.decode(data), tta)
