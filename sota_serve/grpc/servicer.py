"""``inference.GRPCInferenceService``: the Open Inference Protocol's six calls over the served
models (sota_serve/oip/model.py), answered as REST answers them (sota_serve/http/oip.py).

ModelInfer goes through the serving core as REST's ``infer`` does: admission (held at the
door up to SOTA_SERVE_ADMISSION_HOLD_S, then UNAVAILABLE with ``retry-after``), the request
read on the decode pool, the pipeline's batcher, TTA fallback ladder and decode limits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from sota_serve.errors import OverloadedError, SotaServeError
from sota_serve.grpc.codec import from_dict, infer_response, read_infer
from sota_serve.grpc.protos import message
from sota_serve.grpc.status import Status
from sota_serve.oip.messages import server_metadata
from sota_serve.oip.model import ServedModels
from sota_serve.serving.admission import Admission

#: a call's handler: (request message, grpc.aio.ServicerContext) -> response message
Handler = Callable[[Any, Any], Awaitable[Any]]


class InferenceServicer:
    def __init__(self, models: ServedModels, admission: Admission, *, hold_s: float) -> None:
        self.models, self.admission, self.hold_s = models, admission, hold_s

    def handlers(self) -> dict[str, Handler]:
        """Each call of the service by its name in the .proto."""
        return {"ServerLive": self.server_live, "ServerReady": self.server_ready, "ModelReady": self.model_ready,
                "ServerMetadata": self.server_metadata, "ModelMetadata": self.model_metadata,
                "ModelInfer": self.model_infer}

    async def respond(self, method: str, request: Any) -> Any:
        """The response to a call of ``method``, or the :class:`Status` of its typed error (for
        a front end whose gRPC server runs in another process, as Ray Serve's proxy does)."""
        try:
            return await self.handlers()[method](request, None)
        except SotaServeError as e:
            return Status.of(e)

    async def server_live(self, request: Any, context: Any) -> Any:
        return _ServerLive(live=True)

    async def server_ready(self, request: Any, context: Any) -> Any:
        return _ServerReady(ready=self.models.ready())

    async def model_ready(self, request: Any, context: Any) -> Any:
        self.models.get(request.name, request.version or None)
        return _ModelReady(ready=self.models.ready())

    async def server_metadata(self, request: Any, context: Any) -> Any:
        return from_dict(server_metadata(), _ServerMetadata)

    async def model_metadata(self, request: Any, context: Any) -> Any:
        return from_dict(self.models.get(request.name, request.version or None).metadata(), _ModelMetadata)

    async def model_infer(self, request: Any, context: Any) -> Any:
        self.models.get(request.model_name, request.model_version or None)  # NOT_FOUND before admission
        try:
            ticket = await self.admission.wait_enter(request.ByteSize(), self.hold_s)
        except OverloadedError as e:  # in REST's words for a refusal at the door (http.errors.retry_later)
            raise OverloadedError(f"{e}; retry after {e.retry_after_s}s", retry_after_s=e.retry_after_s) from None
        try:
            with self.models.use(request.model_name, request.model_version or None) as model:
                read = partial(read_infer, request, model.card, max_images=model.max_images)
                # Raw contents are sliced, at most max_images elements: on the loop. Typed contents
                # are a Python object per value (bounded by MAX_VALUES, not free): on the decode pool.
                inference = read() if request.raw_input_contents else await asyncio.get_running_loop(
                ).run_in_executor(model.pipeline.decode_pool, read)
                scores = await model.infer(inference, ticket)
                return infer_response(inference, scores, model.card, name=model.name, version=model.version)
        finally:
            self.admission.leave(ticket)


_ServerLive = message("inference.ServerLiveResponse")
_ServerReady = message("inference.ServerReadyResponse")
_ModelReady = message("inference.ModelReadyResponse")
_ServerMetadata = message("inference.ServerMetadataResponse")
_ModelMetadata = message("inference.ModelMetadataResponse")
