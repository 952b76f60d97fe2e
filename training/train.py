"""Run a recipe's stages with fastai: fit_one_cycle, then fine_tune at each larger size."""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import fastai.callback.fp16  # noqa: F401  (patches Learner.to_fp16 / to_fp32)
import fastai.callback.progress  # noqa: F401  (patches Learner.no_bar)
import fastai.callback.schedule  # noqa: F401  (patches fit_one_cycle / fine_tune)
import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import MixUp
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropy
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.vision.models.xresnet import xresnet18, xresnet34, xresnet50

from sota_serve.progress import interactive
from training.dataloaders import make_dataloaders
from training.datasets import ImageFolder
from training.recipe import Recipe

log = logging.getLogger("sota_serve.training")

_ARCHS = {"xresnet18": xresnet18, "xresnet34": xresnet34, "xresnet50": xresnet50}


class History(Callback):
    """One row per epoch: stage, size, losses, accuracy, seconds (goes into the card)."""

    order = 60  # after fastai's Recorder has written the epoch's values

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.stage = 0
        self.size = 0
        # learn.validate() and get_preds() fire fit and epoch events too, so the training
        # loop switches recording on around its own fits.
        self.recording = False

    def before_epoch(self) -> None:
        self._start = time.perf_counter()

    def after_epoch(self) -> None:
        if not self.recording:
            return
        values = self.learn.recorder.values[-1]
        row = {
            "epoch": len(self.rows) + 1,
            "stage": self.stage,
            "size": self.size,
            "train_loss": round(float(values[0]), 5),
            "valid_loss": round(float(values[1]), 5),
            "accuracy": round(float(values[2]), 5),
            "seconds": round(time.perf_counter() - self._start, 2),
        }
        self.rows.append(row)
        log.info(
            "epoch %d (stage %d, %dpx): train_loss %.4f valid_loss %.4f accuracy %.4f (%.1fs)",
            row["epoch"], row["stage"], row["size"], row["train_loss"], row["valid_loss"],
            row["accuracy"], row["seconds"],
        )


@dataclass
class TrainResult:
    learn: Learner
    history: list[dict[str, Any]]
    seconds: float
    device: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _dls(recipe: Recipe, folder: ImageFolder, stage_index: int, mean, std, device: str):
    stage = recipe.stages[stage_index]
    workers = recipe.num_workers if recipe.num_workers is not None else (4 if device == "cuda" else 0)
    return make_dataloaders(
        folder,
        size=stage.size,
        resize_edge=round(stage.size / recipe.crop_pct),
        batch_size=stage.batch_size,
        mean=mean,
        std=std,
        min_scale=recipe.min_scale,
        flip=recipe.flip,
        max_rotate=recipe.max_rotate,
        num_workers=workers,
        device=device,
        seed=recipe.seed,
    )


def train(recipe: Recipe, folder: ImageFolder, mean, std) -> TrainResult:
    """Train from scratch; returns the Learner at the final stage's size."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    set_seed(recipe.seed, reproducible=True)
    loss = (LabelSmoothingCrossEntropy(eps=recipe.label_smoothing) if recipe.label_smoothing
            else CrossEntropyLossFlat())
    cbs: list[Callback] = [History()]
    if recipe.mixup:
        cbs.append(MixUp(recipe.mixup))
    dls = _dls(recipe, folder, 0, mean, std, device)
    model = _ARCHS[recipe.arch](n_out=len(folder.classes))
    learn = Learner(dls, model, loss_func=loss, metrics=accuracy, cbs=cbs)
    if device == "cuda" and recipe.mixed_precision:
        learn = learn.to_fp16()
    if device == "cuda" and recipe.channels_last:
        from fastai.callback.channelslast import ChannelsLast

        learn.add_cb(ChannelsLast())
    history: History = learn.history  # type: ignore[attr-defined]
    start = time.perf_counter()
    with ExitStack() as quiet:
        if not interactive():  # fastai's bars and tables only on a terminal
            quiet.enter_context(learn.no_bar())
            quiet.enter_context(learn.no_logging())
        history.recording = True
        for i, stage in enumerate(recipe.stages):
            history.stage, history.size = i + 1, stage.size
            if i:
                learn.dls = _dls(recipe, folder, i, mean, std, device)
                learn.fine_tune(stage.epochs, stage.lr)
            else:
                learn.fit_one_cycle(stage.epochs, stage.lr)
        history.recording = False
    seconds = time.perf_counter() - start
    return TrainResult(learn, history.rows, seconds, device, tuple(mean), tuple(std))


def export_model(learn: Learner) -> torch.nn.Module:
    """The trained network as a plain float32 CPU module in eval mode (no fastai inside)."""
    if hasattr(learn, "to_fp32"):
        learn.to_fp32()
    model = learn.model.float().cpu().eval()
    return model.to(memory_format=torch.contiguous_format)
