"""``bentoml serve``: an API service (decode + preprocess, CPU) in front of a batched
inference service (the model, GPU when there is one). Wiring only; logic is in handlers.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

from bento.guard import RequestGuard
from bento.handlers import RequestHandler, http_error
from bento.schemas import BatchResponse, ClassifyResponse
from bento.settings import load_settings
from sota_serve.constants import N_FIVE_CROPS
from sota_serve.decode import DecodeLimits
from sota_serve.errors import ImageError
from sota_serve.package import open_package
from sota_serve.preprocess import Preprocessor
from sota_serve.runtime import load_runtime

SETTINGS = load_settings()
# A package directory is served as it is; anything else is a model-store tag, declared as a
# BentoModel so that `bentoml build` records it in the Bento.
MODEL: Any = (Path(SETTINGS.model) if Path(SETTINGS.model).is_dir()
              else bentoml.models.BentoModel(SETTINGS.model))


def _model_dir(model: Any) -> Path:
    return Path(model.path) if hasattr(model, "path") else Path(model)


@bentoml.service(name="sota_inference", workers=1, threads=1, traffic={"timeout": 120})
class Inference:
    model = MODEL

    def __init__(self) -> None:
        package = open_package(_model_dir(self.model))
        self.runtime = load_runtime(package, SETTINGS.backend, device=SETTINGS.device,
                                    intra_op_threads=SETTINGS.threads)
        # Warm up at the largest batch shapes so readiness means "fast", not just "loaded".
        self.runtime.warmup(SETTINGS.max_batch_size)
        if package.card.tta.five_crop:
            self.runtime.warmup(SETTINGS.max_batch_size_tta, N_FIVE_CROPS)

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch_size,
                 max_latency_ms=SETTINGS.max_latency_ms)
    def plain(self, crops: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) uint8 -> (N, C) probabilities."""
        return self.runtime.predict(crops)

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch_size_tta,
                 max_latency_ms=SETTINGS.max_latency_ms)
    def five_crop(self, crops: np.ndarray) -> np.ndarray:
        """(N, 5, 3, H, W) uint8 -> (N, C): all 5N crops in one device batch, averaged there."""
        return self.runtime.predict(crops.reshape(-1, *crops.shape[2:]), crops_per_image=crops.shape[1])


@bentoml.service(name="sota_serve", workers=SETTINGS.api_workers, traffic={"timeout": 120})
class Classifier:
    inference = bentoml.depends(Inference)
    model = MODEL

    def __init__(self) -> None:
        self.model_card = open_package(_model_dir(self.model)).card
        limits = DecodeLimits(max_bytes=SETTINGS.max_image_bytes, max_pixels=SETTINGS.max_pixels)
        pre = Preprocessor.from_card(self.model_card, limits=limits, jpeg_draft=SETTINGS.jpeg_draft)
        chunk = {"none": SETTINGS.max_batch_size, "five_crop": SETTINGS.max_batch_size_tta}
        self.handler = RequestHandler(self.model_card, pre, deadline_s=SETTINGS.deadline_s, chunk=chunk)
        self.ready = True

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.on_shutdown
    def _draining(self) -> None:
        self.ready = False

    def _run(self, tta: str):
        return self.inference.to_async.five_crop if tta == "five_crop" else self.inference.to_async.plain

    @bentoml.api(route="/classify")
    async def classify(self, image: Path, tta: str = "none", top_k: int = 5) -> ClassifyResponse:
        started = time.monotonic()
        tta, k = self.handler.params(tta, top_k)
        try:
            crops = await self.handler.crops(image, tta)
        except ImageError as e:
            raise http_error(e) from e
        probs = await self.handler.infer(crops, self._run(tta), started)
        return ClassifyResponse(model=self.model_card.tag, tta=tta, predictions=self.handler.rank(probs[0], k))

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, images: list[Path], tta: str = "none", top_k: int = 5) -> BatchResponse:
        started = time.monotonic()
        tta, k = self.handler.params(tta, top_k)
        results = await self.handler.batch(images, tta, k, self._run(tta), started)
        return BatchResponse(model=self.model_card.tag, tta=tta, results=results)

    @bentoml.api(route="/card")
    def card(self) -> dict[str, Any]:
        return self.model_card.to_dict()


Classifier.add_asgi_middleware(
    RequestGuard,
    file_fields={"/classify": ["image"], "/classify_batch": ["images"]},
    max_body_bytes=SETTINGS.max_body_bytes,
    max_in_flight=SETTINGS.max_in_flight,
    max_files=SETTINGS.max_batch_images,
)
