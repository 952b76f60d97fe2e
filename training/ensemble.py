"""``sota-serve ensemble`` and ``train --seeds N --ensemble``: the validation images come from
a training dataset (an image folder, ``digits`` or Imagenette), the ensembling from the core."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sota_serve.building.ensemble import EnsembleError, Validation, build_ensemble
from sota_serve.building.quantize import add_int8
from sota_serve.package.card import ModelCard
from sota_serve.package.loading import open_package
from training.datasets import resolve_dataset
from training.quiet import quiet_export
from training.staging import staged


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
                      name: str | None = None, data: str | None = None, int8: bool | None = None,
                      seed: int = 0) -> ModelCard:
    """Ensemble ``paths`` into ``out``, measured on ``data``'s validation images when given.

    ``int8``: also write the int8 file, calibrated on ``data``'s training images and checked
    against fp32 on its validation images (as ``train`` does for one model); None: when
    ``data`` is given and every member has an int8 file. On a CPU the int8 ensemble served
    1.7x fp32 (BENCHMARKS.md), and ``auto`` precision only picks a file the package has."""
    if int8 and data is None:
        raise EnsembleError("an int8 ensemble needs --data: its training images set the int8 ranges")
    members = [open_package(p) for p in paths]  # opened (and their hashes checked) once
    validation = validation_set(data, members[0].card.labels) if data else None
    if int8 is None:
        int8 = data is not None and all(any("int8" in m.precisions(b) for b in m.backends) for m in members)
    with staged(out) as staging:  # the package whole, or nothing
        with quiet_export():
            card = build_ensemble(members, staging, weights=weights, name=name, validation=validation)
        if int8:
            assert data is not None and validation is not None  # int8 without data was refused above
            card = add_int8(staging, resolve_dataset(data).files("train"), seed=seed,
                            check_images=validation.files)
    return card
