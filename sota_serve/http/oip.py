"""The Open Inference Protocol v2 routes (KServe v2, Triton's HTTP API), beside the service's own.

``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``,
``.../ready`` and ``POST .../infer``, where ``{name}`` is the card's name and ``{v}`` its
version. Requests go through the same front door (body limit, admission), the same handler and
pipeline (batching across requests and routes) and the same decode limits as ``/classify``.
The messages are sota_serve/oip/messages.py's in the REST encoding of sota_serve/http/oip_codec.py,
answered by sota_serve/oip/model.py's model, as over gRPC (sota_serve/grpc/). Errors are ``{"error": message}``: 400 for anything
wrong in the request (v2 has no 422), 404 for another model's name, 413, 415 and 503 as on
the other routes.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from functools import partial

from sota_serve.errors import BadRequestError, MalformedRequestError, SotaServeError
from sota_serve.http.errors import Answer, error_answer, json_body
from sota_serve.http.oip_codec import HEADER_LENGTH, encode_infer, parse_infer
from sota_serve.oip.messages import server_metadata
from sota_serve.oip.model import NotFoundError, ServedModel
from sota_serve.serving.admission import Ticket
from sota_serve.serving.pipeline import Pipeline

#: /v2/models/{name}[/versions/{version}][/ready | /infer]
_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/(ready|infer))?$")


def _json(status: int, body: object) -> Answer:
    return status, {}, json_body(body)


_LIVE = _json(200, {"live": True})  # the process answers: live, whether or not the model is loaded


class OpenInference:
    def __init__(self, pipeline: Pipeline, *, backend: str, max_images: int,
                 ready: Callable[[], bool]) -> None:
        self.model = ServedModel(pipeline, backend=backend, max_images=max_images, ready=ready)
        self.pipeline, self.card, self.max_images, self.ready = pipeline, pipeline.card, max_images, ready

    @staticmethod
    def is_infer(path: str) -> bool:
        match = _MODEL_PATH.match(path)
        return match is not None and match.group(3) == "infer"

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
            self.model.check(match.group(1), match.group(2))
        except NotFoundError as e:
            return error_answer(e)
        if match.group(3) == "ready":
            return self._readiness()
        return _json(200, self.model.metadata())

    def _readiness(self) -> Answer:
        ready = self.ready()
        return _json(200 if ready else 503, {"ready": ready})

    async def infer(self, path: str, headers: Mapping[str, str], body: bytes, ticket: Ticket | None) -> Answer:
        match = _MODEL_PATH.match(path)
        assert match is not None, "OpenInference.infer on a path is_infer refused"
        try:
            self.model.check(match.group(1), match.group(2))
            if headers.get("content-encoding", "identity") != "identity":
                raise _Unsupported(f"Content-Encoding {headers['content-encoding']!r} is not supported;"
                                   " send the request uncompressed")
            length = headers.get(HEADER_LENGTH)
            if length is not None and not length.isdigit():
                raise MalformedRequestError(f"Inference-Header-Content-Length must be a number, got {length!r:.40}")
            # Off the event loop, as decoding is: parsing is bounded (MAX_JSON_VALUES) but not free.
            request = await asyncio.get_running_loop().run_in_executor(
                self.pipeline.decode_pool, partial(parse_infer, body, int(length) if length else None, self.card,
                                                   max_images=self.max_images))
            scores = await self.model.infer(request, ticket)
            body, out_headers = encode_infer(request, scores, self.card)
        except BadRequestError as e:  # v2 has no 422: a parameter out of range is a bad request
            return error_answer(MalformedRequestError(str(e)))
        except SotaServeError as e:
            return error_answer(e)
        return 200, out_headers, body


class _Unsupported(SotaServeError):
    http_status = 415
