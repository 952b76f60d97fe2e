"""An occlusion map as colours a person reads at once, and as a PNG over the image it explains.

The scale is inferno (dark purple: covering the cell changes nothing; bright yellow: the
largest drop of the label's score), a perceptual map that reads in order in greyscale too,
drawn more opaque the larger the drop. The page (sota_serve/http/page/page.js) draws the same
stops and opacity, which it receives in its config.
numpy and Pillow only: matplotlib is not a serving dependency.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from sota_serve.explain.occlusion import Explanation
from sota_serve.image.decode import decode_image

#: inferno at 0, 1/8, ..., 1 (sRGB); colours between two stops are interpolated linearly
INFERNO: tuple[tuple[int, int, int], ...] = (
    (0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
    (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164),
)
#: the overlay's opacity where the score drops most; a cell's opacity is ALPHA times its
#: value on the scale, so the image shows through where covering changes nothing
ALPHA = 0.75
#: the PNG's shorter side is enlarged (nearest neighbour, by a whole factor) to at least this
MIN_SIDE = 256
LEGEND_HEIGHT = 28


def scaled(grid: np.ndarray) -> tuple[np.ndarray, float]:
    """Map values -> [0, 1] (0: no drop or a rise, 1: the largest drop) and that largest drop."""
    top = max(float(np.max(grid)), 1e-6)
    return np.clip(grid / top, 0.0, 1.0), top


def colours(t: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB on the inferno scale, shape (*t.shape, 3)."""
    stops = np.asarray(INFERNO, dtype=np.float64)
    x = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0) * (len(stops) - 1)
    low = np.minimum(np.floor(x).astype(int), len(stops) - 2)
    frac = (x - low)[..., None]
    return np.round(stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)


def overlay(data: bytes, explained: Explanation) -> Image.Image:
    """The plain crop's window of the image ``data`` with the map blended over it, and a legend
    strip below: (w*f) x (h*f + LEGEND_HEIGHT) for a w x h window enlarged f times."""
    img = decode_image(data)
    win = explained.window
    box = (round(win.left), round(win.top), round(win.left + win.width), round(win.top + win.height))
    region = img.crop(box)
    factor = max(1, math.ceil(MIN_SIDE / min(region.size)))
    size = (region.width * factor, region.height * factor)
    region = region.resize(size, Image.Resampling.NEAREST)
    t, top = scaled(np.asarray(explained.grid))
    heat = np.asarray(Image.fromarray(colours(t), "RGB").resize(size, Image.Resampling.NEAREST), np.float64)
    alpha = np.asarray(Image.fromarray(t.astype(np.float32), "F").resize(size, Image.Resampling.NEAREST))
    alpha = ALPHA * alpha[..., None]
    pixels = np.asarray(region, np.float64) * (1 - alpha) + heat * alpha
    blended = Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")
    out = Image.new("RGB", (size[0], size[1] + LEGEND_HEIGHT), "white")
    out.paste(blended, (0, 0))
    ramp = colours(np.linspace(0.0, 1.0, size[0]))[None].repeat(8, axis=0)
    out.paste(Image.fromarray(ramp, "RGB"), (0, size[1] + 2))
    draw = ImageDraw.Draw(out)
    draw.text((2, size[1] + 12), "no change when covered", fill=(60, 60, 60))
    right = f"score {top:.2g} lower"
    draw.text((size[0] - 2 - draw.textlength(right), size[1] + 12), right, fill=(60, 60, 60))
    return out
