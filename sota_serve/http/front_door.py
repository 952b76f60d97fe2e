"""The ASGI middleware in front of the service under BentoML (``add_asgi_middleware``). Ray
Serve's ingress (rayserve/ingress.py) answers the same contract from the same parts (limits,
multipart parsing, JSON errors, the route table in its model replicas, admission there).

Per request, in this order:

1. errors: every 4xx is ``{"error": ...}`` and one warning line in the log, and every 503
   carries ``Retry-After``, whoever answers (sota_serve/http/errors.py);
2. the GET routes it knows (the page, the card, the OpenAPI document, ``/v2``) are answered
   from the route table (sota_serve/http/routes.py);
3. admission (sota_serve.serving.admission): an image or ``infer`` request the queue cannot
   serve in time gets 503 with Retry-After before its body is read;
4. limits (sota_serve/http/limits.py): body size (413), time to receive it (408), file parts (415/400);
5. the image routes, ``infer`` and ``POST /card`` are answered from the buffered body
   (sota_serve/http/routes.py); anything else goes on to the wrapped app (BentoML's) with the
   body replayed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from sota_serve.contract.requests import FILE_FIELDS
from sota_serve.errors import OverloadedError
from sota_serve.http.errors import Answer, json_errors, retry_later
from sota_serve.http.limits import Limits, Rejected, declared_length
from sota_serve.http.oip import OpenInference
from sota_serve.http.routes import Routes, model_route
from sota_serve.serving.admission import Admission, Ticket

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

#: the admission ticket of the request being handled (read by BentoML's ``@bentoml.api``
#: methods, which BentoML runs in this task's context or a copy of it)
TICKET: ContextVar[Ticket | None] = ContextVar("sota_serve_ticket", default=None)


class FrontDoor:
    def __init__(self, app: App, *, routes: Routes, admission: Admission, limits: Limits, hold_s: float) -> None:
        self.app, self.routes, self.admission, self.limits, self.hold_s = app, routes, admission, limits, hold_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        send = json_errors(send, self.admission.retry_after, head=method == "HEAD", request=f"{method} {path}")
        if method in ("GET", "HEAD"):
            answer = self.routes.get(path, scope.get("query_string", b""))
            if answer is not None:
                return await respond(send, answer, head=method == "HEAD")
        if method != "POST":
            return await self.app(scope, receive, send)
        headers = header_map(scope)
        field, infer = FILE_FIELDS.get(model_route(path)[1]), OpenInference.is_infer(path)
        ticket: Ticket | None = None
        if field or infer:
            try:
                ticket = await self.admission.wait_enter(
                    min(declared_length(headers) or 0, self.limits.max_body_bytes), self.hold_s)
            except OverloadedError as e:  # before the body is read: shedding must cost less than serving
                return await respond(send, retry_later(str(e), e.retry_after_s))
            TICKET.set(ticket)
        try:
            try:  # the body limit holds for every POST, not only the image routes
                body = await self.limits.read(headers, receive)
                if ticket is not None:
                    self.admission.resize(ticket, len(body))
                answer = await self._post(path, headers, body, field, ticket)
            except Rejected as e:
                answer = e.answer()
            if answer is not None:
                return await respond(send, answer)
            await self.app(scope, _replay(body, receive), send)
        finally:
            if ticket is not None:
                self.admission.leave(ticket)

    async def _post(self, path: str, headers: dict[str, str], body: bytes, field: str | None,
                    ticket: Ticket | None) -> Answer | None:
        """The answer to a POST of ``body`` that the route table gives, or None to leave it to
        the wrapped app; raises Rejected for a form the limits refuse."""
        if field:
            form = self.limits.form(headers.get("content-type", ""), body, field)
            return await self.routes.post(path, form, ticket) if self.routes.loaded else None
        if self.routes.oip is not None and OpenInference.is_infer(path):
            return await self.routes.oip.infer(path, headers, body, ticket)
        if self.routes.oip is not None and OpenInference.is_repository(path):
            return await self.routes.oip.repository(path)
        if model_route(path)[1] == "/card":  # an API method under BentoML, which its clients POST: answered as GET is
            return self.routes.get(path)
        return None


def header_map(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (the first of a repeated header, as a
    client library would read it); names and values are Latin-1 as HTTP/1.1 sends them."""
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


async def respond(send: Send, answer: Answer, *, head: bool = False) -> None:
    status, headers, data = answer
    headers = {k.lower(): v for k, v in headers.items()}
    raw = [(b"content-type", headers.pop("content-type", "application/json").encode()),
           (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": b"" if head else data})


def _replay(body: bytes, upstream: Receive) -> Receive:
    """The buffered body once, then the real channel (which reports a real disconnect)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await upstream()

    return receive
