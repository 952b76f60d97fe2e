"""``bentoml serve``: one service that owns the model. Wiring only; logic is in handlers.py.

Each worker process decodes uploads on a thread pool, batches the crops of concurrent
requests in-process (sota_serve.batcher) and runs them on the device: no second service, no
pickled crops between processes. Admission control (sota_serve.admission) sheds at the door
with 503 + Retry-After when the queue cannot drain within SOTA_SERVE_MAX_WAIT_S.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

from bento.guard import TICKET, RequestGuard
from bento.handlers import RequestHandler, error_response
from bento.metrics import count_shed, observe_batch
from bento.openapi import describe
from bento.routes import DirectRoutes
from bento.schemas import BatchResponse, ClassifyResponse
from bento.settings import load_settings
from bento.upload import Upload
from sota_serve.admission import Admission
from sota_serve.batcher import DynamicBatcher
from sota_serve.constants import N_FIVE_CROPS
from sota_serve.decode import DecodeLimits
from sota_serve.device_preprocess import DevicePreprocessor
from sota_serve.errors import SotaServeError
from sota_serve.package import open_package
from sota_serve.preprocess import Preprocessor
from sota_serve.runtime import Runtime, load_runtime

# Under BentoML's logger, so that its log configuration (INFO on the console) applies.
log = logging.getLogger("bentoml.sota_serve")

SETTINGS = load_settings()
PLAN = SETTINGS.plan()
# A package directory is served as it is; anything else is a model-store tag, declared as a
# BentoModel so that `bentoml build` records it in the Bento.
MODEL: Any = (Path(SETTINGS.model) if Path(SETTINGS.model).is_dir()
              else bentoml.models.BentoModel(SETTINGS.model))
FILE_FIELDS = {"/classify": "image", "/classify_batch": "images"}
ROUTES = DirectRoutes(FILE_FIELDS)
# One per worker process (each imports this module): the guard and the handler share it.
ADMISSION = Admission(max_wait_s=SETTINGS.max_wait_s, max_in_flight=SETTINGS.max_in_flight,
                      decode_threads=PLAN.decode_threads, on_shed=count_shed)


def _seconds_per_crop(runtime: Runtime, batch_size: int) -> float:
    batch = np.zeros((batch_size, 3, runtime.card.input.height, runtime.card.input.width), dtype=np.uint8)
    started = time.perf_counter()
    runtime.predict(batch)
    return (time.perf_counter() - started) / batch_size


def _model_dir(model: Any) -> Path:
    return Path(model.path) if hasattr(model, "path") else Path(model)


# Per-request overheads measured on 2 cores (demo model, 32 clients), both settings, off by
# default: the access log ~10 % of throughput; OpenTelemetry spans on the image routes ~15 %,
# although BentoML's default sample rate (0) records none of them.
@bentoml.service(name="sota_serve", workers=PLAN.workers, traffic={"timeout": 120},
                 logging={"access": {"enabled": SETTINGS.access_log}},
                 **({} if SETTINGS.trace_requests else {"tracing": {"excluded_urls": list(FILE_FIELDS)}}))
class Classifier:
    model = MODEL

    def __init__(self) -> None:
        package = open_package(_model_dir(self.model))
        self.model_card = package.card
        runtime = load_runtime(package, SETTINGS.backend, device=PLAN.device, intra_op_threads=PLAN.threads)
        five_crop = package.card.tta.five_crop is not None
        max_crops = max(PLAN.max_batch_size, PLAN.max_batch_size_tta * N_FIVE_CROPS if five_crop else 0)
        # Warm up every batch shape the device will see, so readiness means "fast", not just
        # "loaded", and admission starts with a measured model cost instead of none.
        runtime.warmup(PLAN.max_batch_size)
        if five_crop:
            runtime.warmup(PLAN.max_batch_size_tta, N_FIVE_CROPS)
        ADMISSION.seconds_per_crop.add(_seconds_per_crop(runtime, PLAN.max_batch_size))
        self.batcher = DynamicBatcher(runtime, max_crops=max_crops, observer=observe_batch,
                                      seconds_per_crop=ADMISSION.seconds_per_crop)
        limits = DecodeLimits(max_bytes=SETTINGS.max_image_bytes, max_pixels=SETTINGS.max_pixels,
                              max_aspect_ratio=SETTINGS.max_aspect_ratio)
        pre = Preprocessor.from_card(package.card, limits=limits, jpeg_draft=SETTINGS.jpeg_draft)
        device_pre = DevicePreprocessor(pre, PLAN.device) if PLAN.decode == "torchvision" else None
        self.handler = RequestHandler(package.card, pre, self.batcher, ADMISSION, device_pre=device_pre,
                                      deadline_s=SETTINGS.deadline_s, decode_threads=PLAN.decode_threads)
        self.handler.calibrate()
        ROUTES.bind(self.handler, describe(Classifier.openapi_spec.asdict(), package.card,
                                           max_batch_images=SETTINGS.max_batch_images))
        self.ready = True
        log.info("ready: serving %s on %s (%s)", package.card.tag, PLAN.device, PLAN)

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.on_shutdown
    def _draining(self) -> None:
        self.ready = False

    # The two image routes are answered by bento.routes from the guard (same handler methods);
    # these declarations are the contract: OpenAPI schema, BentoML clients, in-process calls.
    @bentoml.api(route="/classify")
    async def classify(self, image: Upload, tta: str = "none", top_k: int = 5) -> ClassifyResponse:
        try:
            return await self.handler.classify(image.data, tta, top_k, TICKET.get())
        except SotaServeError as e:
            return error_response(e)  # type: ignore[return-value]

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, images: list[Upload], tta: str = "none", top_k: int = 5) -> BatchResponse:
        try:
            return await self.handler.classify_batch([u.data for u in images], tta, top_k, TICKET.get())
        except SotaServeError as e:
            return error_response(e)  # type: ignore[return-value]

    @bentoml.api(route="/card")
    def card(self) -> dict[str, Any]:
        return self.model_card.to_dict()


Classifier.add_asgi_middleware(
    RequestGuard,
    file_fields={path: [field] for path, field in FILE_FIELDS.items()},
    routes=ROUTES,
    hold_s=SETTINGS.admission_hold_s,
    max_body_bytes=SETTINGS.max_body_bytes,
    max_files=SETTINGS.max_batch_images,
    admission=ADMISSION,
)
