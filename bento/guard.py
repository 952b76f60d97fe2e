"""ASGI middleware in front of the API: the limits BentoML does not enforce itself.

- a request body limit (413), checked on Content-Length and again while reading;
- a time limit on receiving the body (408): the guard sits outside BentoML's traffic timeout
  (bento/stack.py), and a client that trickles its upload must not hold its admission forever;
- image endpoints accept only multipart/form-data with real file parts (415/400): BentoML
  would otherwise fetch a URL given as a string, or treat a JSON string as a server path;
- admission control at the door (sota_serve.admission), before the body is read: a request
  the queue cannot serve in time gets an immediate 503 with Retry-After;
- every 503, whichever component sent it, carries Retry-After;
- BentoML renders 4xx errors as ``[{"error": ...}]``; they are unwrapped to ``{"error": ...}``;
- once the model is loaded, the image routes and the Open Inference Protocol's ``infer`` are
  answered from the buffered body (bento.routes) instead of being handed to BentoML's
  request pipeline; so are the GET routes bento.routes knows (the page, the card, ``/v2``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import Any

from starlette.datastructures import Headers

from bento.handlers import Answer
from bento.multipart import Part, boundary, parts
from bento.routes import DirectRoutes
from sota_serve.admission import Admission, Ticket
from sota_serve.errors import MalformedRequestError, OverloadedError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: the admission ticket of the request being handled; the handler reports progress on it
TICKET: ContextVar[Ticket | None] = ContextVar("sota_serve_ticket", default=None)


class _Reject(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


async def _respond(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    await _respond_raw(send, status, json.dumps(body).encode(), headers)


async def _respond_raw(send: Send, status: int, data: bytes, headers: dict[str, str] | None = None,
                       *, head: bool = False) -> None:
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    raw = [(b"content-type", headers.pop("content-type", "application/json").encode()),
           (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": b"" if head else data})


class RequestGuard:
    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        *,
        file_fields: dict[str, Iterable[str]],
        max_body_bytes: int,
        admission: Admission,
        max_files: int = 64,
        routes: DirectRoutes | None = None,
        hold_s: float = 0.0,
        body_timeout_s: float = 60.0,
    ) -> None:
        self.app = app
        self.file_fields = {path: set(fields) for path, fields in file_fields.items()}
        self.max_body_bytes = max_body_bytes
        self.admission = admission
        self.max_files = max_files
        self.routes = routes
        self.hold_s = hold_s
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._fix_errors(send)
        if scope["method"] in ("GET", "HEAD") and self.routes is not None:
            answer = self.routes.get(scope["path"], scope.get("query_string", b""))
            if answer is not None:
                status, headers, data = answer
                return await _respond_raw(send, status, data, headers, head=scope["method"] == "HEAD")
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        fields = self.file_fields.get(scope["path"])
        infer = self.routes is not None and self.routes.is_infer(scope["path"])
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        declared_bytes = int(declared) if declared.isdigit() else None
        ticket: Ticket | None = None
        if fields or infer:
            try:
                nbytes = min(declared_bytes or 0, self.max_body_bytes)
                ticket = await self.admission.wait_enter(nbytes, self.hold_s)
            except OverloadedError as e:
                # Answered before the body is read: shedding must cost less than serving.
                return await _respond(send, 503, {"error": f"{e}; retry after {e.retry_after_s}s"},
                                      {"Retry-After": str(e.retry_after_s)})
            # The API handler runs in this task's context (or a copy of it), and reads it there.
            TICKET.set(ticket)
        try:
            try:  # the body limit holds for every POST, not only the image routes
                body = await self._read_body(declared_bytes, receive)
                if ticket is not None:
                    self.admission.resize(ticket, len(body))
                form = self._check_files(headers, body, fields) if fields else []
            except _Reject as e:
                return await _respond(send, e.status, {"error": e.message}, e.headers)
            answer = await self._answer(scope["path"], infer, headers, body, form, ticket)
            if answer is not None:
                status, out_headers, data = answer
                return await _respond_raw(send, status, data, out_headers)
            await self.app(scope, _replay(body, receive), send)
        finally:
            if ticket is not None:
                self.admission.leave(ticket)

    async def _answer(self, path: str, infer: bool, headers: Headers, body: bytes, form: list[Part],
                      ticket: Ticket | None) -> Answer | None:
        """The direct routes' answer, or None to hand the request to BentoML."""
        if self.routes is None:
            return None
        if infer:
            return await self.routes.infer(path, headers, body, ticket)
        if self.routes.serves(path):
            return await self.routes.answer(path, form, ticket)
        return None

    async def _read_body(self, declared_bytes: int | None, receive: Receive) -> bytes:
        if declared_bytes is not None and declared_bytes > self.max_body_bytes:
            raise self._too_big()
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _Reject(400, "client disconnected")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise self._too_big()
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise _Reject(408, f"the request body did not arrive within {self.body_timeout_s:g} s"
                               " (SOTA_SERVE_DEADLINE_S)", {"Connection": "close"}) from None

    def _too_big(self) -> _Reject:
        return _Reject(413, f"request body above the limit of {self.max_body_bytes:,} bytes"
                            " (SOTA_SERVE_MAX_BODY_BYTES)")

    def _check_files(self, headers: Headers, body: bytes, fields: set[str]) -> list[Part]:
        ctype = headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise _Reject(415, "send images as multipart/form-data file parts (e.g. curl -F"
                               f" image=@photo.jpg); got content-type {ctype or 'none'!r}")
        separator = boundary(ctype)
        if separator is None:
            raise _Reject(400, "malformed multipart body: no boundary in the content-type")
        try:
            form = list(parts(body, separator))
        except MalformedRequestError as e:
            raise _Reject(400, str(e)) from e
        files = [p for p in form if p.name in fields]
        for part in files:
            if not part.is_file:
                raise _Reject(400, f"field {part.name!r} must be a file upload; URLs and strings are not fetched")
        if len(files) > self.max_files:
            raise _Reject(413, f"more than {self.max_files} images in one request")
        if not files:
            raise _Reject(400, f"missing file field {' or '.join(sorted(fields))!r}")
        return form

    def _fix_errors(self, send: Send) -> Send:
        state: dict[str, Any] = {}

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append((b"retry-after", str(self.admission.retry_after()).encode()))
                message = {**message, "headers": headers}
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                state["start"], state["body"] = message, b""
                return
            if message["type"] == "http.response.body" and "start" in state:
                state["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                start, body = state.pop("start"), state.pop("body")
                try:
                    parsed = json.loads(body)
                    if isinstance(parsed, list) and len(parsed) == 1 and isinstance(parsed[0], dict):
                        body = json.dumps(parsed[0]).encode()
                except ValueError:
                    pass
                headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        return wrapped


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
