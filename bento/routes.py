"""Routes answered by the guard without BentoML's request pipeline.

``POST /classify`` and ``POST /classify_batch`` straight from the guard's buffered body;
the Open Inference Protocol under ``/v2`` (bento/oip.py); ``GET /card`` (BentoML's API
routes are POST only, and a browser's first try is a GET); the page for people at ``/`` with
its assets and ``GET /crops`` (bento/page.py); BentoML's OpenAPI UI at ``/docs`` (BentoML
puts it at ``/``) and ``GET /docs.json`` (the OpenAPI document completed from the model card,
bento.openapi).

BentoML's generic request path validates an IO model, parses the multipart body a second
time, builds a Starlette request and response and serializes through its own serde. On the
demo model that was about 40 % of the event loop's time per request (py-spy), on a machine
where the event loop shares two cores with decoding and the model. The guard already holds
the whole body and has split it into parts, so these routes take it from there and call the
same :class:`~bento.handlers.RequestHandler` methods as the ``@bentoml.api`` declarations.
Those declarations stay the contract: the OpenAPI schema, BentoML's clients, in-process
calls. BentoML's outer middlewares (metrics, tracing, timeout, access log) still wrap every
request.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from starlette.datastructures import Headers

from bento import page
from bento.handlers import Answer, RequestHandler, error_answer
from bento.multipart import Part
from bento.oip import OpenInference
from sota_serve.admission import Ticket
from sota_serve.errors import MalformedRequestError, SotaServeError
from sota_serve.predictions import DEFAULT_TOP_K

log = logging.getLogger("sota_serve.routes")

_INTEGER = re.compile(r"[+-]?\d{1,9}")


class DirectRoutes:
    """Bound to the service's handler once the model is loaded; until then the guard passes
    requests on to BentoML (which answers 503 while the service is not ready)."""

    def __init__(self, file_fields: dict[str, str]) -> None:
        self.file_fields = file_fields  # route -> its file field
        self.handler: RequestHandler | None = None
        self.oip: OpenInference | None = None
        self.openapi = b""

    def bind(self, handler: RequestHandler, openapi: dict[str, Any], oip: OpenInference) -> None:
        self.handler, self.oip = handler, oip
        self.openapi = json.dumps(openapi).encode()

    def serves(self, path: str) -> bool:
        return self.handler is not None and path in self.file_fields

    @staticmethod
    def is_infer(path: str) -> bool:
        """An Open Inference Protocol ``infer`` path: admitted at the door like the image routes."""
        return OpenInference.is_infer(path)

    def get(self, path: str, query: bytes = b"") -> Answer | None:
        """The answer to ``GET path``, or None to leave it to BentoML."""
        if path == "/docs":
            return page.docs()
        if path.startswith("/v2"):
            if self.oip is not None:
                return self.oip.get(path)
            return OpenInference.loading(path)
        if self.handler is None:
            return page.asset(path)  # the page itself can load before the model
        if path == "/card":
            return 200, {}, json.dumps(self.handler.card.to_dict()).encode()
        if path == "/docs.json" and self.openapi:
            return 200, {}, self.openapi
        if path == "/crops":
            return page.crops(self.handler.pre, query)
        return page.asset(path, self.handler.pre, self.handler.card)

    async def infer(self, path: str, headers: Headers, body: bytes, ticket: Ticket | None) -> Answer:
        """``POST /v2/models/{name}/infer``."""
        if self.oip is None:
            return 503, {"Retry-After": "1"}, b'{"error": "the model is loading; retry in a moment"}'
        return await self.oip.infer(path, headers, body, ticket)

    async def answer(self, path: str, parts: Sequence[Part], ticket: Ticket | None) -> Answer:
        assert self.handler is not None, "DirectRoutes.answer before bind"
        try:
            images, tta, top_k = _form(parts, self.file_fields[path])
            response: BaseModel
            if path == "/classify":
                if len(images) != 1:
                    raise MalformedRequestError(f"/classify takes one 'image' file, got {len(images)};"
                                                " send several to /classify_batch as 'images'")
                response = await self.handler.classify(images[0], tta, top_k, ticket)
            else:
                response = await self.handler.classify_batch(images, tta, top_k, ticket)
        except SotaServeError as e:
            if e.http_status < 500:
                log.warning("%s -> %d: %s", path, e.http_status, e)  # a client's mistake: one line
            return error_answer(e)
        return 200, {}, response.model_dump_json().encode()


def _form(parts: Sequence[Part], file_field: str) -> tuple[list[bytes], str | None, int]:
    """The files of ``file_field`` and the ``tta`` and ``top_k`` values. Values are read as
    BentoML reads them (JSON when they parse as JSON, as its clients send them, else text);
    other fields are ignored, as BentoML ignores them."""
    images = [p.content for p in parts if p.name == file_field]
    values = {p.name: _value(p.text()) for p in parts if p.name in ("tta", "top_k")}
    tta = values.get("tta")  # None: the card's default
    if tta is not None and not isinstance(tta, str):
        raise MalformedRequestError(f"tta must be a string, got {tta!r:.40}")
    top_k = values.get("top_k", DEFAULT_TOP_K)
    if isinstance(top_k, str) and _INTEGER.fullmatch(top_k.strip()):
        top_k = int(top_k)
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        raise MalformedRequestError(f"top_k must be an integer, got {top_k!r:.40}")
    return images, tta, top_k


def _value(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text
