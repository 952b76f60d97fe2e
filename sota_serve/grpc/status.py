"""Typed errors as gRPC status codes, in one place. The code follows the status a REST client
gets for the same error (the error's ``http_status``), and the details are the same message:

- 400, 415, 422 (a request or an image that cannot be served) -> INVALID_ARGUMENT
- 404 (another model, an unknown health service) -> NOT_FOUND
- 413 (too many bytes, pixels or values) -> RESOURCE_EXHAUSTED; a message over the server's
  limit (SOTA_SERVE_MAX_BODY_BYTES) gets the same code from gRPC itself, before it is read
- 503 (shedding load, a strict budget refused) -> UNAVAILABLE, with REST's ``Retry-After`` as
  the trailing metadata ``retry-after`` (seconds), which a client reads from the error
- anything else a sota-serve error carries -> INTERNAL
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from sota_serve.errors import OverloadedError, SotaServeError

#: the trailing metadata key of the seconds to wait before retrying an UNAVAILABLE call
RETRY_AFTER = "retry-after"

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}


@dataclass(frozen=True)
class Status:
    """How a call ends when it fails: code, details and trailing metadata (a value, so that it
    can travel between processes: from a Ray Serve model replica to its ingress)."""

    code: grpc.StatusCode
    details: str
    trailers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, error: SotaServeError) -> Status:
        return cls(status_of(error), str(error), trailers(error))


def status_of(error: SotaServeError) -> grpc.StatusCode:
    return _CODES.get(error.http_status, grpc.StatusCode.INTERNAL)


def trailers(error: SotaServeError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of ``error``'s status: ``retry-after`` for an overload."""
    if isinstance(error, OverloadedError):
        return ((RETRY_AFTER, str(error.retry_after_s)),)
    return ()
