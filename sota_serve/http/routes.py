"""The route table the front door answers from, once the models are loaded.

``POST /classify``, ``/classify_batch`` and ``/explain`` from the front door's buffered body,
each form read as its request model (sota_serve/contract/requests.py, by
sota_serve/http/form.py); the Open Inference Protocol under ``/v2`` (sota_serve/http/oip.py);
``GET /card`` (BentoML's API routes are POST only, and a browser's first try is a GET); the
page for people at ``/`` with its assets and ``GET /crops`` (sota_serve/http/page.py); the
OpenAPI document at ``GET /docs.json`` (sota_serve/http/openapi.py) and its UI at ``/docs``
(sota_serve/http/docs.py). The plain routes answer the default model; each model's own are the
same under ``/models/{name}`` (:func:`model_route`).

BentoML's generic request path validates an IO model, parses the multipart body a second
time, builds a Starlette request and response and serializes through its own serde: on the
demo model about 40 % of the event loop's time per request (py-spy), and the direct routes
served about 1.3x. The ``@bentoml.api`` declarations, made from the same request models
(bento/declarations.py), serve BentoML's clients their schema and in-process calls, and
answer through :meth:`Routes.answer` too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from sota_serve.contract.requests import FORMS, ClassifyBatchForm, ClassifyForm, ExplainForm, Form
from sota_serve.errors import ImageError, ModelNotFoundError
from sota_serve.http import docs, page
from sota_serve.http.errors import Answer, answered, error_answer, error_body, json_body
from sota_serve.http.form import read_form
from sota_serve.http.multipart import Part
from sota_serve.http.oip import OpenInference
from sota_serve.http.schemas import BatchResponse, ClassifyResponse
from sota_serve.serving.admission import Ticket
from sota_serve.serving.models import Models
from sota_serve.serving.pipeline import Pipeline

_LOADING = 503, {}, error_body("the model is loading")
#: /models/{name}/{route}: one model's routes, beside the default model's plain ones
_MODEL_ROUTE = re.compile(r"^/models/([^/]+)(/[^/]*)$")


def model_route(path: str) -> tuple[str | None, str]:
    """(the model a path names, or None for the default one; the route): ``/models/a/classify``
    is ``("a", "/classify")``, ``/classify`` is ``(None, "/classify")``."""
    match = _MODEL_ROUTE.match(path)
    return (match.group(1), match.group(2)) if match else (None, path)


class Routes:
    """Bound to the service's models once they are loaded; until then the front door passes
    requests on to BentoML (which answers 503 while the service is not ready)."""

    def __init__(self) -> None:
        self.models: Models | None = None
        self.oip: OpenInference | None = None
        self.openapi = b""

    def bind(self, models: Models, openapi: dict[str, Any], oip: OpenInference) -> None:
        self.models, self.oip = models, oip
        self.openapi = json_body(openapi)

    @property
    def loaded(self) -> bool:
        return self.models is not None

    def get(self, path: str, query: bytes = b"") -> Answer | None:
        """The answer to ``GET path``, or None to leave it to BentoML."""
        if path == "/docs.json":
            return (200, {}, self.openapi) if self.openapi else _LOADING
        if path.startswith("/docs"):
            return docs.answer(path)
        if path.startswith("/v2"):
            return self.oip.get(path) if self.oip is not None else OpenInference.loading(path)
        if self.models is None:
            return page.asset(path)  # the page itself can load before the model
        name, route = model_route(path)
        if route not in ("/card", "/crops", "/") and (name is not None or path not in page.ASSETS):
            return None
        try:
            loaded = self.models.get(name)
        except ModelNotFoundError as e:
            return error_answer(e)
        pipeline = loaded.pipeline
        if route == "/card":
            return 200, {}, json_body(pipeline.card.to_dict())
        if route == "/crops":
            return page.crops(pipeline.clf.preprocessor, query)
        # the page at / is the default model's, at /models/{name}/ that model's
        return page.asset(route, pipeline.clf.preprocessor, pipeline.card, models=self.models.names(),
                          name=name)

    async def post(self, path: str, parts: Sequence[Part], ticket: Ticket | None) -> Answer:
        """An image route's answer from its form. A 4xx is logged where every answer of the
        server passes, whoever made it (sota_serve/http/errors.py), not here."""
        return await answered(self._post(path, parts, ticket), render=lambda error: error)

    async def _post(self, path: str, parts: Sequence[Part], ticket: Ticket | None) -> Answer:
        name, route = model_route(path)
        return 200, {}, json_body(await self.answer(read_form(FORMS[route], parts, route), ticket, name))

    async def answer(self, form: Form, ticket: Ticket | None, model: str | None = None) -> BaseModel:
        """An image route's answer to its request ``form`` by ``model`` (None: the default
        one); raises the typed error of the request (a /classify image's own included),
        BadRequestError (422) for a value the card does not take (a policy, a label),
        ModelNotFoundError (404) for a model not served."""
        assert self.models is not None, "Routes.answer before bind"
        with self.models.use(model) as loaded:
            return await self._answer(loaded.pipeline, form, ticket)

    @staticmethod
    async def _answer(pipeline: Pipeline, form: Form, ticket: Ticket | None) -> BaseModel:
        if isinstance(form, ExplainForm):
            return await pipeline.explain(form.image, form.label, form.grid, ticket)
        tag = pipeline.card.tag
        if isinstance(form, ClassifyBatchForm):  # one entry per image; a bad image fails only its entry
            return BatchResponse.of(tag, await pipeline.classify(
                form.images, form.tta, form.top_k, ticket, form.fallback()))
        assert isinstance(form, ClassifyForm), f"no route answers {type(form).__name__}"
        answers = await pipeline.classify([form.image], form.tta, form.top_k, ticket, form.fallback())
        (result,) = answers.results
        if isinstance(result, ImageError):
            raise result
        return ClassifyResponse(model=tag, tta=answers.tta, requested_tta=answers.requested_tta or answers.tta,
                                predictions=result.predictions, ood=result.ood)
