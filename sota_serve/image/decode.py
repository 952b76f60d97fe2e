"""Bytes -> upright RGB ``PIL.Image``: the first step of every prediction.

The card's decoding semantics are: open, apply the EXIF orientation, convert to RGB. This
module adds what a server needs around that: a format allowlist checked before decoding,
byte and pixel limits checked before the pixels are decoded, decompression bombs refused
without touching the process's warning filters (safe on the decode threads), truncated files
refused, 16-bit images scaled (not clipped) to 8 bits, and every failure
raised as a typed :mod:`sota_serve.errors` exception.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from sota_serve.constants import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from sota_serve.errors import (
    ImageGeometryError,
    ImageTooLargeError,
    InvalidImageError,
    UnsupportedImageFormatError,
)

#: Formats decoded at all. GIF/WebP/TIFF animations use their first frame.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Modes whose samples exceed 8 bits: Pillow's convert("RGB") clips them at 255 (a white
# image), so they are rescaled from their full range instead.
_WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0}


#: EXIF tag 0x0112: how to turn the stored pixels upright (1 = already upright).
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, read without decoding a pixel (:func:`read_header`)."""

    format: str
    width: int
    height: int
    mode: str
    #: 1..8; 0 when the EXIF block cannot be read (the full decode then reports it)
    orientation: int
    progressive: bool


@dataclass(frozen=True)
class DecodeLimits:
    """Refuse inputs above these sizes (HTTP 413). Checked before any pixel is decoded."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: long side / short side. Resizing the short side to the card's edge makes the long side
    #: this many times the edge, so it bounds what a tiny upload can make the server allocate
    #: (a 20000x1 PNG would become a 64x1,280,000 intermediate).
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO

    def __post_init__(self) -> None:
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError(
                f"limits must be positive, e.g. DecodeLimits(max_bytes=20_000_000, max_pixels="
                f"50_000_000); got max_bytes={self.max_bytes}, max_pixels={self.max_pixels}"
            )


def decode_image(
    data: bytes,
    *,
    limits: DecodeLimits = DecodeLimits(),
    exif_transpose: bool = True,
    draft_edge: int | None = None,
) -> Image.Image:
    """Decode ``data`` into an RGB image, upright if ``exif_transpose``.

    ``draft_edge``: for JPEGs, let libjpeg decode at 1/2, 1/4 or 1/8 scale as long as both
    sides stay >= ``draft_edge`` (much faster for large photos; pixels differ slightly from a
    full decode, so it is opt-in).
    """
    if len(data) == 0:
        raise InvalidImageError("the image is empty (0 bytes)")
    _check_bytes(len(data), limits, "the image")
    img = _open(data)
    _check_pixels(img, limits)
    if draft_edge and img.format == "JPEG":
        img.draft("RGB", (draft_edge, draft_edge))
    _load(img)
    if exif_transpose:
        img = _upright(img)
    return to_rgb(img)


def read_header(data: bytes, *, limits: DecodeLimits = DecodeLimits()) -> ImageHeader:
    """Check ``data`` against the format allowlist and ``limits`` from its header alone.

    Raises the same typed errors as :func:`decode_image` does for these checks; it does not
    prove the pixel data is intact (a truncated file passes).
    """
    if len(data) == 0:
        raise InvalidImageError("the image is empty (0 bytes)")
    _check_bytes(len(data), limits, "the image")
    with _open(data) as img:
        _check_pixels(img, limits)
        try:
            orientation = int(img.getexif().get(EXIF_ORIENTATION, 1))
        except Exception:  # damaged EXIF: decode_image reports it
            orientation = 0
        progressive = bool(img.info.get("progressive") or img.info.get("progression"))
        return ImageHeader(img.format or "", img.width, img.height, img.mode, orientation, progressive)


def read_image_file(
    path: str | Path,
    *,
    limits: DecodeLimits = DecodeLimits(),
    exif_transpose: bool = True,
    draft_edge: int | None = None,
) -> Image.Image:
    """:func:`decode_image` on a file (its size is checked before it is read)."""
    path = Path(path)
    try:
        _check_bytes(path.stat().st_size, limits, str(path))
        data = path.read_bytes()
    except OSError as e:
        raise InvalidImageError(f"cannot read {path}: {e.strerror}") from e
    return decode_image(data, limits=limits, exif_transpose=exif_transpose, draft_edge=draft_edge)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB. Alpha is dropped, as ``convert("RGB")`` does."""
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_MODES or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = _WIDE_MODES.get(img.mode, 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0)
        if img.mode == "I" and arr.max(initial=0.0) <= 255:
            top = 255.0  # 32-bit container holding 8-bit data (e.g. some TIFFs)
        gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        # Pillow asks for palette transparency to go through RGBA; the colours are the same.
        img = img.convert("RGBA")
    return img.convert("RGB")


# --- steps ---------------------------------------------------------------------------------


def _open(data: bytes) -> Image.Image:
    try:
        img = _identify(data, ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"decompression bomb refused: {e}") from e
    except Exception as e:  # Pillow's header parsers raise many types on hostile input
        raise InvalidImageError(f"the image header is invalid: {_describe(e)}") from e
    if img is None:
        fmt = _identify_any(data)
        if fmt:
            raise UnsupportedImageFormatError(
                f"{fmt} images are not accepted; send one of {', '.join(ALLOWED_FORMATS)}"
            )
        raise InvalidImageError(
            f"the bytes are not a recognised image (accepted: {', '.join(ALLOWED_FORMATS)})"
        )
    return img  # its size is checked next (_check_pixels), before anything else reads it


def _identify(data: bytes, formats: tuple[str, ...] | list[str]) -> ImageFile.ImageFile | None:
    """``Image.open(data, formats=formats)`` without its decompression-bomb check, or None when
    no format's parser takes the bytes.

    Pillow's check warns (``DecompressionBombWarning``) between its limit and twice it, and the
    only way to turn a warning into an error is ``warnings.catch_warnings()``, which swaps
    process-wide state and is not thread-safe before Python 3.14: two decode threads that
    enter and leave it out of order leave the filters of the other one behind. The size is
    checked here instead, against the same limit (:func:`_check_pixels`), before a pixel is
    decoded: Pillow's later checks at load time see the same size and stay silent.
    """
    if any(fmt not in Image.OPEN for fmt in formats):
        Image.init()  # registers every plugin once (Image.open does the same)
    fp = io.BytesIO(data)
    prefix = data[:16]
    for fmt in formats:
        if fmt not in Image.OPEN:
            continue
        factory, accept = Image.OPEN[fmt]
        taken = not accept or accept(prefix)
        if not taken or isinstance(taken, str):  # a str: the plugin knows the format but cannot read it
            continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # not this format: as Image.open
            continue
    return None


def _identify_any(data: bytes) -> str | None:
    """Name a real image format outside the allowlist (for a 415 rather than a 400)."""
    Image.init()
    others = [fmt for fmt in Image.ID if fmt not in ALLOWED_FORMATS]
    try:
        other = _identify(data, others)
    except Exception:  # a parser's other errors, or a bomb's: not a format we name
        return None
    if other is None:
        return None
    with other:
        return other.format


def _check_bytes(size: int, limits: DecodeLimits, what: str) -> None:
    if size > limits.max_bytes:
        raise ImageTooLargeError(f"{what} has {size:,} bytes, above the limit of {limits.max_bytes:,} bytes")


def _check_pixels(img: Image.Image, limits: DecodeLimits) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise InvalidImageError(f"the image has an invalid size {w}x{h}")
    if w * h > limits.max_pixels:
        raise ImageTooLargeError(
            f"the image is {w}x{h} = {w * h:,} pixels, above the limit of {limits.max_pixels:,}"
        )
    bomb = Image.MAX_IMAGE_PIXELS
    if bomb is not None and w * h > bomb:  # where Pillow would warn: refused, as the warning would be
        raise ImageTooLargeError(
            f"decompression bomb refused: the image is {w}x{h} = {w * h:,} pixels, above Pillow's"
            f" limit of {bomb:,} (PIL.Image.MAX_IMAGE_PIXELS)"
        )
    if max(w, h) > limits.max_aspect_ratio * min(w, h):
        raise ImageGeometryError(
            f"the image is {w}x{h}, an aspect ratio of {max(w, h) / min(w, h):,.1f}:1, above the"
            f" limit of {limits.max_aspect_ratio:g}:1 (SOTA_SERVE_MAX_ASPECT_RATIO); crop it first"
        )


def _load(img: Image.Image) -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a global another library may have flipped
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # a warning: under -W error
        raise ImageTooLargeError(f"decompression bomb refused: {e}") from e
    except Exception as e:  # OSError (truncated), SyntaxError, ValueError, struct.error, ...
        raise InvalidImageError(f"the image data is damaged: {_describe(e)}") from e


def _upright(img: Image.Image) -> Image.Image:
    try:
        # in_place: without it Pillow returns a full copy even when there is nothing to rotate
        # (7% of the API service's CPU under load, measured with py-spy).
        ImageOps.exif_transpose(img, in_place=True)
        return img
    except Exception as e:
        raise InvalidImageError(f"the image's EXIF data is damaged: {_describe(e)}") from e


def _describe(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text[:200]
