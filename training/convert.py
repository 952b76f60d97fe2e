"""``learn.export()`` pickle -> model package, reading labels, stats and sizes from the
Learner's DataLoaders.

``load_learner`` unpickles, which runs arbitrary code from the file: callers must say they
trust it (``trust=True`` / ``--trust``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from sota_serve.building.export import export_package
from sota_serve.constants import IMAGENET_MEAN, IMAGENET_STD
from sota_serve.errors import SotaServeError
from sota_serve.package.card import ModelCard, classifier_card
from training.quiet import quiet_export
from training.staging import check_destination, staged

log = logging.getLogger("sota_serve.training")


class ConversionError(SotaServeError):
    """The Learner cannot be turned into a package (untrusted file, unsupported setup)."""


def _stats(dls: Any) -> tuple[list[float], list[float]]:
    from fastai.data.transforms import Normalize

    for tfm in dls.after_batch.fs:
        if isinstance(tfm, Normalize) and tfm.mean is not None:
            mean = np.asarray(tfm.mean.cpu() if hasattr(tfm.mean, "cpu") else tfm.mean).reshape(-1)
            std = np.asarray(tfm.std.cpu() if hasattr(tfm.std, "cpu") else tfm.std).reshape(-1)
            return [float(m) for m in mean], [float(s) for s in std]
    log.warning("the Learner's DataLoaders have no Normalize transform; assuming ImageNet stats")
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def _square(size: Any) -> int:
    sizes = [int(s) for s in (size if isinstance(size, tuple | list) else (size, size))]
    if len(set(sizes)) != 1:
        raise ConversionError(f"only square inputs are supported; the Learner uses {sizes}")
    return sizes[0]


def _sizes(dls: Any) -> tuple[int, int]:
    """(resize_shortest_edge, crop) reproducing the Learner's validation transforms."""
    from fastai.vision.augment import AffineCoordTfm, RandomResizedCrop, Resize

    from training.dataloaders import ServeCrop

    edge = crop = None
    for tfm in dls.after_item.fs:
        if isinstance(tfm, ServeCrop):
            edge, crop = tfm.edge, tfm.size
        elif isinstance(tfm, RandomResizedCrop):
            crop = _square(tfm.size)
            edge = crop + math.ceil(crop * tfm.val_xtra / 8) * 8  # fastai's validation margin
        elif isinstance(tfm, Resize):
            if str(tfm.method) != "crop":
                log.warning("Resize method %r is served as resize + center crop", tfm.method)
            edge = crop = _square(tfm.size)
    for tfm in dls.after_batch.fs:
        if isinstance(tfm, AffineCoordTfm) and getattr(tfm, "size", None) is not None:
            edge = crop = _square(tfm.size)  # batch resize of the (square) item to `size`
    if crop is None or edge is None:
        raise ConversionError(
            "cannot find the input size in the Learner's transforms (expected Resize,"
            " RandomResizedCrop or aug_transforms(size=...)); train with one of them"
        )
    return edge, crop


def calibration_folder(folder: str | Path, card: ModelCard, *, seed: int = 0) -> np.ndarray:
    """A seeded sample of the images under ``folder``, preprocessed as ``card`` says: what sets
    the int8 activation ranges of a converted Learner."""
    from sota_serve.building.calibration import CALIBRATION_IMAGES, crops, image_files, sample
    from sota_serve.image.preprocess import Preprocessor

    return crops(Preprocessor.from_card(card), sample(image_files(folder), CALIBRATION_IMAGES, seed=seed))


def convert_learner(pkl: str | Path, out_dir: str | Path, *, trust: bool, name: str | None = None,
                    fp16: bool = False, calibration: str | Path | None = None) -> ModelCard:
    """The Learner as a package; with ``calibration`` (a folder of images like the training
    ones) also an int8 ONNX file whose ranges come from them."""
    if not trust:
        raise ConversionError(
            f"{pkl} is a pickle: loading it runs any code it contains. Pass --trust (trust=True)"
            " only for files you or a trusted source made."
        )
    from fastai.learner import load_learner

    out = check_destination(out_dir)
    learn = load_learner(pkl, cpu=True)
    activation = getattr(learn.loss_func, "activation", None)
    if activation is None or "sigmoid" in getattr(activation, "__name__", ""):
        raise ConversionError("only single-label classifiers (softmax over classes) are supported")
    dls = learn.dls
    labels = [str(v) for v in dls.vocab]
    mean, std = _stats(dls)
    edge, crop = _sizes(dls)
    card = classifier_card(
        name=name or Path(pkl).stem.replace(" ", "-"), labels=labels, size=crop, resize_edge=edge,
        mean=mean, std=std, source={"kind": "fastai-learner", "file": Path(pkl).name},
    )
    model = learn.model.float().cpu().eval()
    crops = calibration_folder(calibration, card) if calibration is not None else None
    with staged(out) as staging, quiet_export():  # the package whole, or nothing
        return export_package(model, card, staging, fp16=fp16, int8=crops is not None, calibration=crops)
