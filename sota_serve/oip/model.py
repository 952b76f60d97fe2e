"""The model the Open Inference Protocol answers for, over any transport: its name and version,
its metadata, its readiness, and inference through the serving pipeline (batching across
requests, protocols and routes, the TTA fallback ladder, the decode limits of ``/classify``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sota_serve import formats
from sota_serve.errors import SotaServeError
from sota_serve.oip.messages import Inference, model_metadata
from sota_serve.serving.admission import Ticket
from sota_serve.serving.pipeline import Pipeline, Probabilities


class NotFoundError(SotaServeError):
    """A request for another model's name or version."""

    http_status = 404


class ServedModel:
    def __init__(self, pipeline: Pipeline, *, backend: str, max_images: int, ready: Callable[[], bool]) -> None:
        """``max_images``: the most images one request may hold; ``ready``: whether the server
        takes inference requests (false while it loads or drains)."""
        self.pipeline, self.card = pipeline, pipeline.card
        self.platform = formats.get(backend).platform
        self.max_images, self.ready = max_images, ready

    def check(self, name: str, version: str | None) -> None:
        """Raises NotFoundError (404) unless ``name`` (and ``version``, when given) is this model."""
        if name != self.card.name:
            raise NotFoundError(f"no model {name!r} here; this server serves {self.card.name!r}")
        if version not in (None, self.card.version):
            raise NotFoundError(f"model {name!r} has no version {version!r}; it is version {self.card.version!r}")

    def metadata(self) -> dict[str, Any]:
        return model_metadata(self.card, self.platform)

    async def infer(self, inference: Inference, ticket: Ticket | None) -> Probabilities:
        """The probabilities of an admitted request; raises the typed errors of the pipeline."""
        return await self.pipeline.probabilities(inference.images, inference.pixels, inference.tta, ticket,
                                                 inference.fallback)
