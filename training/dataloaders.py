"""fastai DataLoaders whose validation pipeline *is* sota-serve's serving pipeline.

Images are decoded by :func:`sota_serve.image.decode.read_image_file` (EXIF orientation, RGB
conversion) and validation images are cropped by :func:`sota_serve.image.preprocess.resize_center_crop`,
so what fastai validates on is what the exported package is fed: train/serve parity holds
by construction, and the parity check measures only numerical differences.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import GrandparentSplitter, IntToFloatTensor, Normalize, parent_label
from fastai.vision.augment import RandomResizedCrop, aug_transforms
from fastai.vision.core import PILImage
from fasttransform import Transform

from sota_serve.image.decode import read_image_file
from sota_serve.image.preprocess import resize_center_crop
from training.datasets import ImageFolder


def load_image(path: Path) -> PILImage:
    """The serving decoder, as fastai's item loader."""
    return PILImage.create(read_image_file(path))


class ServeCrop(Transform):
    """Validation only: the card's resize-shortest-edge + center crop."""

    split_idx, order = 1, 1

    def __init__(self, edge: int, size: int, interpolation: str = "bilinear") -> None:
        super().__init__()
        self.edge, self.size, self.interpolation = edge, size, interpolation

    def encodes(self, img: PILImage) -> PILImage:
        return PILImage(resize_center_crop(img, self.edge, self.size, self.size, self.interpolation))


class TrainCrop(RandomResizedCrop):
    """Training only: fastai's random resized crop (validation is :class:`ServeCrop`'s)."""

    split_idx = 0


def make_dataloaders(
    folder: ImageFolder,
    *,
    size: int,
    resize_edge: int,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    min_scale: float,
    flip: bool,
    max_rotate: float,
    num_workers: int,
    device: str,
    seed: int,
) -> DataLoaders:
    files = folder.files("train") + folder.files("valid")
    block = DataBlock(
        blocks=(
            TransformBlock(type_tfms=load_image, batch_tfms=IntToFloatTensor),
            CategoryBlock(vocab=list(folder.classes)),
        ),
        get_items=lambda _: files,
        splitter=GrandparentSplitter(train_name=folder.train_name, valid_name=folder.valid_name),
        get_y=parent_label,
        item_tfms=[TrainCrop(size, min_scale=min_scale), ServeCrop(resize_edge, size)],
        batch_tfms=[
            *aug_transforms(do_flip=flip, max_rotate=max_rotate, size=None),
            Normalize.from_stats(list(mean), list(std)),
        ],
    )
    return block.dataloaders(
        folder.root, bs=batch_size, num_workers=num_workers, device=device, seed=seed
    )
