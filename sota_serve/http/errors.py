"""One error shape for every answer: ``{"error": message}``, and ``Retry-After`` on every 503.

The front door's own refusals, the direct routes' and the ``@bentoml.api`` methods' errors go
through :func:`answered` (a typed sota-serve error becomes its documented status and message
instead of an exception: BentoML would log a traceback for each client mistake and replace
the message of any 5xx with a generic one). What BentoML answers itself (its 4xx as
``[{"error": ...}]``, a plain-text 404 or 405, its own 503) is reshaped by :func:`json_errors`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sota_serve.errors import OverloadedError, SotaServeError

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]
#: an HTTP answer: status, headers, body (JSON unless the headers say otherwise)
Answer = tuple[int, dict[str, str], bytes]


def error_body(message: str) -> bytes:
    """The documented error shape, ``{"error": message}``."""
    return json.dumps({"error": message}).encode()


def error_answer(e: SotaServeError) -> Answer:
    """A typed error's answer: its status and ``{"error": message}``, ``Retry-After`` on 503."""
    headers = {"Retry-After": str(e.retry_after_s)} if isinstance(e, OverloadedError) else {}
    return e.http_status, headers, error_body(str(e))


def retry_later(why: str, retry_after_s: int) -> Answer:
    """503 for a request shed or with no replica to serve it: the message says when to retry,
    as ``Retry-After`` does."""
    return 503, {"Retry-After": str(retry_after_s)}, error_body(f"{why}; retry after {retry_after_s}s")


T = TypeVar("T")


async def answered(work: Awaitable[T], render: Callable[[Answer], T]) -> T:
    """What ``work`` returns, or the typed error it raised as its answer, in the caller's
    form (``render``)."""
    try:
        return await work
    except SotaServeError as e:
        return render(error_answer(e))


def json_errors(send: Send, retry_after: Callable[[], int], *, head: bool = False) -> Send:
    """``send`` that adds ``Retry-After`` to a 503 without one and rewrites a 4xx body that is
    not ``{"error": ...}`` into that shape (not for ``head`` requests: their answer has none)."""
    state: dict[str, Any] = {}

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            status = message["status"]
            if status == 503 and not any(k.lower() == b"retry-after" for k, _ in message.get("headers", [])):
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"retry-after", str(retry_after()).encode())]}
            if 400 <= status < 500 and not head:
                state["start"], state["body"] = message, b""
                return
        elif message["type"] == "http.response.body" and "start" in state:
            state["body"] += message.get("body", b"")
            if message.get("more_body"):
                return
            start, raw = state.pop("start"), state.pop("body")
            return await _send_whole(send, start, raw)
        await send(message)

    async def _send_whole(send: Send, start: Message, raw: bytes) -> None:
        body = _error_body(raw, start["status"])
        headers = [(k, v) for k, v in start["headers"] if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return wrapped


def _error_body(body: bytes, status: int) -> bytes:
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "error" in parsed:
        return body
    if isinstance(parsed, list) and len(parsed) == 1 and isinstance(parsed[0], dict) and "error" in parsed[0]:
        return json.dumps(parsed[0]).encode()
    text = body.decode("utf-8", "replace").strip()
    return error_body(text or _PHRASES.get(status, f"HTTP {status}"))


_PHRASES = {404: "Not Found", 405: "Method Not Allowed"}
