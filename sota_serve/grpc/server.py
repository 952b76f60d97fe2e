"""The gRPC server of a front end's process: the inference and health services on one port,
on the event loop the caller runs (a ``grpc.aio`` server), so that its calls share that
process's pipeline, batcher and admission with HTTP.

The port is bound with SO_REUSEPORT: every worker process of a server binds the same port,
and the kernel spreads connections across them, as it does for the HTTP port. The largest
message a call may carry is the HTTP body limit (SOTA_SERVE_MAX_BODY_BYTES), not gRPC's
4 MiB default, so that what REST accepts gRPC accepts too. Each call is counted by method
and status code (``on_call``), and a typed error becomes its status (sota_serve/grpc/status.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from sota_serve.errors import SotaServeError
from sota_serve.grpc.health import Health
from sota_serve.grpc.protos import HEALTH_SERVICE, INFERENCE_SERVICE
from sota_serve.grpc.servicer import InferenceServicer
from sota_serve.grpc.status import Status
from sota_serve.log_text import one_line
from sota_serve.oip.model import ServedModels
from sota_serve.serving.admission import Admission

log = logging.getLogger("sota_serve.grpc")
#: (method, status code name) of each finished call
CallObserver = Callable[[str, str], None]
#: what the server binds: every address, IPv6 and IPv4
HOST = "[::]"


class GrpcServer:
    def __init__(self, models: ServedModels, admission: Admission, *, max_message_bytes: int, hold_s: float,
                 on_call: CallObserver | None = None) -> None:
        self.inference = InferenceServicer(models, admission, hold_s=hold_s)
        self.health = Health(models.ready)
        self.on_call = on_call
        self.server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),  # answers are small; a client sets its own bound
        ])
        self.server.add_generic_rpc_handlers((
            self._service(INFERENCE_SERVICE, self.inference.handlers()),
            self._service(HEALTH_SERVICE, self.health.handlers()),
        ))

    async def start(self, port: int) -> None:
        """Serve on ``port``; raises RuntimeError when it cannot be bound."""
        self.server.add_insecure_port(f"{HOST}:{port}")
        await self.server.start()

    async def stop(self, grace_s: float) -> None:
        """Health answers NOT_SERVING (the caller's readiness has turned false), calls in
        flight get up to ``grace_s`` to finish, new ones are refused."""
        self.health.changed()
        await self.server.stop(grace_s)

    def _service(self, service: ServiceDescriptor, handlers: dict[str, Any]) -> grpc.GenericRpcHandler:
        return generic_handler(service, {
            name: self._streamed(name, handler) if _streaming(service, name) else self._answered(name, handler)
            for name, handler in handlers.items()})

    def _answered(self, method: str, handler: Any) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._outcome(method, context):
                return await handler(request, context)

        return call

    def _streamed(self, method: str, handler: Any) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._outcome(method, context):
                async for response in handler(request, context):
                    yield response

        return call

    @contextlib.asynccontextmanager
    async def _outcome(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Around one call: a typed error ends it with its status, and the call is counted by
        the code it ended with."""
        code = grpc.StatusCode.UNKNOWN
        try:
            yield
            code = grpc.StatusCode.OK
        except SotaServeError as e:
            status = Status.of(e)
            code = status.code
            await _abort(context, method, status)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self._count(method, code)

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        if self.on_call is not None:
            self.on_call(method, code.name)


def generic_handler(service: ServiceDescriptor, behaviors: dict[str, Any]) -> grpc.GenericRpcHandler:
    """The handler of ``service``'s calls, each by the behavior of its name (a coroutine
    function, an async generator function for a server-streaming call), its messages read and
    written with the classes its descriptor names."""
    methods = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        methods[method.name] = make(behaviors[method.name], request.FromString, response.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, methods)


def add_inference_service(servicer: Any, server: grpc.Server) -> None:
    """Add ``inference.GRPCInferenceService`` to ``server``, each call served by the method of
    ``servicer`` named as the call: the ``add_..._to_server`` function protoc would write, for
    Ray Serve's ``grpc_options.grpc_servicer_functions`` (its proxy reads the messages and
    forwards them to the ingress deployment's methods of those names)."""
    server.add_generic_rpc_handlers((generic_handler(
        INFERENCE_SERVICE, {m.name: getattr(servicer, m.name) for m in INFERENCE_SERVICE.methods}),))


def _streaming(service: ServiceDescriptor, name: str) -> bool:
    return service.methods_by_name[name].server_streaming


async def _abort(context: grpc.aio.ServicerContext, method: str, status: Status) -> None:
    """End the call with ``status`` (raises grpc's AbortError, which ends it)."""
    if status.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
        # a client's mistake is worth a line, not a traceback
        log.warning("gRPC %s -> %s: %s", method, status.code.name, one_line(status.details))
    await context.abort(status.code, status.details, trailing_metadata=status.trailers)

