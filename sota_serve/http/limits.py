"""The limits BentoML does not enforce itself, checked by the front door (sota_serve/http/front_door.py).

- a request body limit (413), checked on Content-Length and again while reading;
- a time limit on receiving the body (408): a client that trickles its upload must not hold
  its admission forever;
- image routes accept only multipart/form-data with real file parts (415/400): BentoML would
  otherwise fetch a URL given as a string, or treat a JSON string as a server path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sota_serve.errors import MalformedRequestError
from sota_serve.http.errors import Answer, error_body
from sota_serve.http.multipart import Part, boundary, parts

Receive = Callable[[], Awaitable[dict[str, Any]]]
#: bodies up to this size are joined on the event loop; larger ones on a thread
_JOIN_ON_LOOP_BYTES = 1 << 20
#: The option fields a form may carry beside its files (tta, top_k, tta_fallback, ...), with room
#: for the fields a client adds that the route ignores.
MAX_OPTION_FIELDS = 32


class Rejected(Exception):
    """A request refused before it reaches a handler: status, message, headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def answer(self) -> Answer:
        return self.status, self.headers, error_body(self.message)


def declared_length(headers: Mapping[str, str]) -> int | None:
    """The request's Content-Length, when it sends a valid one."""
    declared = headers.get("content-length", "")
    return int(declared) if declared.isdigit() else None


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    body_timeout_s: float
    max_files: int

    async def read(self, headers: Mapping[str, str], receive: Receive) -> bytes:
        """The whole body of a request with these ``headers``: refused at once when its
        Content-Length is above the limit, else read within the size and time limits."""
        declared_bytes = declared_length(headers)
        if declared_bytes is not None and declared_bytes > self.max_body_bytes:
            raise self._too_big()
        return await self._read_body(receive)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise Rejected(400, "client disconnected")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise self._too_big()
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        if size < _JOIN_ON_LOOP_BYTES:
                            return b"".join(chunks)
                        # CPython joins a large buffer without the GIL: on a thread, the loop
                        # keeps answering while an 18 MB body is copied (tens of ms here)
                        return await asyncio.to_thread(b"".join, chunks)
        except TimeoutError:
            raise Rejected(408, f"the request body did not arrive within {self.body_timeout_s:g} s"
                                " (SOTA_SERVE_DEADLINE_S)", {"Connection": "close"}) from None

    def _too_big(self) -> Rejected:
        return Rejected(413, f"request body above the limit of {self.max_body_bytes:,} bytes"
                             " (SOTA_SERVE_MAX_BODY_BYTES)")

    def form(self, content_type: str, body: bytes, field: str) -> list[Part]:
        """The parts of a multipart body with at least one, and at most ``max_files``, file
        parts named ``field``."""
        if not content_type.startswith("multipart/form-data"):
            raise Rejected(415, "send images as multipart/form-data file parts (e.g. curl -F"
                                f" image=@photo.jpg); got content-type {content_type or 'none'!r}")
        separator = boundary(content_type)
        if separator is None:
            raise Rejected(400, "malformed multipart body: no boundary in the content-type")
        try:
            form = list(parts(body, separator, max_parts=self.max_files + MAX_OPTION_FIELDS))
        except MalformedRequestError as e:
            raise Rejected(e.http_status, str(e)) from e
        files = [p for p in form if p.name == field]
        for part in files:
            if not part.is_file:
                raise Rejected(400, f"field {part.name!r} must be a file upload; URLs and strings are not fetched")
        if len(files) > self.max_files:
            raise Rejected(413, f"more than {self.max_files} images in one request")
        if not files:
            raise Rejected(400, f"missing file field {field!r}")
        return form
