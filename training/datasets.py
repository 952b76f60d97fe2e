"""Where training images come from: a local image folder, the digits demo, or Imagenette."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from sota_serve.constants import IMAGE_SUFFIXES
from sota_serve.errors import SotaServeError

# Imagenette's class folders are ImageNet wnids; the card carries readable labels.
IMAGENETTE_LABELS = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888605": "parachute",
}


class DatasetError(SotaServeError, ValueError):
    """The dataset is missing or not laid out as train/<class>/ and val/<class>/."""


@dataclass(frozen=True)
class ImageFolder:
    root: Path
    train_name: str
    valid_name: str
    classes: tuple[str, ...]
    #: label shown to users per class folder (folder name unless a known mapping applies)
    labels: tuple[str, ...]
    name: str

    def files(self, split: str) -> list[Path]:
        folder = self.root / (self.train_name if split == "train" else self.valid_name)
        return sorted(
            p for c in self.classes for p in (folder / c).rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )

    def fingerprint(self) -> str:
        """sha256 over relative paths and sizes: changes when files are added or replaced."""
        digest = hashlib.sha256()
        for split in ("train", "valid"):
            for p in self.files(split):
                digest.update(f"{p.relative_to(self.root)}:{p.stat().st_size}\n".encode())
        return digest.hexdigest()


def open_image_folder(root: str | Path, name: str | None = None) -> ImageFolder:
    root = Path(root)
    if not root.is_dir():
        what = "not a folder" if root.exists() else "no such folder"
        raise DatasetError(f"{root}: {what}; give an image folder with train/ and val/ sub-folders,"
                           " one folder per class in each (or 'digits', or an Imagenette name)")
    if not (root / "train").is_dir():
        raise DatasetError(f"{root}: expected a train/ folder with one sub-folder per class")
    valid = next((v for v in ("val", "valid") if (root / v).is_dir()), None)
    if valid is None:
        raise DatasetError(f"{root}: expected a val/ (or valid/) folder with one sub-folder per class")
    classes = tuple(sorted(d.name for d in (root / "train").iterdir() if d.is_dir()))
    if len(classes) < 2:
        raise DatasetError(f"{root}/train: found {len(classes)} class folders; need at least 2")
    missing = [c for c in classes if not (root / valid / c).is_dir()]
    if missing:
        raise DatasetError(f"{root}/{valid}: no folder for classes {missing[:5]}")
    known = all(c in IMAGENETTE_LABELS for c in classes)
    labels = tuple(IMAGENETTE_LABELS[c] for c in classes) if known else classes
    return ImageFolder(root, "train", valid, classes, labels, name or root.name)


def cache_dir() -> Path:
    base = os.environ.get("SOTA_SERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sota-serve"
    )
    return Path(base)


def resolve_dataset(data: str) -> ImageFolder:
    """``digits`` (built locally), ``imagenette[-160|-320]`` (downloaded), or a folder path."""
    if data == "digits":
        from training.digits import build_digits

        return open_image_folder(build_digits(cache_dir() / "digits"), name="sklearn-digits")
    if data.startswith("imagenette") and not Path(data).exists():
        return open_image_folder(_download_imagenette(data), name=data)
    return open_image_folder(data)


def _download_imagenette(name: str) -> Path:
    # Needs a network: fastai fetches the archive once into ~/.fastai/data.
    from fastai.data.external import URLs, untar_data

    urls = {"imagenette": URLs.IMAGENETTE, "imagenette-160": URLs.IMAGENETTE_160,
            "imagenette-320": URLs.IMAGENETTE_320}
    if name not in urls:
        raise DatasetError(f"unknown dataset {name!r}; use one of {', '.join(urls)} or a folder path")
    return Path(untar_data(urls[name]))
