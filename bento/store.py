"""Putting a package into the BentoML model store (its own step, as BentoML's samples do)."""

from __future__ import annotations

import shutil
from pathlib import Path

import bentoml

from sota_serve.package import ModelPackage, open_package


def store_metadata(package: ModelPackage) -> tuple[dict[str, str], dict[str, object]]:
    card = package.card
    data = card.to_dict()
    metrics = data.get("metrics") or {}
    labels = {"task": card.task, "framework": "sota-serve", "card_version": card.version}
    metadata: dict[str, object] = {
        "card_name": card.name,
        "num_labels": card.num_classes,
        "labels": card.labels[:100],
        "input": f"{card.input.width}x{card.input.height}",
        "mean": list(card.normalization.mean),
        "std": list(card.normalization.std),
        "formats": list(package.backends),
    }
    for key in ("accuracy", "accuracy_five_crop", "accuracy_fastai_tta"):
        if isinstance(metrics.get(key), int | float):
            metadata[key] = round(float(metrics[key]), 5)
    return labels, metadata


def import_package(path: str | Path, *, name: str | None = None) -> bentoml.Model:
    """Verify ``path`` and copy its files into the store as ``name`` (default: the card's)."""
    package = open_package(path)
    if package.root is None:
        raise ValueError(f"{path}: import a package directory (with card.json), not a lone file")
    labels, metadata = store_metadata(package)
    with bentoml.models.create(name or package.card.name, labels=labels, metadata=metadata) as model:
        for item in package.root.iterdir():
            if item.is_file():
                shutil.copy2(item, Path(model.path) / item.name)
    # Re-open the copy: the stored files must verify too.
    open_package(model.path)
    return model
