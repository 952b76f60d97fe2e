"""``bentoml serve``: the ``sota_serve`` service, a thin front end over sota_serve.serving.

Each worker process loads the model and runs the serving pipeline: uploads decoded on a thread
pool, the crops of concurrent requests batched onto the model threads, admission control
shedding at the door with 503 + Retry-After when the queue cannot drain in time. The front
door (sota_serve/http/front_door.py) enforces the limits and answers the image routes directly.
"""

from __future__ import annotations

import logging
from typing import Any

import bentoml
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from bento.config import explain_port_in_use, settings_and_package
from bento.grpc_port import GrpcPort
from bento.metrics import count_shed, count_tta, observe_batch
from bento.openapi import describe
from bento.upload import Upload
from sota_serve.explain.occlusion import DEFAULT_GRID, Explanation
from sota_serve.http.errors import Answer, answered
from sota_serve.http.front_door import TICKET, FrontDoor
from sota_serve.http.limits import Limits
from sota_serve.http.oip import OpenInference
from sota_serve.http.routes import FILE_FIELDS, Routes
from sota_serve.http.schemas import BatchResponse, ClassifyResponse
from sota_serve.serving.admission import Admission
from sota_serve.serving.fallback import FallbackAsk
from sota_serve.serving.pipeline import Pipeline

# Under BentoML's logger, so that its log configuration (INFO on the console) applies.
log = logging.getLogger("bentoml.sota_serve")

SETTINGS, PLAN, PACKAGE, MODEL = settings_and_package()  # exits with one line if the model is wrong
explain_port_in_use()
ROUTES = Routes()
# One per worker process (each imports this module): the front door and the pipeline share it.
ADMISSION = Admission(max_wait_s=SETTINGS.max_wait_s, max_in_flight=SETTINGS.max_in_flight,
                      decode_threads=PLAN.decode_threads, model_threads=PLAN.model_threads, on_shed=count_shed)
GRPC = GrpcPort(SETTINGS, ADMISSION)  # SOTA_SERVE_GRPC_PORT: every worker serves it once its model is loaded


def _response(answer: Answer) -> Response:
    """An error answer as BentoML returns it from an API method."""
    status, headers, body = answer
    return Response(body, status_code=status, headers=headers, media_type="application/json")


# Per-request overheads measured on 2 cores (demo model, 32 clients), both settings, off by
# default: the access log ~10 % of throughput; OpenTelemetry spans on the image routes ~15 %,
# although BentoML's default sample rate (0) records none of them.
@bentoml.service(name="sota_serve", workers=PLAN.workers, traffic={"timeout": 120},
                 logging={"access": {"enabled": SETTINGS.access_log}},
                 **({} if SETTINGS.trace_requests else {"tracing": {"excluded_urls": list(FILE_FIELDS)}}))
class SotaServe:
    model = MODEL

    def __init__(self) -> None:
        self.ready = False
        pipeline = Pipeline.build(PACKAGE, SETTINGS, PLAN, ADMISSION, observer=observe_batch, on_tta=count_tta)
        oip = OpenInference(pipeline, backend=SETTINGS.backend, max_images=SETTINGS.max_batch_images,
                            ready=self.__is_ready__)
        ROUTES.bind(pipeline, describe(SotaServe.openapi_spec.asdict(), pipeline.card,
                                       max_batch_images=SETTINGS.max_batch_images, tta_fallback=SETTINGS.tta_fallback,
                                       tta_budget_s=SETTINGS.budget_s(), tta_budget_strict=SETTINGS.tta_budget_strict), oip)
        self.ready = True
        log.info("ready: serving %s on %s, %s, decode %s (%s)", pipeline.card.tag, PLAN.device,
                 pipeline.precision, pipeline.decode, PLAN)

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.on_startup
    async def _serve_grpc(self) -> None:
        await GRPC.start(ROUTES.oip)

    @bentoml.on_shutdown
    async def _draining(self) -> None:
        self.ready = False
        await GRPC.stop()

    # Over HTTP the front door answers these routes with the same Routes methods; the
    # declarations are the contract: OpenAPI schema, BentoML clients, in-process calls.
    @bentoml.api(route="/classify")
    async def classify(self, image: Upload, tta: str | None = None, top_k: int = 5, tta_fallback: bool | None = None,
                       tta_budget_s: float | None = None, tta_budget_strict: bool | None = None) -> ClassifyResponse:
        fallback = FallbackAsk.parse(tta_fallback, tta_budget_s, tta_budget_strict)
        work = ROUTES.classify(image.data, tta, top_k, TICKET.get(), fallback)
        return await answered(work, render=_response)  # type: ignore[arg-type]

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, images: list[Upload], tta: str | None = None, top_k: int = 5,
                             tta_fallback: bool | None = None, tta_budget_s: float | None = None,
                             tta_budget_strict: bool | None = None) -> BatchResponse:
        fallback = FallbackAsk.parse(tta_fallback, tta_budget_s, tta_budget_strict)
        work = ROUTES.classify_batch([u.data for u in images], tta, top_k, TICKET.get(), fallback)
        return await answered(work, render=_response)  # type: ignore[arg-type]

    @bentoml.api(route="/explain")
    async def explain(self, image: Upload, label: str | None = None, grid: int = DEFAULT_GRID) -> Explanation:
        work = ROUTES.explain(image.data, label, grid, TICKET.get())
        return await answered(work, render=_response)  # type: ignore[arg-type]

    @bentoml.api(route="/card")
    def card(self) -> dict[str, Any]:
        return PACKAGE.card.to_dict()


if SETTINGS.cors_origins:  # outside the front door, so that its answers carry the headers too
    SotaServe.add_asgi_middleware(CORSMiddleware, allow_origins=SETTINGS.cors_origins.split(","),
                                  allow_methods=["GET", "POST"], allow_headers=["*"])
SotaServe.add_asgi_middleware(
    FrontDoor, routes=ROUTES, admission=ADMISSION, hold_s=SETTINGS.admission_hold_s,
    limits=Limits(max_body_bytes=SETTINGS.max_body_bytes, body_timeout_s=SETTINGS.deadline_s,
                  max_files=SETTINGS.max_batch_images),
)
