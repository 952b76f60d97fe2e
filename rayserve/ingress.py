"""The HTTP contract at the ingress, in front of the model replicas it calls through a handle.

The ingress answers HTTP the way the front door does (sota_serve/http/front_door.py): every
4xx is ``{"error": ...}`` and every 503 carries ``Retry-After``; the body limits hold for every
POST (413, 408) and the image routes' multipart forms are parsed here (415, 400). What needs
the model goes to a model replica as a decoded request: the GET routes as path and query,
the image routes as their form parts, ``infer`` as its headers and body. The model replica's
admission sheds there, with 503 + Retry-After, before any image is decoded.

A model replica can die with a request in hand (its node lost, its process killed). The
image routes and ``infer`` are idempotent, so such a call is tried once more, on another
replica (Ray's router drops a replica it saw die); if that fails too, or no replica is left,
the answer is 503 with Retry-After rather than a 500.

The Open Inference Protocol's gRPC calls (through Ray Serve's gRPC proxy) take the same way:
the message limit here, the call in a model replica, UNAVAILABLE with ``retry-after`` where
HTTP gets 503 with Retry-After.

When every model replica has its ``max_ongoing_requests`` and Ray's router here already holds
``max_queued_requests`` for them, the router refuses the call at once (BackPressureError): the
answer is 503 with Retry-After, and the body never goes to a model replica. Any other
exception, a model replica's included (Ray raises it here as a RayTaskError), is a JSON 500,
its traceback in the ingress's log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from sota_serve.contract.requests import FILE_FIELDS
from sota_serve.errors import OverloadedError
from sota_serve.grpc.status import Status
from sota_serve.http.app import unrouted
from sota_serve.http.errors import Answer, error_body, log_answer, retry_later
from sota_serve.http.front_door import Receive, Scope, header_map
from sota_serve.http.limits import Limits, Rejected
from sota_serve.http.oip import OpenInference
from sota_serve.http.routes import model_route

log = logging.getLogger("ray.serve.sota_serve")

#: seconds a client is told to wait when no model replica could answer: about the time Ray
#: takes to notice a lost replica and route around it
UNAVAILABLE_RETRY_S = 2
#: seconds a client is told to wait when the router's queue for the model replicas is full:
#: the requests in it reach a replica within about two batch times
QUEUE_FULL_RETRY_S = 1
#: what a model replica died with, as the caller of its handle sees it: the actor's death
#: (ActorDiedError) or a lost connection to it (ActorUnavailableError), both RayActorError;
#: Serve's own when the chosen replica is gone or the deployment has none
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)

#: a model replica's method by name, called through the deployment handle
Call = Callable[..., Awaitable[Any]]
#: the answer to a request no model replica could take: (why, seconds to wait) -> answer
Refuse = Callable[[str, int], Any]


class Ingress:
    """The HTTP contract of an ingress replica; ``call(method, *args)`` awaits a model
    replica's method through the deployment handle."""

    def __init__(self, call: Call, limits: Limits, timeout_s: float,
                 on_shed: Callable[[str], None] | None = None) -> None:
        self.call, self.limits, self.timeout_s, self.on_shed = call, limits, timeout_s, on_shed

    async def handle(self, scope: Scope, receive: Receive) -> Answer:
        """The answer to one HTTP request (``scope``, its body from ``receive``): never an
        exception, so that no client gets Ray's plain-text 500."""
        method, path = scope["method"], scope["path"]
        root = scope.get("root_path", "")  # Ray's route prefix, which the path includes
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        try:
            answer = await self.answer(scope, receive, method, path)
        except Exception as e:  # noqa: BLE001 - the contract's JSON error instead of Ray's text
            log.exception("%s %s failed", method, path)
            return 500, {}, error_body(f"internal server error ({_kind(e)}); the ingress's log has the traceback")
        log_answer(f"{method} {path}", answer)  # every 4xx one warning line, as under bentoml serve
        return answer

    async def answer(self, scope: Scope, receive: Receive, method: str, path: str) -> Answer:
        if method in ("GET", "HEAD"):
            answer = await self.forward("get", path, scope.get("query_string", b""))
            return answer if answer is not None else unrouted(method, path)
        if method != "POST":
            return unrouted(method, path)
        headers = header_map(scope)
        try:  # the body limit holds for every POST, not only the image routes
            body = await self.limits.read(headers, receive)
            field = FILE_FIELDS.get(model_route(path)[1])
            if field:
                form = self.limits.form(headers.get("content-type", ""), body, field)
                return await self.forward("post", path, form, len(body))
        except Rejected as e:
            return e.answer()
        if OpenInference.is_infer(path):
            return await self.forward("infer", path, headers, body)
        if OpenInference.is_repository(path):
            return await self.forward("repository", path)
        if model_route(path)[1] == "/card":  # under BentoML an API method, so POST too
            return await self.forward("get", path, b"")
        return unrouted(method, path)

    async def forward(self, method: str, *args: Any, refuse: Refuse = retry_later) -> Any:
        """A model replica's answer; one more try on another replica if the first died with
        the request (every forwarded route is idempotent), then 503 with Retry-After
        (``refuse``'s answer to why and the seconds to wait). The tries together take at most
        ``timeout_s``: with no model replica left, Ray's router waits for one, and the client
        is told to come back rather than left waiting."""
        try:
            return await asyncio.wait_for(self._tries(method, *args, refuse=refuse), self.timeout_s)
        except TimeoutError:
            log.warning("no model replica answered %s within %.0f s", method, self.timeout_s)
            return refuse(f"no model replica answered within {self.timeout_s:.0f}s", UNAVAILABLE_RETRY_S)

    async def _tries(self, method: str, *args: Any, refuse: Refuse) -> Any:
        for attempt in (1, 2):
            try:
                return await self.call(method, *args)
            except BackPressureError:  # raised here, in the router, before anything is sent (Ray logs it)
                if self.on_shed is not None:
                    self.on_shed("router_queue")
                return refuse("server busy: every model replica is at its max_ongoing_requests and"
                              " this ingress already queues max_queued_requests for them", QUEUE_FULL_RETRY_S)
            except REPLICA_LOST as e:
                log.warning("a model replica was lost during %s (try %d of 2): %s", method, attempt,
                            type(e).__name__)
        return refuse("no model replica could answer (a node was lost)", UNAVAILABLE_RETRY_S)

    async def grpc(self, method: str, request: Any) -> Any:
        """A ``GRPCInferenceService`` call's response, or the :class:`Status` it fails with:
        a ModelInfer message over the body limit is refused here, as an HTTP body is (Ray's
        proxy reads messages up to 2 GiB); the call goes to a model replica as ``forward``
        sends a route, its failures UNAVAILABLE with ``retry-after``."""
        if method == "ModelInfer" and (size := request.ByteSize()) > self.limits.max_body_bytes:
            return Status(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request of {size:,} bytes above the limit of"
                                                              f" {self.limits.max_body_bytes:,} bytes (SOTA_SERVE_MAX_BODY_BYTES)")
        return await self.forward("grpc", method, request, refuse=_unavailable)


def _unavailable(why: str, retry_after_s: int) -> Status:
    """What a gRPC call gets where HTTP gets :func:`retry_later`'s 503."""
    return Status.of(OverloadedError(f"{why}; retry after {retry_after_s}s", retry_after_s=retry_after_s))



def _kind(e: BaseException) -> str:
    """The exception's own type: a model replica's, not Ray's wrapper (RayTaskError(TypeError))."""
    cause = getattr(e, "cause", None)
    return type(cause if isinstance(cause, BaseException) else e).__name__
