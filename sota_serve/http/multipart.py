"""multipart/form-data bodies split into parts with ``bytes.find`` (C speed), no copy of the
body beyond one slice per part.

The image routes receive a few parts (one or more files, ``tta``, ``top_k``) in a body that
is already in memory (the guard buffers it to enforce the size limit), so a streaming parser
costs more than it saves: python-multipart's callbacks took about 5 % of the event loop per
request under load (py-spy, demo model).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

from sota_serve.errors import MalformedRequestError

_DISPOSITION = re.compile(rb"(?im)^content-disposition:\s*form-data\s*;(.*)$")
_NAME = re.compile(rb'(?i)(?:^|;)\s*name="([^"]*)"')
_FILENAME = re.compile(rb"(?i)(?:^|;)\s*filename\*?=")
#: A part's header lines (Content-Disposition, Content-Type) take a few hundred bytes; a
#: browser's longest file name is 255. Past this bound a header is not a form's.
MAX_PART_HEADER_BYTES = 16 * 1024


@dataclass(frozen=True)
class Part:
    name: str
    is_file: bool  # sent with a filename (curl -F field=@file), not as a text value
    content: bytes

    def text(self) -> str:
        return self.content.decode("utf-8", "replace").strip()


def boundary(content_type: str) -> bytes | None:
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    return match.group(1).encode("latin-1") if match else None


class TooManyPartsError(MalformedRequestError):
    """A multipart body with more parts than a form of this route can have."""

    http_status = 413


def parts(body: bytes, boundary: bytes, *, max_parts: int = 1024) -> Iterator[Part]:
    """Each named part of ``body``, in order; raises :class:`MalformedRequestError` (400), or
    :class:`TooManyPartsError` (413) past ``max_parts`` parts. Both bounds (parts, and bytes
    per part header) keep the work of one body on the event loop small, whatever it holds."""
    delimiter = b"--" + boundary
    pos = body.find(delimiter)
    if pos == -1:
        raise MalformedRequestError("malformed multipart body: the boundary does not occur in it")
    for _ in range(max_parts + 1):
        start = pos + len(delimiter)
        if body[start : start + 2] == b"--":  # closing delimiter
            return
        end = body.find(b"\r\n\r\n", start, start + MAX_PART_HEADER_BYTES + 4)
        if end == -1:
            if len(body) - start > MAX_PART_HEADER_BYTES:
                raise MalformedRequestError(f"malformed multipart body: a part's header is longer than"
                                            f" {MAX_PART_HEADER_BYTES:,} bytes")
            raise MalformedRequestError("malformed multipart body: a part has no header end")
        nxt = body.find(b"\r\n" + delimiter, end + 2)
        if nxt == -1:
            raise MalformedRequestError("malformed multipart body: no closing boundary (truncated upload?)")
        disposition = _DISPOSITION.search(body[start:end])
        name = _NAME.search(disposition.group(1)) if disposition else None
        if disposition and name:
            yield Part(name.group(1).decode("utf-8", "replace"), bool(_FILENAME.search(disposition.group(1))),
                       body[end + 4 : nxt])
        pos = nxt + 2
    raise TooManyPartsError(f"more than {max_parts} parts in one multipart body; a form here has its"
                            " file parts and a few option fields")


def field_value(text: str) -> object:
    """A value field as BentoML reads it: JSON when it parses as JSON (as its clients send
    values), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text
