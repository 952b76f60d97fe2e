"""``bentoml serve``: the ``sota_serve`` service, a thin front end over sota_serve.serving.

Each worker process loads the models (one package, or several: sota_serve/serving/models.py)
and runs the serving pipeline: uploads decoded on a thread pool, the crops of concurrent
requests batched onto the model threads, admission control shedding at the door with 503 +
Retry-After when the queue cannot drain in time. The front door (sota_serve/http/front_door.py)
enforces the limits and answers the image routes directly.
"""

from __future__ import annotations

import logging
from typing import Any

import bentoml
from starlette.middleware.cors import CORSMiddleware

from bento.config import (
    checked_package,
    declare_models,
    explain_port_in_use,
    settings_and_models,
    stored,
)
from bento.declarations import Declared
from bento.grpc_port import GrpcPort
from bento.metrics import count_shed, count_tta, model_memory, observe_batch
from sota_serve.contract.requests import FILE_FIELDS
from sota_serve.explain.occlusion import Explanation
from sota_serve.http.front_door import TICKET, FrontDoor
from sota_serve.http.limits import Limits
from sota_serve.http.oip import INFER_PATH, OpenInference
from sota_serve.http.openapi import document
from sota_serve.http.routes import Routes
from sota_serve.http.schemas import BatchResponse, ClassifyResponse
from sota_serve.oip.model import ServedModels
from sota_serve.serving.admission import Admission
from sota_serve.serving.models import Models

# Under BentoML's logger, so that its log configuration (INFO on the console) applies.
log = logging.getLogger("bentoml.sota_serve")

SETTINGS, PLAN, ENTRIES, DECLARED = settings_and_models()  # exits with one line if a model is wrong
explain_port_in_use()
ROUTES = Routes()
# One per worker process (each imports this module): the front door and the pipelines share it.
ADMISSION = Admission(max_wait_s=SETTINGS.max_wait_s, max_in_flight=SETTINGS.max_in_flight,
                      decode_threads=PLAN.decode_threads, model_threads=PLAN.model_threads, on_shed=count_shed)
GRPC = GrpcPort(SETTINGS, ADMISSION)  # SOTA_SERVE_GRPC_PORT: every worker serves it once its models are loaded
CLASSIFY, CLASSIFY_BATCH, EXPLAIN = (Declared(path, ROUTES) for path in ("/classify", "/classify_batch", "/explain"))


class SotaServe:
    def __init__(self) -> None:
        self.ready = False
        self.models = Models.serving(SETTINGS, PLAN, ADMISSION, opener=lambda e: checked_package(e, SETTINGS, PLAN),
                                     observer=observe_batch, on_tta=count_tta, on_memory=model_memory,
                                     resolve=stored)
        self.models.load_all(ENTRIES)
        oip = OpenInference(ServedModels(self.models, backend=SETTINGS.backend, max_images=SETTINGS.max_batch_images,
                                         ready=self.__is_ready__))
        default = self.models.default.pipeline
        ROUTES.bind(self.models, document(default.card, SETTINGS, self.models.names()), oip)
        self.ready = True
        log.info("ready: serving %s on %s, %s, decode %s (%s)", self.models, PLAN.device, default.precision,
                 default.decode, PLAN)

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.on_startup
    async def _start(self) -> None:
        self.models.follow(SETTINGS.model_poll_s)
        await GRPC.start(ROUTES.oip)

    @bentoml.on_shutdown
    async def _draining(self) -> None:
        self.ready = False
        await GRPC.stop()

    # Over HTTP the front door answers these routes; the declarations, made from the same
    # request models, serve BentoML's clients their schema and in-process calls.
    @bentoml.api(route="/classify", input_spec=CLASSIFY.spec)
    async def classify(self, **fields: Any) -> ClassifyResponse:
        return await CLASSIFY.answer(fields, TICKET.get())

    @bentoml.api(route="/classify_batch", input_spec=CLASSIFY_BATCH.spec)
    async def classify_batch(self, **fields: Any) -> BatchResponse:
        return await CLASSIFY_BATCH.answer(fields, TICKET.get())

    @bentoml.api(route="/explain", input_spec=EXPLAIN.spec)
    async def explain(self, **fields: Any) -> Explanation:
        return await EXPLAIN.answer(fields, TICKET.get())

    @bentoml.api(route="/card")
    def card(self) -> dict[str, Any]:
        return self.models.default.card.to_dict()


declare_models(SotaServe, DECLARED)
# Per-request overheads measured on 2 cores (demo model, 32 clients), both settings, off by
# default: the access log ~10 % of throughput; OpenTelemetry spans on the image routes ~15 %,
# although BentoML's default sample rate (0) records none of them: the OIP's infer too.
SotaServe = bentoml.service(  # type: ignore[misc]
    name="sota_serve", workers=PLAN.workers, traffic={"timeout": 120},
    logging={"access": {"enabled": SETTINGS.access_log}},
    **({} if SETTINGS.trace_requests else {"tracing": {"excluded_urls": [*FILE_FIELDS, INFER_PATH]}}))(SotaServe)

if SETTINGS.cors_origins:  # outside the front door, so that its answers carry the headers too
    SotaServe.add_asgi_middleware(CORSMiddleware, allow_origins=SETTINGS.cors_origins.split(","),
                                  allow_methods=["GET", "POST"], allow_headers=["*"])
SotaServe.add_asgi_middleware(
    FrontDoor, routes=ROUTES, admission=ADMISSION, hold_s=SETTINGS.admission_hold_s,
    limits=Limits(max_body_bytes=SETTINGS.max_body_bytes, body_timeout_s=SETTINGS.deadline_s,
                  max_files=SETTINGS.max_batch_images),
)
