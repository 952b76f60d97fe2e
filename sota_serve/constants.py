"""Defaults named once and referenced everywhere (timm's habit)."""

from __future__ import annotations

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Share of the resized image that the center crop keeps (timm's DEFAULT_CROP_PCT).
DEFAULT_CROP_PCT = 0.875

#: Pillow filters the card may name in ``preprocess.interpolation``.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")

#: A package directory's card and its rendering; each format names its own file and says
#: where it embeds the card (sota_serve.formats).
CARD_FILE = "card.json"
README_FILE = "README.md"

#: Input limits (overridable per decoder). Pixels: about a 50-megapixel photo.
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000
#: Long side / short side; panoramas up to 20:1 pass.
DEFAULT_MAX_ASPECT_RATIO = 20.0
#: The suffixes of the image files looked for in folders (datasets, calibration images).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
