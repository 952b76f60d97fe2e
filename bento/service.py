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
from bento.declarations import Declared
from bento.grpc_port import GrpcPort
from bento.metrics import count_shed, count_tta, observe_batch
from sota_serve.contract.requests import FILE_FIELDS
from sota_serve.explain.occlusion import Explanation
from sota_serve.http.errors import Answer, answered
from sota_serve.http.front_door import TICKET, FrontDoor
from sota_serve.http.limits import Limits
from sota_serve.http.oip import OpenInference
from sota_serve.http.openapi import document
from sota_serve.http.routes import Routes
from sota_serve.http.schemas import BatchResponse, ClassifyResponse
from sota_serve.serving.admission import Admission
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
CLASSIFY, CLASSIFY_BATCH, EXPLAIN = (Declared(path) for path in ("/classify", "/classify_batch", "/explain"))


def _response(answer: Answer) -> Response:
    """An error answer as BentoML returns it from an API method."""
    status, headers, body = answer
    return Response(body, status_code=status, headers=headers, media_type="application/json")


async def _answer(route: Declared, fields: dict[str, Any]) -> Any:
    """An API method's answer: the route's, or its typed error as BentoML returns it."""
    async def work() -> Any:
        return await ROUTES.answer(route.request(fields), TICKET.get())
    return await answered(work(), render=_response)


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
        ROUTES.bind(pipeline, document(pipeline.card, SETTINGS), oip)
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

    # Over HTTP the front door answers these routes; the declarations, made from the same
    # request models, serve BentoML's clients their schema and in-process calls.
    @bentoml.api(route="/classify", input_spec=CLASSIFY.spec)
    async def classify(self, **fields: Any) -> ClassifyResponse:
        return await _answer(CLASSIFY, fields)

    @bentoml.api(route="/classify_batch", input_spec=CLASSIFY_BATCH.spec)
    async def classify_batch(self, **fields: Any) -> BatchResponse:
        return await _answer(CLASSIFY_BATCH, fields)

    @bentoml.api(route="/explain", input_spec=EXPLAIN.spec)
    async def explain(self, **fields: Any) -> Explanation:
        return await _answer(EXPLAIN, fields)

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
