"""``bentoml serve``: the ``sota_serve`` service. Wiring only; logic is in handlers.py.

By default (a CPU, or one worker) each worker process decodes uploads on a thread pool,
batches the crops of concurrent requests in-process (sota_serve.batcher) and runs them on
the device (bento/pipeline.py). With a GPU and several workers, one engine process owns the
model and the device, and the workers send it the uploads (bento/engine.py). Admission
control (sota_serve.admission) sheds at the door with 503 + Retry-After when the queue
cannot drain within SOTA_SERVE_MAX_WAIT_S.
"""

from __future__ import annotations

import logging
from typing import Any

import bentoml
from bentoml._internal.configuration.containers import BentoMLContainer

from bento.config import MODEL, PLAN, SETTINGS, model_dir
from bento.engine import Engine, EngineClient
from bento.guard import TICKET, RequestGuard
from bento.handlers import RequestHandler, error_response
from bento.listen import arbiter_binds_reuseport, take_own_socket
from bento.metrics import count_shed, observe_batch
from bento.oip import OpenInference
from bento.openapi import describe
from bento.pipeline import LocalPipeline
from bento.routes import DirectRoutes
from bento.schemas import BatchResponse, ClassifyResponse
from bento.stack import install as place_guard
from bento.upload import Upload
from sota_serve.admission import Admission
from sota_serve.errors import SotaServeError
from sota_serve.package import open_package
from sota_serve.preprocess import Preprocessor

# Under BentoML's logger, so that its log configuration (INFO on the console) applies.
log = logging.getLogger("bentoml.sota_serve")

if PLAN.workers > 1 and SETTINGS.reuse_port:
    # In `bentoml serve`: bind the API socket SO_REUSEPORT; in worker 2..N: a socket of its own.
    arbiter_binds_reuseport()
    take_own_socket()

FILE_FIELDS = {"/classify": "image", "/classify_batch": "images"}
ROUTES = DirectRoutes(FILE_FIELDS)
# One per worker process (each imports this module): the guard and the handler share it.
ADMISSION = Admission(max_wait_s=SETTINGS.max_wait_s, max_in_flight=SETTINGS.max_in_flight,
                      decode_threads=PLAN.decode_threads, model_threads=PLAN.model_threads, on_shed=count_shed)


# Per-request overheads measured on 2 cores (demo model, 32 clients), both settings, off by
# default: the access log ~10 % of throughput; OpenTelemetry spans on the image routes ~15 %,
# although BentoML's default sample rate (0) records none of them.
@bentoml.service(name="sota_serve", workers=PLAN.workers, traffic={"timeout": 120},
                 logging={"access": {"enabled": SETTINGS.access_log}},
                 **({} if SETTINGS.trace_requests else {"tracing": {"excluded_urls": list(FILE_FIELDS)}}))
class Classifier:
    model = MODEL
    if PLAN.engine:
        engine = bentoml.depends(Engine)

    def __init__(self) -> None:
        package = open_package(model_dir(self.model))
        self.model_card = package.card
        pipeline: LocalPipeline | EngineClient
        if PLAN.engine:  # this worker only speaks HTTP; the engine process runs the model
            url = BentoMLContainer.remote_runner_mapping.get().get(Engine.name)
            if url is None:
                raise SotaServeError("SOTA_SERVE_ENGINE=on needs `bentoml serve` to start the engine service")
            pipeline = EngineClient(url, ADMISSION, workers=PLAN.workers)
        else:
            pipeline = LocalPipeline.build(package, SETTINGS, PLAN, ADMISSION, observer=observe_batch)
        pre = Preprocessor.from_card(package.card)  # checks request parameters against the card
        self.handler = RequestHandler(package.card, pre, pipeline, deadline_s=SETTINGS.deadline_s)
        oip = OpenInference(self.handler, backend=SETTINGS.backend, max_images=SETTINGS.max_batch_images,
                            ready=self.__is_ready__)
        ROUTES.bind(self.handler, describe(Classifier.openapi_spec.asdict(), package.card,
                                           max_batch_images=SETTINGS.max_batch_images), oip)
        self.ready = True
        where = ("the engine process" if PLAN.engine else  # type: ignore[union-attr]
                 f"this worker, {pipeline.precision}, decode {pipeline.decode}")
        log.info("ready: serving %s on %s, model in %s (%s)", package.card.tag, PLAN.device, where, PLAN)

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.on_shutdown
    def _draining(self) -> None:
        self.ready = False

    # The two image routes are answered by bento.routes from the guard (same handler methods);
    # these declarations are the contract: OpenAPI schema, BentoML clients, in-process calls.
    @bentoml.api(route="/classify")
    async def classify(self, image: Upload, tta: str | None = None, top_k: int = 5) -> ClassifyResponse:
        try:
            return await self.handler.classify(image.data, tta, top_k, TICKET.get())
        except SotaServeError as e:
            return error_response(e)  # type: ignore[return-value]

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, images: list[Upload], tta: str | None = None, top_k: int = 5) -> BatchResponse:
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
    body_timeout_s=SETTINGS.deadline_s,
    max_body_bytes=SETTINGS.max_body_bytes,
    max_files=SETTINGS.max_batch_images,
    admission=ADMISSION,
)
# Outside BentoML's traffic timeout (the image routes have their own deadline) and, unless
# traced, OpenTelemetry; inside its metrics, access log and CORS (bento/stack.py).
place_guard(RequestGuard, traced=SETTINGS.trace_requests)
