"""Test-time augmentation policies: which crops of an image the model sees, in which order.

A policy is a resize edge (the card's) and a list of crop windows on the resized image. The
same windows drive the CPU preprocessor (numpy) and the device one (torch), so the two cannot
drift, and a third party can rebuild them from the design notes:

- ``none``: the center crop at ``preprocess.resize_shortest_edge``.
- ``flip``: at ``tta.flip.resize_shortest_edge``, the center crop, then that crop mirrored
  left-right (torchvision ``hflip(CenterCrop(...))``).
- ``five_crop``: at ``tta.five_crop.resize_shortest_edge``, torchvision ``FiveCrop``:
  top-left, top-right, bottom-left, bottom-right, center.
- ``ten_crop``: at ``tta.ten_crop.resize_shortest_edge``, torchvision ``TenCrop``: the five
  crops, then the five crops of the left-right mirrored image, in the same order. The mirrored
  image's crop at column ``x`` is the original's crop at ``W - x - w``, mirrored, so its
  center crop rounds like torchvision's on the flipped image (not always the mirror of the
  first center crop).

The runtimes average the probabilities of each image's k crops on the device.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from sota_serve.errors import BadRequestError

TTA = Literal["none", "flip", "five_crop", "ten_crop"]


class Policy(NamedTuple):
    """One TTA policy as every part of sota-serve names and explains it."""

    #: the value of the card's ``tta``, the API's ``tta`` field and ``--tta``
    name: TTA
    #: model calls (crops) per image
    crops: int
    #: the name people read in tables and listings
    label: str
    #: what it averages, in words (API docs, the page)
    averages: str
    #: which crops, in order (the package README)
    crops_taken: str


#: Every policy, in order of model calls per image; the tables below are read from it.
TABLE: tuple[Policy, ...] = (
    Policy("none", 1, "plain", "the center crop alone", "the center crop"),
    Policy("flip", 2, "flip", "average the predictions of the center crop and its mirror image",
           "the center crop, then the same crop mirrored left-right"),
    Policy("five_crop", 5, "five-crop", "average the predictions of the four corner crops and the center crop",
           "the four corner crops and the center crop (top-left, top-right, bottom-left, bottom-right,"
           " center)"),
    Policy("ten_crop", 10, "ten-crop", "average the predictions of the five crops and of their mirror images",
           "the five crops, then the five crops of the left-right mirrored image"),
)
POLICIES: tuple[str, ...] = tuple(p.name for p in TABLE)
CROPS_PER_IMAGE: dict[str, int] = {p.name: p.crops for p in TABLE}
#: What each policy averages, in words (API docs, the page).
DESCRIPTIONS: dict[str, str] = {p.name: p.averages for p in TABLE}
#: The name people read: plain, flip, five-crop, ten-crop.
LABELS: dict[str, str] = {p.name: p.label for p in TABLE}
#: Which crops each policy takes, in order.
CROPS_TAKEN: dict[str, str] = {p.name: p.crops_taken for p in TABLE}


class Window(NamedTuple):
    """One crop: its top-left corner on the resized image, and whether it is mirrored."""

    top: int
    left: int
    mirrored: bool = False


def center_crop_box(width: int, height: int, crop_w: int, crop_h: int) -> tuple[int, int]:
    """(left, top) of a center crop, rounded as torchvision rounds."""
    return int(round((width - crop_w) / 2.0)), int(round((height - crop_h) / 2.0))


def check_tta(tta: str) -> TTA:
    if tta not in POLICIES:
        raise BadRequestError(f"unknown tta {tta!r}; use one of {', '.join(POLICIES)}")
    return tta  # type: ignore[return-value]


def windows(policy: str, width: int, height: int, crop_w: int, crop_h: int) -> list[Window]:
    """The crop windows of ``policy`` on a ``width`` x ``height`` resized image."""
    if width < crop_w or height < crop_h:
        # Resize(edge) with edge >= crop always fits; this guards callers that skip it.
        raise ValueError(f"cannot crop {crop_w}x{crop_h} from a {width}x{height} image")
    left, top = center_crop_box(width, height, crop_w, crop_h)
    center = Window(top, left)
    if check_tta(policy) == "none":
        return [center]
    if policy == "flip":
        return [center, Window(top, left, True)]
    right, bottom = width - crop_w, height - crop_h
    five = [Window(0, 0), Window(0, right), Window(bottom, 0), Window(bottom, right), center]
    if policy == "five_crop":
        return five
    return five + [Window(w.top, right - w.left, True) for w in five]
