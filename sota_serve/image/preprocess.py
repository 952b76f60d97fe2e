"""Resize + center crop and the TTA crops, exactly as the model card says.

One implementation serves the CLI, the server and training-time evaluation (the training
pipeline calls :func:`resize_center_crop` for its validation images). The semantics match
torchvision's ``Resize(int)`` + ``CenterCrop``, ``hflip``, ``FiveCrop`` and ``TenCrop`` on PIL
images (the crop windows are :mod:`sota_serve.tta`'s); the tests check that pixel for pixel.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from sota_serve.errors import BadRequestError
from sota_serve.image.decode import DecodeLimits, decode_image
from sota_serve.package.card import ModelCard
from sota_serve.tta import CROPS_PER_IMAGE, check_tta, windows

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


def _chw(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def resize_center_crop(
    img: Image.Image, edge: int, height: int, width: int, interpolation: str = "bilinear"
) -> Image.Image:
    """The card's plain preprocessing as a PIL image (used by training's validation pipeline)."""
    resized = resize_shortest_edge(img, edge, interpolation)
    (top, left, _), = windows("none", resized.width, resized.height, width, height)
    return resized.crop((left, top, left + width, top + height))


def tta_crops(
    img: Image.Image, policy: str, edge: int, height: int, width: int, interpolation: str = "bilinear"
) -> np.ndarray:
    """(k, 3, H, W) uint8: the crops of ``policy`` after resizing the shortest edge to ``edge``."""
    arr = np.asarray(resize_shortest_edge(img, edge, interpolation))
    crops = []
    for top, left, mirrored in windows(policy, arr.shape[1], arr.shape[0], width, height):
        crop = arr[top : top + height, left : left + width]
        crops.append(_chw(crop[:, ::-1] if mirrored else crop))
    return np.stack(crops)


@dataclass(frozen=True)
class Preprocessor:
    """Everything between the bytes a user sends and the uint8 batch a runtime takes.

    Built only from a card (:meth:`from_card`), so the card's field names are its knobs.
    ``tta_edges`` maps each TTA policy the card lists (beyond ``none``) to its resize edge.
    """

    height: int
    width: int
    resize_shortest_edge: int
    interpolation: str = "bilinear"
    exif_transpose: bool = True
    tta_edges: Mapping[str, int] = field(default_factory=dict)
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
            tta_edges=card.tta.edges(),
            limits=limits or DecodeLimits(),
            jpeg_draft=jpeg_draft,
        )

    @property
    def policies(self) -> tuple[str, ...]:
        return ("none", *self.tta_edges)

    def edge(self, tta: str) -> int:
        """The resize edge of ``tta``; refuses an unknown policy or one the card lacks."""
        if check_tta(tta) == "none":
            return self.resize_shortest_edge
        if tta not in self.tta_edges:
            raise BadRequestError(f"this model's card has no tta.{tta} settings; use one of"
                                  f" {', '.join(self.policies)}")
        return self.tta_edges[tta]

    def crops_per_image(self, tta: str) -> int:
        """k of ``tta`` (1, 2, 5 or 10); refuses what :meth:`edge` refuses."""
        self.edge(tta)
        return CROPS_PER_IMAGE[tta]

    def source_windows(self, width: int, height: int, tta: str) -> list[tuple[float, float, float, float, bool]]:
        """The crops of ``tta`` as ``(left, top, width, height, mirrored)`` boxes on the
        original ``width`` x ``height`` image, before the resize (what a page draws)."""
        rw, rh = resized_size(width, height, self.edge(tta))
        sx, sy = width / rw, height / rh
        return [(w.left * sx, w.top * sy, self.width * sx, self.height * sy, w.mirrored)
                for w in windows(tta, rw, rh, self.width, self.height)]

    def decode(self, data: bytes) -> Image.Image:
        # Draft only down to twice the largest resize edge, so the final resize still
        # averages over >= 2x2 source pixels.
        edge = max([self.resize_shortest_edge, *self.tta_edges.values()])
        return decode_image(
            data,
            limits=self.limits,
            exif_transpose=self.exif_transpose,
            draft_edge=2 * edge if self.jpeg_draft else None,
        )

    def plain(self, img: Image.Image) -> np.ndarray:
        """(1, 3, H, W) uint8."""
        return self.crops(img, "none")

    def crops(self, img: Image.Image, tta: str = "none") -> np.ndarray:
        """(k, 3, H, W) uint8, the crops of ``tta`` in the policy's order."""
        return tta_crops(img, tta, self.edge(tta), self.height, self.width, self.interpolation)

    def __call__(self, data: bytes, tta: str = "none") -> np.ndarray:
        """Bytes -> (k, 3, H, W) uint8."""
        self.edge(tta)  # refuse a bad tta before paying for the decode
        return self.crops(self.decode(data), tta)
