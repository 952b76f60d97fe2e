"""The Open Inference Protocol over gRPC beside HTTP under ``bentoml serve``, on
``SOTA_SERVE_GRPC_PORT`` (off unless set).

Every worker process serves the port: its gRPC server (sota_serve/grpc/server.py) runs on the
worker's event loop, started by the service's startup hook once the model is loaded and
stopped by its shutdown hook (BentoML's ``@bentoml.on_startup`` / ``@bentoml.on_shutdown``),
and binds the port with SO_REUSEPORT, so that all workers share it as they share the HTTP one.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import TYPE_CHECKING

from bento.metrics import count_grpc
from sota_serve.http.oip import OpenInference
from sota_serve.serving.admission import Admission
from sota_serve.serving.settings import Settings

if TYPE_CHECKING:
    from sota_serve.grpc.server import GrpcServer

log = logging.getLogger("bentoml.sota_serve")
#: seconds calls in flight get to finish when the worker stops
GRACE_S = 5.0


class GrpcPort:
    def __init__(self, settings: Settings, admission: Admission) -> None:
        """Exits with one line when the port is held by another program: a worker that could
        not bind it would fail its startup, and be started again, forever."""
        self.settings, self.admission = settings, admission
        self.server: GrpcServer | None = None
        if settings.grpc_port is not None:
            _check_free(settings.grpc_port)

    async def start(self, oip: OpenInference | None) -> None:
        """Serve ``oip``'s model on the port, when one is set."""
        port = self.settings.grpc_port
        if port is None or oip is None:
            return
        from sota_serve.grpc.server import GrpcServer  # grpc is imported where the port is on only

        self.server = GrpcServer(oip.models, self.admission, max_message_bytes=self.settings.max_body_bytes,
                                 hold_s=self.settings.admission_hold_s, on_call=count_grpc)
        await self.server.start(port)
        log.info("gRPC (Open Inference Protocol, health) on port %d", port)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(GRACE_S)
            self.server = None


def _check_free(port: int) -> None:
    """Bind ``port`` as gRPC will (SO_REUSEPORT): it succeeds beside this server's other workers,
    and fails where another program holds the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise SystemExit(f"sota-serve: cannot serve: SOTA_SERVE_GRPC_PORT={port} is in use by another"
                             " program; stop it, or set another port") from None
