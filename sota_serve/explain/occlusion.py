"""Occlusion sensitivity: which parts of the plain crop the model's score depends on.

A grid over the plain policy's crop (the center crop of ``none``); each cell in turn is covered
with a neutral patch, the card's normalization mean as uint8, which the model sees as ~0 after
its own normalization. The grid*grid occluded crops and the unoccluded one go through the model,
and ``map[i][j] = p(label | original) - p(label | cell (i, j) covered)``: a large value is a
part of the image the label depends on.

The occluded crops are made on demand (:meth:`Occlusions.rows`), a slice at a time: a grid-16
explanation of a 224 px model is 257 crops, 39 MB, and a server making them all at once for
every request in flight holds that much per request (:mod:`sota_serve.serving.pipeline` bounds
the crops alive at once).

The functions here are pure (numpy in, numpy out); :meth:`sota_serve.classifier.Classifier.explain`
runs them offline and :meth:`sota_serve.serving.pipeline.Pipeline.explain` through the server's
batcher, and both answer with one :class:`Explanation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from pydantic import BaseModel

from sota_serve.errors import BadRequestError
from sota_serve.image.decode import decode_image
from sota_serve.image.preprocess import Preprocessor
from sota_serve.package.card import NormalizationSpec

DEFAULT_GRID = 8
MIN_GRID, MAX_GRID = 2, 16
#: how many labels an unknown-label error lists before it says how many more there are
_LABELS_NAMED = 20


class CropWindow(BaseModel):
    """The plain crop's box on the original (upright) image, in its pixels."""

    left: float
    top: float
    width: float
    height: float


class Explanation(BaseModel):
    """One image's occlusion map; ``grid[i][j]``: the drop of ``label``'s probability when
    cell (row i, column j) of the crop is covered (negative: covering it raises the score)."""

    model: str
    label: str
    #: p(label) of the unoccluded plain crop
    score: float
    grid: list[list[float]]
    window: CropWindow


class Occlusions(NamedTuple):
    """What the model runs for one explanation, and what the answer needs besides its output:
    the crops to run are made from ``crop`` on demand (:meth:`rows`)."""

    #: (1, 3, H, W) uint8: the unoccluded plain crop
    crop: np.ndarray
    #: (3,) uint8: the patch's pixel
    fill: np.ndarray
    grid: int
    window: CropWindow
    #: the asked label's index; None: the unoccluded crop's top-1
    label: int | None

    @property
    def count(self) -> int:
        """How many crops the model runs: grid*grid + 1."""
        return self.grid * self.grid + 1

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Crops ``start``..``stop`` (exclusive) of :attr:`batch`, made now, as a new array."""
        return occluded_rows(self.crop, self.grid, self.fill, start, stop)

    @property
    def batch(self) -> np.ndarray:
        """(grid*grid + 1, 3, H, W) uint8: the unoccluded crop, then cell (0, 0), (0, 1), ...
        covered; all of them at once (one image offline; a server runs :meth:`rows` slices)."""
        return self.rows(0, self.count)


def check_grid(grid: int) -> int:
    if isinstance(grid, bool) or not isinstance(grid, int) or not MIN_GRID <= grid <= MAX_GRID:
        raise BadRequestError(f"grid must be an integer in {MIN_GRID}..{MAX_GRID} (cells per side), got {grid!r:.20}")
    return grid


def label_index(labels: Sequence[str], label: str | None) -> int | None:
    """The index of ``label`` in ``labels`` (None stays None: the top-1 is taken later)."""
    if label is None:
        return None
    try:
        return list(labels).index(label)
    except ValueError:
        named = ", ".join(labels[:_LABELS_NAMED])
        more = f" and {len(labels) - _LABELS_NAMED} more (see the model card)" if len(labels) > _LABELS_NAMED else ""
        raise BadRequestError(f"unknown label {label!r:.60}; this model's labels are {named}{more}") from None


def neutral_pixel(normalization: NormalizationSpec) -> np.ndarray:
    """(3,) uint8: the pixel the model normalizes to ~0 in every channel."""
    mean = np.asarray(normalization.mean, dtype=np.float64) * normalization.pixel_scale
    return np.clip(np.floor(mean + 0.5), 0, 255).astype(np.uint8)


def cell_edges(size: int, grid: int) -> list[int]:
    """The ``grid + 1`` edges of the cells along a side of ``size`` pixels: round(i*size/grid),
    halves rounded up, so the cells cover the side exactly and differ by at most one pixel."""
    return [(2 * i * size + grid) // (2 * grid) for i in range(grid + 1)]


def occluded_batch(crop: np.ndarray, grid: int, fill: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) uint8 -> (grid*grid + 1, 3, H, W): ``crop``, then ``crop`` with each cell
    in row-major order set to ``fill`` ((3,) uint8)."""
    return occluded_rows(crop, grid, fill, 0, grid * grid + 1)


def occluded_rows(crop: np.ndarray, grid: int, fill: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start``..``stop`` (exclusive) of :func:`occluded_batch`, without making the others."""
    if crop.ndim != 4 or crop.shape[0] != 1 or crop.dtype != np.uint8:
        raise ValueError(f"occluded crops are made from one (1, 3, H, W) uint8 crop, got {crop.shape} {crop.dtype}")
    if not 0 <= start <= stop <= grid * grid + 1:
        raise ValueError(f"rows {start}..{stop} are outside the {grid * grid + 1} crops of grid {grid}")
    _, _, height, width = crop.shape
    rows, cols = cell_edges(height, grid), cell_edges(width, grid)
    batch = np.repeat(crop, stop - start, axis=0)
    patch = fill.reshape(3, 1, 1)
    for row in range(max(start, 1), stop):  # row 0 is the unoccluded crop
        i, j = divmod(row - 1, grid)
        batch[row - start, :, rows[i] : rows[i + 1], cols[j] : cols[j + 1]] = patch
    return batch


def occlusion_map(probs: np.ndarray, label: int, grid: int) -> np.ndarray:
    """(grid*grid + 1, C) probabilities of :func:`occluded_batch`'s crops -> (grid, grid)
    p(label | original) - p(label | cell covered)."""
    if probs.shape[0] != grid * grid + 1:
        raise ValueError(f"expected {grid * grid + 1} rows of probabilities (grid {grid}), got {probs.shape[0]}")
    column = probs[:, label].astype(np.float64)
    return (column[0] - column[1:]).reshape(grid, grid)


def crop_window(pre: Preprocessor, width: int, height: int) -> CropWindow:
    """The plain crop's box on a ``width`` x ``height`` image (the resize need not keep the
    aspect ratio exactly: the preprocessor's own mapping, per axis)."""
    (left, top, w, h, _), = pre.source_windows(width, height, "none")
    return CropWindow(left=left, top=top, width=w, height=h)


def occlusions(pre: Preprocessor, normalization: NormalizationSpec, data: bytes, *,
               grid: int, label: int | None) -> Occlusions:
    """Decode ``data`` (at full scale, so the window is in the upload's own pixels) and cut its
    plain crop; the occluded crops are made later, by :meth:`Occlusions.rows`. Raises the
    image's typed error."""
    img = decode_image(data, limits=pre.limits, exif_transpose=pre.exif_transpose)
    return Occlusions(pre.plain(img), neutral_pixel(normalization), grid, crop_window(pre, img.width, img.height),
                      label)


def explanation(model: str, labels: Sequence[str], occluded: Occlusions, probs: np.ndarray) -> Explanation:
    """The answer from the batch's (grid*grid + 1, C) probabilities."""
    label = int(np.argmax(probs[0])) if occluded.label is None else occluded.label
    heat = occlusion_map(probs, label, occluded.grid)
    return Explanation(model=model, label=labels[label], score=float(probs[0, label]),
                       grid=[[float(v) for v in row] for row in heat], window=occluded.window)
