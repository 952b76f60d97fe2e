"""Training recipes: pydantic, loadable from TOML, overridable from the command line."""

from __future__ import annotations

import re
import tomllib
import unicodedata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sota_serve.errors import SotaServeError

#: fastai's xresnets (the book's) and torchvision's ResNets (whose published state dicts
#: ``--weights`` reads); all are built with random weights, nothing is downloaded.
ARCHS = ("xresnet18", "xresnet34", "xresnet50", "resnet18", "resnet34", "resnet50")
IMAGENETTE_DATASETS = ("imagenette", "imagenette-160", "imagenette-320")
#: The longest name BentoML takes in a tag (``name:version``).
TAG_NAME_LENGTH = 63
#: What a recipe without a name and with nothing to name it after is called.
FALLBACK_NAME = "model"


class RecipeError(SotaServeError, ValueError):
    """A recipe file or flag is invalid."""


class Stage(BaseModel):
    """One progressive-resizing stage: train at ``size`` px for ``epochs``."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(gt=8, le=1024)
    epochs: int = Field(ge=1, le=1000)
    batch_size: int = Field(default=64, ge=1, le=4096)
    lr: float = Field(default=3e-3, gt=0, le=10)


class Recipe(BaseModel):
    """Everything that determines a training run (recorded in the card's ``training.recipe``)."""

    model_config = ConfigDict(extra="forbid")

    #: without one, :func:`load_recipe` names the model after its data (:func:`name_for`)
    name: str = Field(default=FALLBACK_NAME, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    #: an image folder with train/ and val/ (or valid/), "digits", or an Imagenette name
    data: str
    arch: Literal["xresnet18", "xresnet34", "xresnet50", "resnet18", "resnet34", "resnet50"] = "xresnet18"
    #: ``weights``: the stats the ``weights`` were trained with (a sota-serve package says);
    #: the default when such weights are given and the recipe names none
    normalization: Literal["imagenet", "dataset", "weights"] = "imagenet"
    #: transfer learning: start from this local checkpoint (state dict, safetensors, or a
    #: sota-serve package of the same architecture); every stage then runs fastai's
    #: fine_tune (head alone for ``freeze_epochs``, then all layers with slice(lr/100, lr))
    weights: str | None = None
    freeze_epochs: int = Field(default=1, ge=0, le=100)
    #: run fastai's lr_find before each stage and train at its suggestion (``--lr find``)
    lr_find: bool = False
    #: batches each lr_find run trains on, whatever the data (fastai's default: 100)
    lr_find_iterations: int = Field(default=100, ge=20, le=10_000)
    #: training images sampled to compute ``dataset`` stats
    stats_sample: int = Field(default=512, ge=8)
    #: the first stage runs fit_one_cycle, later ones fine_tune (the book's schedule)
    stages: list[Stage] = Field(min_length=1)
    #: MixUp alpha; None turns MixUp off
    mixup: float | None = Field(default=None, gt=0)
    #: label smoothing epsilon; None uses plain cross-entropy
    label_smoothing: float | None = Field(default=0.1, gt=0, lt=1)
    #: share of the resized validation image the center crop keeps (1.0: the whole square)
    crop_pct: float = Field(default=1.0, gt=0.3, le=1.0)
    #: five-crop TTA resize edges to try, as crop / ratio; the best goes into the card
    five_crop_ratios: list[float] = Field(default=[0.875, 0.8], min_length=1)
    min_scale: float = Field(default=0.35, gt=0, le=1)
    flip: bool = True
    max_rotate: float = Field(default=10.0, ge=0)
    seed: int = 42
    #: the trained model's license (SPDX id or Hugging Face license name), written to the card
    license: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9.+-]*$")
    mixed_precision: bool = True
    #: also export an fp16 file per format, with its agreement with fp32 measured on the
    #: validation set (``precision auto`` serves it on a GPU when it holds)
    fp16: bool = False
    #: also export an int8 ONNX file (static quantization calibrated on training images), with
    #: its agreement with fp32 measured on the validation set on a CPU (``precision auto``
    #: serves it on a CPU when it holds)
    int8: bool = True
    channels_last: bool = True
    num_workers: int | None = Field(default=None, ge=0)

    @field_validator("five_crop_ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if any(not 0.3 < r < 1 for r in v):
            raise ValueError(f"five_crop_ratios must lie in (0.3, 1), e.g. [0.875, 0.8]; got {v}")
        return v

    @property
    def final_size(self) -> int:
        return self.stages[-1].size

    @property
    def resize_edge(self) -> int:
        return round(self.final_size / self.crop_pct)

    @property
    def epochs(self) -> int:
        return sum(s.epochs for s in self.stages)


PRESETS: dict[str, dict[str, Any]] = {
    # The book's run (fastbook ch. 7): xresnet50 from scratch on Imagenette, ImageNet stats,
    # 128 px for 4 epochs, then 224 px fine-tuned for 5, label smoothing.
    "imagenette": {
        "name": "imagenette-xresnet50",
        "data": "imagenette",
        "arch": "xresnet50",
        "normalization": "imagenet",
        "stages": [
            {"size": 128, "epochs": 4, "batch_size": 128, "lr": 3e-3},
            {"size": 224, "epochs": 5, "batch_size": 64, "lr": 1e-3},
        ],
        "label_smoothing": 0.1,
        "min_scale": 0.35,
    },
    # The demo: real handwritten digits, small enough to train on 2 CPU cores in ~2 minutes.
    "digits": {
        "name": "digits-xresnet18",
        "data": "digits",
        "arch": "xresnet18",
        "normalization": "dataset",
        "stages": [
            {"size": 48, "epochs": 4, "batch_size": 64, "lr": 1e-2},
            {"size": 64, "epochs": 2, "batch_size": 64, "lr": 4e-3},
        ],
        "mixup": 0.2,
        "label_smoothing": 0.1,
        "min_scale": 0.6,
        "flip": False,
        "max_rotate": 10.0,
        "num_workers": 0,
        # the UCI handwritten digits that scikit-learn ships are CC BY 4.0
        "license": "cc-by-4.0",
    },
}


def load_recipe(
    *, preset: str | None = None, path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Recipe:
    """Precedence: explicit overrides > recipe file > preset."""
    data: dict[str, Any] = {}
    named = False  # a name the user wrote (a flag or the recipe file), not a preset's
    if preset is not None:
        if preset not in PRESETS:
            raise RecipeError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
        data |= PRESETS[preset]
    if path is not None:
        try:
            with Path(path).open("rb") as f:
                written = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise RecipeError(f"cannot read recipe {path}: {e}") from e
        data |= written
        named = "name" in written
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    data |= given
    named = named or "name" in given
    # A preset's name belongs to the preset's data: other data names the model after itself.
    if not named and isinstance(data.get("data"), str) and data["data"] != PRESETS.get(preset or "", {}).get("data"):
        data["name"] = name_for(data["data"])
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise RecipeError(f"invalid recipe: {problems}") from e


def name_for(data: str) -> str:
    """A model name from a dataset: the folder's own name as a BentoML tag name takes it
    (ASCII, lowercase; a run of other characters becomes one ``-``), e.g. ``~/Photos/My Cats/`` ->
    ``my-cats``; the dataset's name for ``digits`` and Imagenette."""
    base = data if data == "digits" or data in IMAGENETTE_DATASETS else Path(data).expanduser().resolve().name
    ascii_base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()  # Été -> Ete
    name = re.sub(r"[^a-z0-9._-]+", "-", ascii_base.lower())
    name = re.sub(r"^[^a-z0-9]+|[^a-z0-9]+$", "", name[:TAG_NAME_LENGTH])
    return name or FALLBACK_NAME


def parse_stages(text: str) -> list[dict[str, Any]]:
    """``"48:4:64:4e-3,64:2:64:2e-3"`` (size:epochs[:batch_size[:lr]]) -> stage dicts."""
    stages = []
    for part in text.split(","):
        fields = part.strip().split(":")
        if not 2 <= len(fields) <= 4:
            raise RecipeError(f"bad stage {part!r}; write size:epochs[:batch_size[:lr]], e.g. 128:4:64:3e-3")
        try:
            stage: dict[str, Any] = {"size": int(fields[0]), "epochs": int(fields[1])}
            if len(fields) > 2:
                stage["batch_size"] = int(fields[2])
            if len(fields) > 3:
                stage["lr"] = float(fields[3])
        except ValueError as e:
            raise RecipeError(f"bad stage {part!r}: {e}") from e
        stages.append(stage)
    return stages
