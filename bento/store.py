"""Putting a package into the BentoML model store (its own step, as BentoML's samples do)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import bentoml

from sota_serve.constants import CARD_FILE
from sota_serve.errors import PackageError
from sota_serve.package.loading import ModelPackage, open_package
from sota_serve.package.precision import split_key


def store_metadata(package: ModelPackage) -> tuple[dict[str, str], dict[str, object]]:
    card = package.card
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
    if card.metrics:
        metadata |= {key: round(value, 5) for key, value in card.metrics.headline().items()}
    return labels, metadata


def import_package(path: str | Path, *, name: str | None = None,
                   formats: Sequence[str] | None = None) -> bentoml.Model:
    """Verify ``path`` and copy its files into the store as ``name`` (default: the card's).

    ``formats`` keeps only those artifacts (e.g. ``["onnx"]``): a Bento built on the model then
    carries no TorchScript file it will not run (the demo's is half of its 86 MiB). A format
    name keeps its fp16 and int8 files too; an artifact key (``onnx-fp16``) keeps just that file.
    """
    package = open_package(path)
    if package.root is None:
        raise ValueError(f"{path}: import a package directory (with card.json), not a lone file")
    card = package.card
    if formats is not None:
        unknown = sorted(set(formats) - set(card.artifacts))
        if unknown or not formats:
            raise PackageError(f"{path}: formats {', '.join(unknown) or '(none)'} not in the package,"
                               f" which has {', '.join(card.artifacts)}")
        card = card.with_updates(artifacts={k: a.model_dump() for k, a in card.artifacts.items()
                                            if k in formats or split_key(k)[0] in formats})
    dropped = {a.path for b, a in package.card.artifacts.items() if b not in card.artifacts}
    labels, metadata = store_metadata(package)
    metadata["formats"] = list(card.artifacts)
    with bentoml.models.create(name or card.name, labels=labels, metadata=metadata) as model:
        for item in package.root.iterdir():
            if item.is_file() and item.name not in dropped:
                shutil.copy2(item, Path(model.path) / item.name)
        (Path(model.path) / CARD_FILE).write_text(card.to_json())
    # Re-open the copy: the stored files must verify too.
    open_package(model.path)
    return model
