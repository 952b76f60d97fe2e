"""Model packages to benchmark: xresnet50 at 224 px (ResNet-50 class), the demo, a tiny CNN."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sota_serve import formats
from sota_serve.constants import DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD
from sota_serve.package.card import ModelCard, classifier_card
from sota_serve.package.loading import open_package
from sota_serve.tta import POLICIES

log = logging.getLogger("sota_serve.bench")


def tiny_cnn(num_classes: int = 3, seed: int = 0):
    """A small real CNN (conv, BN, pooling, linear) with seeded random weights."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )
    with torch.no_grad():  # non-trivial BN statistics and confident outputs
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        model[-1].weight.mul_(20)
    return model.eval()


def build_model(arch: str, num_classes: int):
    """The eager network for ``arch`` (the naive peer rebuilds it the same way)."""
    if arch == "tiny":
        return tiny_cnn(num_classes)
    from fastai.vision.models.xresnet import xresnet18, xresnet34, xresnet50

    return {"xresnet18": xresnet18, "xresnet34": xresnet34, "xresnet50": xresnet50}[arch](n_out=num_classes).eval()


def synthetic_package(out: Path, *, arch: str, size: int, num_classes: int,
                      calibration: list[Path] | None = None) -> Path:
    """A package of ``arch`` with seeded random weights (speed does not depend on the weights);
    with ``calibration`` (image files) an int8 file too, its ranges set on them."""
    if (out / "card.json").exists():
        try:
            existing = open_package(out)
            have = existing.precisions(formats.DEFAULT)
            if (len(existing.card.tta.policies()) == len(POLICIES) and "fp16" in have
                    and (calibration is None or "int8" in have)):
                return out
            log.info("rebuilding %s: its card predates some TTA policies, fp16 or int8", out)
        except Exception:  # stale or partial: rebuild
            log.info("rebuilding %s", out)
    import torch

    from sota_serve.building.export import export_package

    torch.manual_seed(0)
    model = build_model(arch, num_classes)
    card = classifier_card(
        name=f"{arch}-{size}-random", labels=[f"class_{i}" for i in range(num_classes)], size=size,
        resize_edge=round(size / DEFAULT_CROP_PCT), mean=IMAGENET_MEAN, std=IMAGENET_STD,
        tta_edge=round(size / 0.8), architecture=arch, intended_use="Benchmarking only: random weights.",
    )
    check = np.random.default_rng(0).integers(0, 256, (2, 3, size, size), dtype=np.uint8)
    crops = None
    if calibration:  # few photos: their five crops too
        from sota_serve.building.calibration import crops as calibration_crops
        from sota_serve.image.preprocess import Preprocessor

        crops = calibration_crops(Preprocessor.from_card(card), calibration, ("none", "five_crop"))
    # fp16 files too, for GPU runs, and int8 for CPU runs (--precision fp16 / int8: random
    # weights give near-uniform probabilities, whose top-1 flips easily, so auto may keep fp32)
    export_package(model, card, out, check_inputs=check, fp16=True, int8=crops is not None, calibration=crops)
    return out


def architecture_of(card: ModelCard) -> str:
    return card.arch or "tiny"
