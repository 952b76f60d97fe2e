"""``grpc.health.v1.Health``, the health service gRPC's tools and Kubernetes' gRPC probes ask:
SERVING while the server takes inference requests, NOT_SERVING while it drains, for the
server as a whole (``""``) and for ``inference.GRPCInferenceService``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sota_serve.errors import SotaServeError
from sota_serve.grpc.protos import INFERENCE_SERVICE, HealthCheckResponse, message

SERVICES = ("", INFERENCE_SERVICE.full_name)


class UnknownServiceError(SotaServeError):
    http_status = 404


class Health:
    def __init__(self, ready: Callable[[], bool]) -> None:
        """``ready``: whether the server takes inference requests; call :meth:`changed` when
        that changes, for the watchers."""
        self.ready = ready
        self._change = asyncio.Event()

    def handlers(self) -> dict[str, Callable[[Any, Any], Awaitable[Any] | AsyncIterator[Any]]]:
        return {"Check": self.check, "List": self.list, "Watch": self.watch}

    def changed(self) -> None:
        """Wake the watchers: readiness changed."""
        self._change.set()
        self._change = asyncio.Event()

    def status(self, service: str) -> int:
        if service not in SERVICES:
            return HealthCheckResponse.SERVICE_UNKNOWN
        return HealthCheckResponse.SERVING if self.ready() else HealthCheckResponse.NOT_SERVING

    async def check(self, request: Any, context: Any) -> Any:
        if request.service not in SERVICES:
            raise UnknownServiceError(f"no service {request.service!r} here; ask for '' (the server) or"
                                      f" {INFERENCE_SERVICE.full_name!r}")
        return HealthCheckResponse(status=self.status(request.service))

    async def list(self, request: Any, context: Any) -> Any:
        response = _List()
        for service in SERVICES:
            response.statuses[service].status = self.status(service)
        return response

    async def watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        """The status now, then each change, until the client goes away or the server stops."""
        last = None
        while True:
            change = self._change
            status = self.status(request.service)
            if status != last:
                yield HealthCheckResponse(status=status)
                last = status
            await change.wait()


_List = message("grpc.health.v1.HealthListResponse")
