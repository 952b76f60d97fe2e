"""A small HTTP/1.1 client for the load generator: requests encoded once, sent many times
on keep-alive connections, answers parsed by httptools (llhttp, in C).

On a small machine the load generator takes its CPU from the server it measures, so it
encodes nothing per request (its cost per request: BENCHMARKS.md, "Method"). It does what the
benchmark needs and no more: POST with a body, answers with a Content-Length or chunked body,
keep-alive or ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import NamedTuple
from urllib.parse import urlsplit

import httptools


class Answer(NamedTuple):
    status: int
    retry_after: str | None


def endpoint(url: str) -> tuple[str, int]:
    """(host, port) of an ``http://`` URL."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"the load generator speaks plain http://host:port/path, got {url!r}")
    return parts.hostname, parts.port or 80


def multipart_request(url: str, field: str, filename: str, content: bytes,
                      data: Sequence[tuple[str, str]] = ()) -> bytes:
    """The whole POST (head and ``multipart/form-data`` body): one file and some text fields."""
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    boundary = uuid.uuid4().hex
    safe_name = filename.replace('"', "%22").replace("\r", "").replace("\n", "")
    chunks = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{safe_name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode(),
        content,
        b"\r\n",
    ]
    for key, value in data:
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    chunks.append(f"--{boundary}--\r\n".encode())
    body = b"".join(chunks)
    head = (f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time. After a failure (refused, reset,
    timed out, a malformed answer) or a ``Connection: close`` it is ``closed``: open another."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Answer] | None = None
        self._retry_after: str | None = None
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int, timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(cls, host, port), timeout)
        return conn

    async def send(self, request: bytes, timeout: float) -> Answer:
        """Write ``request`` and wait for the whole answer (``TimeoutError`` after ``timeout``)."""
        if self.closed or self._transport is None:
            raise ConnectionError("the connection is closed")
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._transport.write(request)
        timer = loop.call_later(timeout, self._fail, TimeoutError(f"no answer within {timeout:g}s"))
        try:
            return await waiter
        finally:
            timer.cancel()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def _fail(self, error: Exception) -> None:
        # An answer may still be on its way: this connection can no longer be trusted.
        self.close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(ConnectionError(f"malformed HTTP answer: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError(f"connection closed before the answer ended{f': {exc}' if exc else ''}"))

    # --- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self._retry_after = value.decode("latin-1")

    def on_message_complete(self) -> None:
        answer = Answer(self._parser.get_status_code(), self._retry_after)
        self._retry_after = None
        if not self._parser.should_keep_alive():
            self.close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(answer)
