"""One process owns the model and the GPU; the API workers send it their uploads.

Processes that share one GPU take turns on it (time slicing): measured on an H100 with
xresnet50, 8 workers that each ran their own ORT session served 1,064 req/s while one
process alone runs the model at ~5,000 img/s. So with a CUDA device and several workers
(``SOTA_SERVE_ENGINE``, auto), the workers only speak HTTP, and the ``sota_engine`` service
(one worker, started by BentoML as a dependency) decodes every upload on the GPU in batches
and runs the model with the in-process batcher, across all workers' requests.

Between them: BentoML's Unix socket, carrying the raw uploads and float32 probabilities
(bento/engine_protocol.py) on a long-lived aiohttp session of our own: BentoML's dependency
client pickles payloads and recycles its session under calls in flight.
Requests that queue in a worker while its calls are out go together in its next call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import bentoml
import numpy as np
from bentoml._internal.utils.uri import uri_to_path
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bento.config import MODEL, PLAN, SETTINGS, model_dir
from bento.engine_protocol import (
    decode_request,
    decode_response,
    encode_pixels_request,
    encode_request,
    encode_response,
)
from bento.metrics import observe_batch
from bento.pipeline import LocalPipeline, Results
from sota_serve.admission import Admission, Ticket
from sota_serve.errors import (
    MalformedRequestError,
    OverloadedError,
    RuntimeBackendError,
    SotaServeError,
)
from sota_serve.package import open_package

log = logging.getLogger("bentoml.sota_serve")
ENGINE_PATH = "/engine/infer"
_INSTANCE: dict[str, Engine] = {}  # this process's engine, for the ASGI route


async def _infer(request: Request) -> Response:
    body = await _INSTANCE["engine"].infer(await request.body())
    return Response(body, media_type="application/octet-stream")


@bentoml.service(name="sota_engine", workers=1, traffic={"timeout": 120},
                 logging={"access": {"enabled": SETTINGS.access_log}})
class Engine:
    model = MODEL

    def __init__(self) -> None:
        package = open_package(model_dir(self.model))
        self.classes = package.card.num_classes
        # The workers admit requests; this one only tracks the costs it measures.
        admission = Admission(max_wait_s=float("inf"), max_in_flight=1 << 30, decode_threads=PLAN.decode_threads,
                              model_threads=PLAN.model_threads)
        self.pipeline = LocalPipeline.build(package, SETTINGS, PLAN, admission, observer=observe_batch)
        _INSTANCE["engine"] = self
        log.info("engine ready: %s on %s, %s, decode %s", package.card.tag, PLAN.device,
                 self.pipeline.precision, self.pipeline.decode)

    async def infer(self, body: bytes) -> bytes:
        try:
            req = decode_request(body)
        except MalformedRequestError as e:
            return encode_response(None, self.classes, seconds_per_crop=0.0, overloaded=OverloadedError(str(e)))
        spc = self.pipeline.batcher.seconds_per_crop.value or 0.0
        try:
            deadline = time.monotonic() + req.timeout_s
            results = (await self.pipeline.pixels(req.pixels, Ticket(), deadline) if req.pixels is not None
                       else await self.pipeline.probabilities(req.images, req.tta, req.k, Ticket(), deadline))
        except OverloadedError as e:
            return encode_response(None, self.classes, seconds_per_crop=spc, overloaded=e)
        return encode_response(results, self.classes, seconds_per_crop=spc)


Engine.mount_asgi_app(Starlette(routes=[Route("/infer", _infer, methods=["POST"])]), path="/engine")


@dataclass
class _Pending:
    images: Sequence[bytes]
    tta: str
    k: int
    deadline: float
    future: asyncio.Future[Results]
    pixels: np.ndarray | None = None  # instead of images: preprocessed crops

    @property
    def count(self) -> int:
        return len(self.pixels) if self.pixels is not None else len(self.images)

    def joins(self, head: _Pending) -> bool:
        """Whether this request can go in the same engine call as ``head``."""
        return self.tta == head.tta and (self.pixels is None) == (head.pixels is None)


class EngineClient:
    """An API worker's side: ``probabilities`` as :class:`LocalPipeline` answers it."""

    def __init__(self, url: str, admission: Admission, *, workers: int, max_images: int = 128,
                 max_calls: int = 4) -> None:
        self.admission, self.workers = admission, workers
        self.max_images, self.max_calls = max_images, max_calls
        # BentoML names a Unix socket file://...; TCP (BENTOML_NO_UDS) tcp://host:port.
        self._socket = uri_to_path(url) if url.startswith(("file://", "unix://")) else None
        self._url = f"http://sota-engine{ENGINE_PATH}" if self._socket else url.replace("tcp://", "http://") + ENGINE_PATH
        self._queue: deque[_Pending] = deque()
        self._calls: set[asyncio.Task[None]] = set()  # the loop keeps only weak references
        self._session: aiohttp.ClientSession | None = None

    async def probabilities(self, images: Sequence[bytes], tta: str, k: int, ticket: Ticket,
                            deadline: float) -> Results:
        self.admission.charge(ticket, len(images) * k)
        return await self._call(_Pending(images, tta, k, deadline, asyncio.get_running_loop().create_future()),
                                ticket)

    async def pixels(self, crops: np.ndarray, ticket: Ticket, deadline: float) -> Results:
        self.admission.charge(ticket, len(crops))
        return await self._call(_Pending([], "none", 1, deadline, asyncio.get_running_loop().create_future(),
                                         crops), ticket)

    async def _call(self, item: _Pending, ticket: Ticket) -> Results:
        self._queue.append(item)
        self._pump()
        try:
            return await item.future
        finally:
            self.admission.decoded(ticket)
            self.admission.computed(ticket)

    def _pump(self) -> None:
        while self._queue and len(self._calls) < self.max_calls:
            head = self._queue.popleft()
            batch, images = [head], head.count
            while self._queue and self._queue[0].joins(head) and images + self._queue[0].count <= self.max_images:
                batch.append(self._queue.popleft())
                images += batch[-1].count
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._calls.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._calls.discard(task)
        self._pump()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector: Any = (aiohttp.UnixConnector(path=self._socket, limit=0) if self._socket
                              else aiohttp.TCPConnector(limit=0))
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def _send(self, batch: list[_Pending]) -> None:
        head = batch[0]
        try:
            timeout_s = max(0.0, min(p.deadline for p in batch) - time.monotonic())
            body = (encode_pixels_request(np.concatenate([p.pixels for p in batch]), timeout_s)  # type: ignore[misc]
                    if head.pixels is not None
                    else encode_request([img for p in batch for img in p.images], head.tta, head.k, timeout_s))
            async with self._client().post(self._url, data=body,
                                           headers={"Content-Type": "application/octet-stream"}) as response:
                payload = await response.read()
                if response.status != 200:
                    raise RuntimeBackendError(f"the engine answered HTTP {response.status}: {payload[:200]!r}")
            results, seconds_per_crop = decode_response(payload)
            # The device is shared by every worker: this worker's queue drains at its share.
            self.admission.seconds_per_crop.add(seconds_per_crop * self.workers)
            at = 0
            for p in batch:
                if not p.future.done():
                    p.future.set_result(results[at : at + p.count])
                at += p.count
        except (SotaServeError, aiohttp.ClientError, OSError) as e:
            error = e if isinstance(e, SotaServeError) else OverloadedError(
                f"the model engine process did not answer ({type(e).__name__}: {e}); it may be restarting")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(error)
