"""The ``@bentoml.api`` declarations of the image routes, made from their request models
(sota_serve/contract/requests.py): the same fields, defaults, bounds, descriptions and
readers, each file field as :class:`~bento.upload.Upload` (a path type to BentoML, so that it
is parsed from multipart/form-data and BentoML's clients send a file there).

BentoML's clients read these from ``/schema.json``; HTTP requests to the routes are answered
by the front door before BentoML sees them, and these declarations serve in-process calls,
which get the same request model (:meth:`Declared.request`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, create_model
from starlette.responses import Response

from bento.upload import Upload
from sota_serve.contract.fields import is_file
from sota_serve.contract.requests import FORMS, Form, validated
from sota_serve.http.errors import Answer, answered
from sota_serve.http.routes import Routes
from sota_serve.serving.admission import Ticket


class Declared:
    """The route at ``path``: its request model (``form``) and what BentoML parses (``spec``),
    answered by ``routes``."""

    def __init__(self, path: str, routes: Routes | None = None) -> None:
        self.form, self.routes = FORMS[path], routes
        files: dict[str, Any] = {
            name: (Upload if field.annotation is bytes else list[Upload], Field(description=field.description))
            for name, field in self.form.model_fields.items() if is_file(field)}
        self.spec: type[BaseModel] = create_model(self.form.__name__, __base__=self.form, __module__=__name__,
                                                  **files)

    def request(self, fields: dict[str, Any]) -> Form:
        """The request model of the values an API method was called with (BentoML's parse of
        a request, or an in-process call's arguments: a file as an Upload, bytes or a path);
        raises the typed error of a value its field refuses."""
        parsed = validated(self.spec, fields)
        return validated(self.form, {name: _data(getattr(parsed, name)) for name in self.form.model_fields})

    async def answer(self, fields: dict[str, Any], ticket: Ticket | None) -> Any:
        """An API method's answer: the route's, or its typed error as BentoML returns it."""
        assert self.routes is not None, "Declared.answer needs the routes"
        routes = self.routes

        async def work() -> Any:
            return await routes.answer(self.request(fields), ticket)
        return await answered(work(), render=_response)


def _response(answer: Answer) -> Response:
    """An error answer as BentoML returns it from an API method."""
    status, headers, body = answer
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def _data(value: Any) -> Any:
    if isinstance(value, Upload):
        return value.data
    if isinstance(value, list) and value and isinstance(value[0], Upload):
        return [u.data for u in value]
    return value
