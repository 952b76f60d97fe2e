"""What every process of the service reads once at import: settings, the plan for this
machine, and the model package, opened and checked against the settings.

All of it happens when the service module is imported, which `bentoml serve` and `bentoml
build` do before anything else: a missing model, a directory without card.json or a backend
the package lacks stops them there with one line (:func:`settings_and_package`). The same
failure in the service's ``__init__`` would restart the worker forever.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bentoml

from sota_serve.errors import SotaServeError
from sota_serve.package import ModelPackage, open_package
from sota_serve.serving.settings import Plan, Settings, load_settings


def check_backend(package: ModelPackage, backend: str) -> None:
    """Refuse a backend whose artifact the package does not carry (e.g. a TorchScript Bento on
    a model imported with ``--formats onnx``)."""
    if backend not in package.backends:
        raise SotaServeError(
            f"{package.source}: SOTA_SERVE_BACKEND={backend}, but the package has only"
            f" {', '.join(package.backends)}; serve or build with that backend, or import the"
            f" package with its {backend} artifact (sota-serve import DIR --formats {backend})")


def settings_and_package() -> tuple[Settings, Plan, ModelPackage, Any]:
    """(settings, plan, the opened package, the model as the service declares it); exits with
    one line naming the problem when any of it is wrong."""
    try:
        settings = load_settings()
        package = open_package(settings.model)
        check_backend(package, settings.backend)
        plan = settings.plan()
    except SotaServeError as e:
        raise SystemExit(f"sota-serve: cannot serve: {e}") from None
    # A package directory or file is served as it is; a model-store tag is declared as a
    # BentoModel, so that `bentoml build` records it in the Bento.
    model = Path(settings.model) if Path(settings.model).exists() else bentoml.models.BentoModel(settings.model)
    return settings, plan, package, model
