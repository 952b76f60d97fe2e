"""What every process of the service reads once at import: settings, the plan for this
machine, and the model (a package directory, or a model-store tag)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bentoml

from bento.settings import load_settings

SETTINGS = load_settings()
PLAN = SETTINGS.plan()
# A package directory is served as it is; anything else is a model-store tag, declared as a
# BentoModel so that `bentoml build` records it in the Bento.
MODEL: Any = (Path(SETTINGS.model) if Path(SETTINGS.model).is_dir()
              else bentoml.models.BentoModel(SETTINGS.model))


def model_dir(model: Any) -> Path:
    return Path(model.path) if hasattr(model, "path") else Path(model)
