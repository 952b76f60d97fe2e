"""The demo dataset: scikit-learn's 1,797 real handwritten digits as an image folder.

The 8x8 scans are upscaled to 64x64 RGB PNGs (dark ink on white), split 80/20 stratified
with a fixed seed, so every machine builds the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64
SEED = 0
VALID_FRACTION = 0.2


def digit_image(pixels: np.ndarray, size: int = SIZE) -> Image.Image:
    """One 8x8 sklearn digit (values 0..16) as a ``size`` x ``size`` RGB image."""
    ink = np.clip(pixels * (255.0 / 16.0), 0, 255)
    gray = Image.fromarray((255 - ink).astype(np.uint8), mode="L")
    return gray.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def build_digits(root: Path) -> Path:
    """Write root/train/<digit>/*.png and root/val/<digit>/*.png (once; reused after)."""
    done = root / ".complete"
    if done.exists():
        return root
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train, valid = train_test_split(
        index, test_size=VALID_FRACTION, random_state=SEED, stratify=digits.target
    )
    for split, ids in (("train", train), ("val", valid)):
        for i in ids:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            digit_image(digits.images[i]).save(folder / f"{i:04d}.png")
    done.write_text(f"{len(train)} train, {len(valid)} val\n")
    return root
