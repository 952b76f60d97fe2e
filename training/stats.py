"""Normalization statistics: ImageNet's, or measured on a sample of the training images."""

from __future__ import annotations

import random

import numpy as np

from sota_serve.constants import IMAGENET_MEAN, IMAGENET_STD
from sota_serve.image.decode import read_image_file
from sota_serve.image.preprocess import resize_center_crop
from sota_serve.progress import progress
from training.datasets import ImageFolder


def dataset_stats(
    folder: ImageFolder, *, size: int, edge: int, sample: int, seed: int
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of pixels/255 over ``sample`` training images, seen as the
    model sees them at validation (decoded and cropped by the serving code)."""
    files = folder.files("train")
    picked = random.Random(seed).sample(files, min(sample, len(files)))
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for path in progress(picked, desc="dataset stats"):
        img = resize_center_crop(read_image_file(path), edge, size, size)
        px = np.asarray(img, dtype=np.float64).reshape(-1, 3) / 255.0
        total += px.sum(0)
        total_sq += (px**2).sum(0)
        count += len(px)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)  # type: ignore[return-value]


def recipe_stats(kind: str, folder: ImageFolder, **kwargs: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if kind == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    return dataset_stats(folder, **kwargs)
