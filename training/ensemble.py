"""``sota-serve ensemble`` and ``train --seeds N --ensemble``: the validation images come from
a training dataset (an image folder, ``digits`` or Imagenette), the ensembling from the core."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sota_serve.card import ModelCard
from sota_serve.ensemble import EnsembleError, Validation, build_ensemble
from sota_serve.package import open_package
from training.datasets import resolve_dataset


def validation_set(data: str, labels: Sequence[str]) -> Validation:
    """The dataset's validation images, their targets indexed in the card's ``labels``."""
    folder = resolve_dataset(data)
    unknown = sorted(set(folder.labels) - set(labels))
    if unknown:
        raise EnsembleError(f"{data}: classes {unknown[:5]} are not among the members' labels")
    index = {label: labels.index(label) for label in folder.labels}
    by_class = dict(zip(folder.classes, folder.labels, strict=True))
    files = folder.files("valid")
    # files() lists valid/<class>/...; the class is the first folder under the split
    targets = [index[by_class[f.relative_to(folder.root / folder.valid_name).parts[0]]] for f in files]
    return Validation(files=files, targets=np.asarray(targets))


def ensemble_packages(paths: Sequence[str | Path], out: str | Path, *, weights: Sequence[float] | None = None,
                      name: str | None = None, data: str | None = None) -> ModelCard:
    validation = validation_set(data, open_package(paths[0]).card.labels) if data else None
    return build_ensemble(paths, out, weights=weights, name=name, validation=validation)
