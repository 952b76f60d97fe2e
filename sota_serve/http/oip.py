"""The Open Inference Protocol v2 routes (KServe v2, Triton's HTTP API), beside the service's own.

``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``,
``.../ready`` and ``POST .../infer`` for every model the server serves (sota_serve/serving/models.py);
and the repository extension: ``POST /v2/repository/index``, and ``POST
/v2/repository/models/{name}/load`` and ``/unload`` where SOTA_SERVE_MODEL_CONTROL=explicit (403
otherwise), as Triton and KServe name them. Requests go through the same front door (body
limit, admission), the same handler and pipeline (batching across requests and routes) and the
same decode limits as ``/classify``.
The messages are sota_serve/oip/messages.py's in the REST encoding of sota_serve/http/oip_codec.py,
answered by sota_serve/oip/model.py's model, as over gRPC (sota_serve/grpc/). Errors are ``{"error": message}``: 400 for anything
wrong in the request (v2 has no 422), 404 for another model's name, 413, 415 and 503 as on
the other routes.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from functools import partial

from sota_serve.errors import (
    BadRequestError,
    MalformedRequestError,
    ModelControlError,
    ModelNotFoundError,
    SotaServeError,
)
from sota_serve.http.errors import Answer, error_answer, json_body
from sota_serve.http.oip_codec import HEADER_LENGTH, encode_infer, parse_infer
from sota_serve.oip.messages import server_metadata
from sota_serve.oip.model import ServedModel, ServedModels
from sota_serve.serving.admission import Ticket

#: /v2/models/{name}[/versions/{version}][/ready | /infer]
_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/(ready|infer))?$")
#: what every infer path ends with (a pattern of BentoML's tracing exclusions)
INFER_PATH = "/infer"
#: /v2/repository/index, /v2/repository/models/{name}/(load | unload)
_REPOSITORY_PATH = re.compile(r"^/v2/repository/(?:(index)|models/([^/]+)/(load|unload))$")


def _json(status: int, body: object) -> Answer:
    return status, {}, json_body(body)


_LIVE = _json(200, {"live": True})  # the process answers: live, whether or not the model is loaded


class OpenInference:
    def __init__(self, models: ServedModels) -> None:
        self.models, self.ready = models, models.ready

    @staticmethod
    def is_infer(path: str) -> bool:
        match = _MODEL_PATH.match(path)
        return match is not None and match.group(3) == "infer"

    @staticmethod
    def is_repository(path: str) -> bool:
        return _REPOSITORY_PATH.match(path) is not None

    @staticmethod
    def loading(path: str) -> Answer:
        """What ``GET path`` answers while the model is still loading: live, not ready."""
        if path == "/v2/health/live":
            return _LIVE
        return _json(503, {"ready": False, "error": "the model is loading"})

    def get(self, path: str) -> Answer | None:
        """The answer to ``GET path`` under ``/v2``, or None when the path is not one of these."""
        if path in ("/v2", "/v2/"):
            return _json(200, server_metadata())
        if path == "/v2/health/live":
            return _LIVE
        if path == "/v2/health/ready":
            return self._readiness()
        match = _MODEL_PATH.match(path)
        if match is None:
            return None
        if match.group(3) == "infer":
            return 405, {"Allow": "POST"}, b'{"error": "infer takes POST"}'
        try:
            model = self.models.get(match.group(1), match.group(2))
        except ModelNotFoundError as e:
            return error_answer(e)
        if match.group(3) == "ready":
            return self._readiness()
        return _json(200, model.metadata())

    def _readiness(self) -> Answer:
        ready = self.ready()
        return _json(200 if ready else 503, {"ready": ready})

    async def infer(self, path: str, headers: Mapping[str, str], body: bytes, ticket: Ticket | None) -> Answer:
        match = _MODEL_PATH.match(path)
        assert match is not None, "OpenInference.infer on a path is_infer refused"
        try:
            with self.models.use(match.group(1), match.group(2)) as model:
                return await self._infer(model, headers, body, ticket)
        except BadRequestError as e:  # v2 has no 422: a parameter out of range is a bad request
            return error_answer(MalformedRequestError(str(e)))
        except SotaServeError as e:
            return error_answer(e)

    async def _infer(self, model: ServedModel, headers: Mapping[str, str], body: bytes,
                     ticket: Ticket | None) -> Answer:
        if headers.get("content-encoding", "identity") != "identity":
            raise _Unsupported(f"Content-Encoding {headers['content-encoding']!r} is not supported;"
                               " send the request uncompressed")
        length = headers.get(HEADER_LENGTH)
        if length is not None and not length.isdigit():
            raise MalformedRequestError(f"Inference-Header-Content-Length must be a number, got {length!r:.40}")
        # Off the event loop, as decoding is: parsing is bounded (MAX_JSON_VALUES) but not free.
        request = await asyncio.get_running_loop().run_in_executor(
            model.pipeline.decode_pool, partial(parse_infer, body, int(length) if length else None, model.card,
                                                max_images=model.max_images))
        scores = await model.infer(request, ticket)
        body, out_headers = encode_infer(request, scores, model.card, name=model.name, version=model.version)
        return 200, out_headers, body

    async def repository(self, path: str) -> Answer:
        """The repository extension's answer to ``POST path``: the index (every model the
        source holds, with its state), or a model loaded (warmed up, then swapped in) or
        unloaded; 403 unless SOTA_SERVE_MODEL_CONTROL=explicit."""
        match = _REPOSITORY_PATH.match(path)
        assert match is not None, "OpenInference.repository on a path is_repository refused"
        models = self.models.models
        if match.group(1) == "index":
            return _json(200, models.index())
        try:
            if not models.explicit:
                raise ModelControlError("loading and unloading models is off: `bentoml serve` allows it with"
                                        " SOTA_SERVE_MODEL_CONTROL=explicit; a Ray Serve cluster changes its"
                                        " models with a new deploy")
            if match.group(3) == "load":
                await models.load(match.group(2))
            else:
                await models.unload(match.group(2))
        except SotaServeError as e:
            return error_answer(e)
        return 200, {}, b""


class _Unsupported(SotaServeError):
    http_status = 415
