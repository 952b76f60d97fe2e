"""The models the Open Inference Protocol answers for, over any transport: each model's name and
version, metadata and readiness, and inference through its serving pipeline (batching across
requests, protocols and routes, the TTA fallback ladder, the decode limits of ``/classify``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sota_serve import formats
from sota_serve.oip.messages import Inference, model_metadata
from sota_serve.serving.admission import Ticket
from sota_serve.serving.models import Loaded, Models
from sota_serve.serving.pipeline import Probabilities


class ServedModel:
    """One model in its serving version, as the protocol names it."""

    def __init__(self, loaded: Loaded, *, platform: str, max_images: int) -> None:
        self.name, self.version, self.pipeline = loaded.name, loaded.version, loaded.pipeline
        self.card, self.platform, self.max_images = loaded.card, platform, max_images

    def metadata(self) -> dict[str, Any]:
        return model_metadata(self.card, self.platform, name=self.name, version=self.version)

    async def infer(self, inference: Inference, ticket: Ticket | None) -> Probabilities:
        """The probabilities of an admitted request; raises the typed errors of the pipeline."""
        return await self.pipeline.probabilities(inference.images, inference.pixels, inference.tta, ticket,
                                                 inference.fallback)


class ServedModels:
    def __init__(self, models: Models, *, backend: str, max_images: int, ready: Callable[[], bool]) -> None:
        """``max_images``: the most images one request may hold; ``ready``: whether the server
        takes inference requests (false while it loads or drains)."""
        self.models, self.ready, self.max_images = models, ready, max_images
        self.platform = formats.get(backend).platform

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The model ``name`` (in ``version``, when given); raises ModelNotFoundError (404)."""
        return ServedModel(self.models.get(name, version), platform=self.platform, max_images=self.max_images)

    @contextmanager
    def use(self, name: str, version: str | None = None) -> Iterator[ServedModel]:
        """:meth:`get`, held for one request (a version swap meanwhile lets it finish)."""
        with self.models.use(name, version) as loaded:
            yield ServedModel(loaded, platform=self.platform, max_images=self.max_images)
