"""Calibration images for int8: real images through the card's own preprocessing.

One implementation for training (a sample of the training images), for converting a fastai
Learner (``sota-serve export --calibration DIR``) and for quantizing an existing package
(``sota-serve quantize``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sota_serve.constants import IMAGE_SUFFIXES
from sota_serve.errors import BadRequestError
from sota_serve.image.preprocess import Preprocessor

#: How many images set the activation ranges (a few hundred is what ONNX Runtime suggests).
CALIBRATION_IMAGES = 256
#: Images per calibration run of the model (memory, not accuracy: the ranges are min/max).
BATCH = 32


def image_files(folder: str | Path) -> list[Path]:
    """Every image file under ``folder``, sorted; a clear error when there is none."""
    root = Path(folder)
    if not root.is_dir():
        what = "not a folder" if root.exists() else "no such folder"
        raise BadRequestError(f"{folder}: {what}; give the folder that holds the images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise BadRequestError(f"{folder}: no images found (JPEG, PNG, WebP, BMP, GIF, TIFF)")
    return files


def sample(files: Sequence[Path], count: int, *, seed: int) -> list[Path]:
    """A seeded sample of ``count`` of ``files`` (all of them when there are fewer), in order."""
    picked = np.random.default_rng(seed).choice(len(files), size=min(count, len(files)), replace=False)
    return [files[i] for i in sorted(picked)]


def crops(pre: Preprocessor, files: Sequence[Path], policies: Sequence[str] = ("none",)) -> np.ndarray:
    """uint8 (N, 3, H, W): each file through the card's preprocessing, the crops of each of
    ``policies`` (plain by default)."""
    return np.concatenate([pre(f.read_bytes(), tta) for f in files for tta in policies])


def batches(pixels: np.ndarray, size: int = BATCH) -> list[np.ndarray]:
    """``pixels`` in runs of ``size``: what a format's ``quantize`` takes."""
    return [pixels[i: i + size] for i in range(0, len(pixels), size)]
