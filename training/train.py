"""Run a recipe's stages with fastai: fit_one_cycle, then fine_tune at each larger size."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import fastai.callback.fp16  # noqa: F401  (patches Learner.to_fp16 / to_fp32)
import fastai.callback.progress  # noqa: F401  (patches Learner.no_bar)
import fastai.callback.schedule  # noqa: F401  (patches fit_one_cycle / fine_tune)
import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import MixUp
from fastai.callback.schedule import LRFinder
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropy
from fastai.metrics import accuracy
from fastai.torch_core import set_seed, trainable_params
from fastai.vision.models.xresnet import xresnet18, xresnet34, xresnet50

from sota_serve.progress import Pacer, interactive
from training.dataloaders import make_dataloaders
from training.datasets import ImageFolder
from training.recipe import Recipe
from training.weights import SourceWeights, head_splitter, load_into

log = logging.getLogger("sota_serve.training")

_XRESNETS = {"xresnet18": xresnet18, "xresnet34": xresnet34, "xresnet50": xresnet50}

#: Seconds between progress lines within an epoch, on a terminal: an epoch takes half a minute
#: on an idle 2-core machine for the demo, and several on a loaded one.
PROGRESS_EVERY_S = 10.0


def build_model(arch: str, n_out: int) -> torch.nn.Module:
    """``arch`` with random weights and an ``n_out``-way head."""
    if arch in _XRESNETS:
        return _XRESNETS[arch](n_out=n_out)
    import torchvision

    return getattr(torchvision.models, arch)(weights=None, num_classes=n_out)


@dataclass
class LRFind:
    """fastai's learning-rate finder before one stage: the curve and what was used."""

    stage: int
    suggested: float
    lrs: list[float]
    losses: list[float]

    def record(self) -> dict[str, Any]:
        return {"stage": self.stage, "suggested_lr": self.suggested, "used_lr": self.suggested}


def find_lr(learn: Learner, stage: int, iterations: int = 100) -> LRFind:
    suggestion = learn.lr_find(num_it=iterations, show_plot=False)
    lrs = [float(x) for x in learn.recorder.lrs]
    losses = [float(x) for x in learn.recorder.losses]
    return LRFind(stage, float(suggestion.valley), lrs, losses)


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


class EpochProgress(Callback):
    """On a terminal, a line every ``every`` seconds within an epoch (or an lr_find run): the
    batch, the smoothed training loss, the seconds since the epoch began. Off a terminal,
    nothing: History's epoch lines are what a log keeps. Silent in the evaluation's get_preds,
    validate and tta, which fire batch events too."""

    order = 61  # after Recorder (its smoothed loss) and History (the epoch's number)

    def __init__(self, every: float, *, enabled: bool) -> None:
        self.pacer = Pacer(every, enabled=enabled)

    def before_epoch(self) -> None:
        self.pacer.restart()

    def after_batch(self) -> None:
        history: History = self.learn.history  # type: ignore[attr-defined]
        finding = any(isinstance(cb, LRFinder) for cb in self.learn.cbs)
        if not (history.recording or finding) or not self.pacer.due():
            return
        where = f"stage {history.stage}, {history.size}px"
        what = f"lr_find ({where})" if finding else f"epoch {len(history.rows) + 1} ({where})"
        phase = "batch" if self.learn.training else "validation batch"
        loss = f", loss {float(self.learn.recorder.smooth_loss.value):.4f}" if self.learn.training else ""
        self.pacer.say(f"{what}: {phase} {self.learn.iter + 1}/{self.learn.n_iter}{loss},"
                       f" {self.pacer.elapsed:.0f}s")


@dataclass
class TrainResult:
    learn: Learner
    history: list[dict[str, Any]]
    seconds: float
    device: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: the learning-rate finder's runs, one per stage, when the recipe asks for them
    lr_finds: list[LRFind]
    #: how much of the starting checkpoint was used ("loaded" of "tensors"), when there was one
    transfer: dict[str, int] | None
    schedule: str


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


def train(recipe: Recipe, folder: ImageFolder, mean, std, weights: SourceWeights | None = None) -> TrainResult:
    """Train from scratch, or from ``weights``; returns the Learner at the final stage's size."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    set_seed(recipe.seed, reproducible=True)
    loss = (LabelSmoothingCrossEntropy(eps=recipe.label_smoothing) if recipe.label_smoothing
            else CrossEntropyLossFlat())
    cbs: list[Callback] = [History(), EpochProgress(PROGRESS_EVERY_S, enabled=interactive())]
    if recipe.mixup:
        cbs.append(MixUp(recipe.mixup))
    dls = _dls(recipe, folder, 0, mean, std, device)
    model = build_model(recipe.arch, len(folder.classes))
    transfer = load_into(model, weights, recipe.arch) if weights else None
    # Body and head groups only for transfer: a from-scratch run keeps fastai's single group
    # (its later fine_tune stages then train every layer at the stage's rate, as before).
    learn = Learner(dls, model, loss_func=loss, metrics=accuracy, cbs=cbs,
                    splitter=head_splitter if weights else trainable_params)
    if device == "cuda" and recipe.mixed_precision:
        learn = learn.to_fp16()
    if device == "cuda" and recipe.channels_last:
        from fastai.callback.channelslast import ChannelsLast

        learn.add_cb(ChannelsLast())
    history: History = learn.history  # type: ignore[attr-defined]
    start = time.perf_counter()
    # fastai's bar and table neither: History's epoch lines and, on a terminal, EpochProgress's
    # lines say the same in the same words, on a terminal and in a log alike
    with learn.no_bar(), learn.no_logging():
        finds = []
        for i, stage in enumerate(recipe.stages):
            history.stage, history.size = i + 1, stage.size
            if i:
                learn.dls = _dls(recipe, folder, i, mean, std, device)
            fine_tune = i > 0 or weights is not None
            lr = stage.lr
            if recipe.lr_find:
                if fine_tune and recipe.freeze_epochs:
                    learn.freeze()  # the rate of fine_tune's first, head-only phase
                finds.append(find_lr(learn, i + 1, recipe.lr_find_iterations))
                lr = finds[-1].suggested
                log.info("stage %d: lr_find suggests %.2e", i + 1, lr)
            history.recording = True
            if fine_tune:
                learn.fine_tune(stage.epochs, lr, freeze_epochs=recipe.freeze_epochs)
            else:
                learn.fit_one_cycle(stage.epochs, lr)
            history.recording = False
    seconds = time.perf_counter() - start
    first = "fine_tune" if weights is not None else "fit_one_cycle"
    schedule = (f"stage 1: {first}, later stages: fine_tune; fine_tune trains the head alone for"
                f" {recipe.freeze_epochs} epoch(s) at lr, then every layer with slice(lr/100, lr)")
    return TrainResult(learn, history.rows, seconds, device, tuple(mean), tuple(std), finds, transfer, schedule)


def export_model(learn: Learner) -> torch.nn.Module:
    """The trained network as a plain float32 CPU module in eval mode (no fastai inside)."""
    if hasattr(learn, "to_fp32"):
        learn.to_fp32()
    model = learn.model.float().cpu().eval()
    return model.to(memory_format=torch.contiguous_format)
