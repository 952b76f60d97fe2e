"""The route table the front door answers from, once the model is loaded.

``POST /classify`` and ``POST /classify_batch`` from the front door's buffered body; the Open
Inference Protocol under ``/v2`` (sota_serve/http/oip.py); ``GET /card`` (BentoML's API routes are POST
only, and a browser's first try is a GET); the page for people at ``/`` with its assets and
``GET /crops`` (sota_serve/http/page.py); the OpenAPI UI at ``/docs`` and ``GET /docs.json`` (the
OpenAPI document completed from the model card by the front end, e.g. bento/openapi.py).

BentoML's generic request path validates an IO model, parses the multipart body a second
time, builds a Starlette request and response and serializes through its own serde: on the
demo model about 40 % of the event loop's time per request (py-spy), and the direct routes
served about 1.3x. The ``@bentoml.api`` declarations stay the contract (the OpenAPI schema,
BentoML's clients, in-process calls) and call the same methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from sota_serve.errors import ImageError, MalformedRequestError
from sota_serve.explain.occlusion import Explanation
from sota_serve.http import page
from sota_serve.http.errors import Answer, answered, json_body
from sota_serve.http.explain_form import explain_form
from sota_serve.http.multipart import Part, field_value, integer_field
from sota_serve.http.oip import OpenInference
from sota_serve.http.schemas import BatchResponse, ClassifyResponse
from sota_serve.predictions import DEFAULT_TOP_K
from sota_serve.serving.admission import Ticket
from sota_serve.serving.fallback import FallbackAsk
from sota_serve.serving.pipeline import Pipeline

#: image route -> its file field
FILE_FIELDS = {"/classify": "image", "/classify_batch": "images", "/explain": "image"}


class Routes:
    """Bound to the service's pipeline once the model is loaded; until then the front door
    passes requests on to BentoML (which answers 503 while the service is not ready)."""

    def __init__(self) -> None:
        self.pipeline: Pipeline | None = None
        self.oip: OpenInference | None = None
        self.openapi = b""

    def bind(self, pipeline: Pipeline, openapi: dict[str, Any], oip: OpenInference) -> None:
        self.pipeline, self.oip = pipeline, oip
        self.openapi = json_body(openapi)

    @property
    def loaded(self) -> bool:
        return self.pipeline is not None

    def get(self, path: str, query: bytes = b"") -> Answer | None:
        """The answer to ``GET path``, or None to leave it to BentoML."""
        if path == "/docs":
            return page.docs()
        if path.startswith("/v2"):
            return self.oip.get(path) if self.oip is not None else OpenInference.loading(path)
        if self.pipeline is None:
            return page.asset(path)  # the page itself can load before the model
        if path == "/card":
            return 200, {}, json_body(self.pipeline.card.to_dict())
        if path == "/docs.json" and self.openapi:
            return 200, {}, self.openapi
        if path == "/crops":
            return page.crops(self.pipeline.clf.preprocessor, query)
        return page.asset(path, self.pipeline.clf.preprocessor, self.pipeline.card)

    async def post(self, path: str, form: Sequence[Part], ticket: Ticket | None) -> Answer:
        """An image route's answer from its form. A 4xx is logged where every answer of the
        server passes, whoever made it (sota_serve/http/errors.py), not here."""
        return await answered(self._post(path, form, ticket), render=lambda error: error)

    async def _post(self, path: str, form: Sequence[Part], ticket: Ticket | None) -> Answer:
        if path == "/explain":
            fields = explain_form(form)
            explained = await self.explain(fields.image, fields.label, fields.grid, ticket)
            return 200, {}, json_body(explained)
        images, tta, top_k, fallback = _form(form, FILE_FIELDS[path])
        if path == "/classify":
            if len(images) != 1:
                raise MalformedRequestError(f"/classify takes one 'image' file, got {len(images)};"
                                            " send several to /classify_batch as 'images'")
            response: BaseModel = await self.classify(images[0], tta, top_k, ticket, fallback)
        else:
            response = await self.classify_batch(images, tta, top_k, ticket, fallback)
        return 200, {}, json_body(response)

    async def classify(self, image: bytes, tta: str | None, top_k: int, ticket: Ticket | None,
                       fallback: FallbackAsk | None = None) -> ClassifyResponse:
        """``POST /classify``; raises the image's typed error."""
        assert self.pipeline is not None, "Routes.classify before bind"
        answers = await self.pipeline.classify([image], tta, top_k, ticket, fallback)
        (result,) = answers.results
        if isinstance(result, ImageError):
            raise result
        return ClassifyResponse(model=self.pipeline.card.tag, tta=answers.tta,
                                requested_tta=answers.requested_tta or answers.tta,
                                predictions=result.predictions, ood=result.ood)

    async def classify_batch(self, images: Sequence[bytes], tta: str | None, top_k: int,
                             ticket: Ticket | None, fallback: FallbackAsk | None = None) -> BatchResponse:
        """``POST /classify_batch``: one entry per image; a bad image fails only its entry."""
        assert self.pipeline is not None, "Routes.classify_batch before bind"
        answers = await self.pipeline.classify(images, tta, top_k, ticket, fallback)
        return BatchResponse.of(self.pipeline.card.tag, answers)

    async def explain(self, image: bytes, label: str | None, grid: int, ticket: Ticket | None) -> Explanation:
        """``POST /explain``: the occlusion map over the plain crop (sota_serve/explain/occlusion.py);
        raises the image's typed error, BadRequestError (422) for a label or grid out of range."""
        assert self.pipeline is not None, "Routes.explain before bind"
        return await self.pipeline.explain(image, label, grid, ticket)


#: the form's value fields
VALUE_FIELDS = ("tta", "top_k", "tta_fallback", "tta_budget_s", "tta_budget_strict")


def _form(parts: Sequence[Part], file_field: str) -> tuple[list[bytes], str | None, int, FallbackAsk]:
    """The files of ``file_field`` and the ``tta``, ``top_k`` and TTA fallback values. Values
    are read as BentoML reads them (JSON when they parse as JSON, as its clients send them,
    else text); other fields are ignored, as BentoML ignores them."""
    images = [p.content for p in parts if p.name == file_field]
    values = {p.name: field_value(p.text()) for p in parts if p.name in VALUE_FIELDS}
    tta = values.get("tta")  # None: the card's default
    if tta is not None and not isinstance(tta, str):
        raise MalformedRequestError(f"tta must be a string, got {tta!r:.40}")
    top_k = integer_field("top_k", values.get("top_k", DEFAULT_TOP_K))
    fallback = FallbackAsk.parse(values.get("tta_fallback"), values.get("tta_budget_s"), values.get("tta_budget_strict"))
    return images, tta, top_k, fallback
