"""One error shape for every answer: ``{"error": message}``, ``Retry-After`` on every 503, and
one warning line in the log for every 4xx.

The front door's own refusals, the direct routes' and the ``@bentoml.api`` methods' errors go
through :func:`answered` (a typed sota-serve error becomes its documented status and message
instead of an exception: BentoML would log a traceback for each client mistake and replace
the message of any 5xx with a generic one). What BentoML answers itself (its 4xx as
``[{"error": ...}]``, a plain-text 404 or 405, its own 503) is reshaped by :func:`json_errors`.
Every answer of the front door passes through that, whoever made it, so it is where a 4xx is
logged: the limits' 413, 408, 415 and 400, the routes' 400 and 422, the Open Inference
Protocol's, BentoML's 404 and 405 alike. A front end that hands its answers to its web
framework instead (the Ray ingress) logs them with :func:`log_answer`, in the same line.

Every JSON body, an answer or an error, is :func:`json_body`'s encoding.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, TypeVar

from pydantic import BaseModel

from sota_serve.errors import OverloadedError, SotaServeError
from sota_serve.log_text import one_line

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]
#: an HTTP answer: status, headers, body (JSON unless the headers say otherwise)
Answer = tuple[int, dict[str, str], bytes]

log = logging.getLogger("sota_serve.http")


def json_body(value: Any) -> bytes:
    """The JSON encoding of every body: compact, UTF-8, one line ending in a newline (what a
    pydantic model writes, so that an answer and an error read alike)."""
    if isinstance(value, BaseModel):
        return value.model_dump_json().encode() + b"\n"
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def error_body(message: str) -> bytes:
    """The documented error shape, ``{"error": message}``."""
    return json_body({"error": message})


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


def json_errors(send: Send, retry_after: Callable[[], int], *, head: bool = False, request: str = "") -> Send:
    """``send`` that adds ``Retry-After`` to a 503 without one, rewrites a 4xx body that is
    not ``{"error": ...}`` into that shape (not for ``head`` requests: their answer has none)
    and logs each 4xx as one warning line, ``request -> status: message`` (``request``: the
    method and path)."""
    state: dict[str, Any] = {}

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            status = message["status"]
            if status == 503 and not any(k.lower() == b"retry-after" for k, _ in message.get("headers", [])):
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"retry-after", str(retry_after()).encode())]}
            if 400 <= status < 500 and head:
                log_client_error(request, status, HTTPStatus(status).phrase)  # a HEAD answer has no body
            elif 400 <= status < 500:
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
        log_client_error(request, start["status"], json.loads(body)["error"])
        headers = [(k, v) for k, v in start["headers"] if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return wrapped


def log_answer(request: str, answer: Answer) -> None:
    """Log ``answer`` to ``request`` (method and path) as :func:`json_errors` does, for a front
    end that hands its answers to its web framework instead of sending them through it."""
    status, _, body = answer
    if 400 <= status < 500:
        log_client_error(request, status, json.loads(_error_body(body, status))["error"])


def log_client_error(request: str, status: int, message: object) -> None:
    """One warning line, no traceback: a client's mistake is worth a line, not an alarm. The
    path and the message can carry what a client sent (a line break in a percent-encoded
    path): each is kept to one line (:func:`sota_serve.log_text.one_line`)."""
    log.warning("%s -> %d: %s", one_line(request), status, one_line(str(message)))


def _error_body(body: bytes, status: int) -> bytes:
    """``{"error": message}`` in :func:`json_body`'s encoding, from whatever 4xx body was sent."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, list) and len(parsed) == 1 and isinstance(parsed[0], dict):
        parsed = parsed[0]  # BentoML's [{"error": ...}]
    if isinstance(parsed, dict) and "error" in parsed:
        return json_body(parsed)
    text = body.decode("utf-8", "replace").strip()
    return error_body(text or _PHRASES.get(status, f"HTTP {status}"))


_PHRASES = {404: "Not Found", 405: "Method Not Allowed"}
