"""ASGI middleware in front of the API: the limits BentoML does not enforce itself.

- a request body limit (413), checked on Content-Length and again while reading;
- image endpoints accept only multipart/form-data with real file parts (415/400): BentoML
  would otherwise fetch a URL given as a string, or treat a JSON string as a server path;
- admission control at the door (sota_serve.admission), before the body is read: a request
  the queue cannot serve in time gets an immediate 503 with Retry-After;
- every 503, whichever component sent it, carries Retry-After;
- BentoML renders 4xx errors as ``[{"error": ...}]``; they are unwrapped to ``{"error": ...}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from starlette.datastructures import Headers

from sota_serve.admission import Admission, Ticket
from sota_serve.errors import OverloadedError

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
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class RequestGuard:
    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        *,
        file_fields: dict[str, Iterable[str]],
        max_body_bytes: int,
        admission: Admission,
        max_files: int = 64,
    ) -> None:
        self.app = app
        self.file_fields = {path: set(fields) for path, fields in file_fields.items()}
        self.max_body_bytes = max_body_bytes
        self.admission = admission
        self.max_files = max_files

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._fix_errors(send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        fields = self.file_fields.get(scope["path"])
        ticket: Ticket | None = None
        if fields:
            declared = Headers(scope=scope).get("content-length", "")
            try:
                ticket = self.admission.enter(min(int(declared), self.max_body_bytes) if declared.isdigit() else 0)
            except OverloadedError as e:
                # Answered before the body is read: shedding must cost less than serving.
                return await _respond(send, 503, {"error": f"{e}; retry after {e.retry_after_s}s"},
                                      {"Retry-After": str(e.retry_after_s)})
            # The API handler runs in this task's context (or a copy of it), and reads it there.
            TICKET.set(ticket)
        try:
            try:  # the body limit holds for every POST, not only the image routes
                body = await self._read_body(scope, receive)
                if fields and ticket is not None:
                    self.admission.resize(ticket, len(body))
                    self._check_files(Headers(scope=scope), body, fields)
            except _Reject as e:
                return await _respond(send, e.status, {"error": e.message}, e.headers)
            await self.app(scope, _replay(body, receive), send)
        finally:
            if ticket is not None:
                self.admission.leave(ticket)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        too_big = _Reject(413, f"request body above the limit of {self.max_body_bytes:,} bytes"
                               " (SOTA_SERVE_MAX_BODY_BYTES)")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Reject(400, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _check_files(self, headers: Headers, body: bytes, fields: set[str]) -> None:
        ctype = headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise _Reject(415, "send images as multipart/form-data file parts (e.g. curl -F"
                               f" image=@photo.jpg); got content-type {ctype or 'none'!r}")
        boundary = _boundary(ctype)
        if boundary is None:
            raise _Reject(400, "malformed multipart body: no boundary in the content-type")
        files = 0
        for name, is_file in _parts(body, boundary):
            if name not in fields:
                continue
            if not is_file:
                raise _Reject(400, f"field {name!r} must be a file upload; URLs and strings are not fetched")
            files += 1
            if files > self.max_files:
                raise _Reject(413, f"more than {self.max_files} images in one request")
        if not files:
            raise _Reject(400, f"missing file field {' or '.join(sorted(fields))!r}")

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


_DISPOSITION = re.compile(rb'(?im)^content-disposition:\s*form-data\s*;(.*)$')
_NAME = re.compile(rb'(?i)(?:^|;)\s*name="([^"]*)"')
_FILENAME = re.compile(rb'(?i)(?:^|;)\s*filename\*?=')


def _boundary(content_type: str) -> bytes | None:
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    return match.group(1).encode("latin-1") if match else None


def _parts(body: bytes, boundary: bytes) -> Iterator[tuple[str, bool]]:
    """(field name, is a file part) for each part, reading part headers only.

    Only the small header block of each part is parsed (bytes.find runs in C), so checking a
    multi-megabyte upload costs microseconds instead of a second full multipart parse.
    """
    delimiter = b"--" + boundary
    pos = body.find(delimiter)
    while pos != -1:
        start = pos + len(delimiter)
        if body[start : start + 2] == b"--":  # closing delimiter
            return
        end = body.find(b"\r\n\r\n", start)
        if end == -1:
            raise _Reject(400, "malformed multipart body: a part has no header end")
        disposition = _DISPOSITION.search(body[start:end])
        if disposition:
            name = _NAME.search(disposition.group(1))
            if name:
                yield name.group(1).decode("utf-8", "replace"), bool(_FILENAME.search(disposition.group(1)))
        pos = body.find(b"\r\n" + delimiter, end)
        pos = pos + 2 if pos != -1 else -1


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
