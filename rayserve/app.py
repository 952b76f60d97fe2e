"""The Ray Serve application: ``serve run rayserve.app:app model=PACKAGE_OR_TAG [KEY=VALUE ...]``,
or ``import_path: rayserve.app:app`` in a Serve config file (deploy/ray/serve.yaml).

Two deployments, composed through a deployment handle:

- ``sota_serve_ingress``, light replicas that hold the HTTP contract (limits, multipart
  parsing, JSON errors: rayserve/ingress.py), and the Open Inference Protocol's gRPC calls that
  Ray's gRPC proxy hands them (``grpc_options``), and forward each decoded request to a model
  replica; when the model replica dies with the request in hand (its node lost), the ingress
  tries another once and otherwise answers 503 with Retry-After, never 500;
- ``sota_serve``, the model replicas, each what one ``bentoml serve`` worker is: it opens the
  package (every artifact's sha256 checked against the card), loads and warms the model, and
  runs the serving pipeline (decode pool, batcher, TTA on the device, OOD screen) behind its
  admission, which sheds with 503 + Retry-After before decoding.

Ray's proxy routes each request to an ingress replica, the ingress's handle to a model
replica; Ray places the replicas on the cluster's nodes and scales the model replicas on
ongoing requests (rayserve/args.py). A model replica takes ``max_ongoing_requests`` at a time;
the handle's router holds up to ``max_queued_requests`` more at the ingress and refuses the
next at once, which the ingress answers 503 + Retry-After before the body goes on.

The builder checks the placement against the cluster it is connected to and refuses, in one
line, replicas its nodes cannot hold (they would stay pending, and every request would wait).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import click
import ray
from ray import serve
from ray.serve import Application
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from rayserve.args import AppArgs
from rayserve.ingress import Ingress
from rayserve.metrics import ReplicaMetrics
from sota_serve.errors import OverloadedError
from sota_serve.grpc.protos import empty_response
from sota_serve.grpc.servicer import InferenceServicer
from sota_serve.grpc.status import Status
from sota_serve.http.errors import Answer, retry_later
from sota_serve.http.limits import Limits
from sota_serve.http.multipart import Part
from sota_serve.http.oip import OpenInference
from sota_serve.http.openapi import document
from sota_serve.http.routes import Routes
from sota_serve.oip.model import ServedModels
from sota_serve.package.loading import ModelPackage, check_backend, open_package
from sota_serve.package.repository import Entry, scan
from sota_serve.serving.admission import Admission, Ticket
from sota_serve.serving.models import Models
from sota_serve.serving.settings import Settings

log = logging.getLogger("ray.serve.sota_serve")
#: the namespace ``serve run`` connects in (ray.serve._private.constants.SERVE_NAMESPACE)
SERVE_NAMESPACE = "serve"
#: seconds the ingress allows beyond a model replica's own bounds for the hops to and from it
FORWARD_MARGIN_S = 2.0


@serve.deployment(name="sota_serve")
class SotaServeModel:
    """A model replica: the routes' answers over the serving pipeline, behind admission."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.ready = False
        self.settings = Settings(**settings)
        plan = self.settings.plan()
        self.metrics = ReplicaMetrics()
        self.admission = Admission(max_wait_s=self.settings.max_wait_s, max_in_flight=self.settings.max_in_flight,
                                   decode_threads=plan.decode_threads, model_threads=plan.model_threads,
                                   on_shed=self.metrics.count_shed)
        # every model of the repository in each replica, as in each `bentoml serve` worker; not
        # loaded or unloaded through the API: a call reaches one replica of many
        self.models = Models.serving(self.settings, plan, self.admission, opener=self._open,
                                     observer=self.metrics.observe_batch, on_tta=self.metrics.count_tta, explicit=False)
        self.models.load_all(scan(self.settings.model))
        oip = OpenInference(ServedModels(self.models, backend=self.settings.backend,
                                         max_images=self.settings.max_batch_images, ready=lambda: self.ready))
        self.routes = Routes()
        default = self.models.default.pipeline
        self.routes.bind(self.models, document(default.card, self.settings, self.models.names()), oip)
        self.servicer = InferenceServicer(oip.models, self.admission, hold_s=self.settings.admission_hold_s)
        self.ready = True
        log.info("ready: serving %s on %s, %s (%s)", self.models, plan.device, default.precision, plan)

    def _open(self, entry: Entry) -> ModelPackage:
        package = open_package(entry.source)  # raises IntegrityError on a sha256 mismatch
        check_backend(package, self.settings.backend)
        return package

    async def get(self, path: str, query: bytes) -> Answer | None:
        """``GET path``'s answer, or None when no route takes it."""
        return self.routes.get(path, query)

    async def post(self, path: str, form: Sequence[Part], nbytes: int) -> Answer:
        """An image route's answer from its parsed form of ``nbytes``."""
        return await self._admitted(nbytes, lambda ticket: self.routes.post(path, form, ticket))

    async def infer(self, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        """An Open Inference Protocol ``infer`` answer."""
        assert self.routes.oip is not None
        oip = self.routes.oip
        return await self._admitted(len(body), lambda ticket: oip.infer(path, headers, body, ticket))

    async def repository(self, path: str) -> Answer:
        """The repository extension's answer (the index; loading and unloading are refused: a
        call reaches one replica of many, so the cluster changes its models by a new deploy)."""
        assert self.routes.oip is not None
        return await self.routes.oip.repository(path)

    async def grpc(self, method: str, request: Any) -> Any:
        """A ``GRPCInferenceService`` call's response, or the Status of its typed error."""
        return await self.servicer.respond(method, request)

    async def _admitted(self, nbytes: int, work: Callable[[Ticket], Awaitable[Answer]]) -> Answer:
        """``work(ticket)``'s answer once admission lets the request in; 503 with Retry-After
        when this replica's queue cannot serve it in time (before anything is decoded)."""
        try:
            ticket: Ticket = await self.admission.wait_enter(nbytes, self.settings.admission_hold_s)
        except OverloadedError as e:
            return retry_later(str(e), e.retry_after_s)
        try:
            return await work(ticket)
        finally:
            self.admission.leave(ticket)

    def node_id(self) -> str:
        """The Ray node this replica runs on (through a deployment handle: which nodes serve)."""
        return ray.get_runtime_context().get_node_id()

    def check_health(self) -> None:
        if not self.ready:
            raise RuntimeError("the model is not loaded")


@serve.deployment(name="sota_serve_ingress")
class SotaServeIngress:
    """An ingress replica: the HTTP contract, forwarding to the model replicas. Ray Serve's
    documented HTTP form: ``__call__`` takes the Starlette request (whose ``receive`` streams
    the body through the limits) and returns a Starlette response."""

    def __init__(self, model: DeploymentHandle, settings: dict[str, Any]) -> None:
        self.model = model
        parsed = Settings(**settings)
        limits = Limits(max_body_bytes=parsed.max_body_bytes, body_timeout_s=parsed.deadline_s,
                        max_files=parsed.max_batch_images)
        # a model replica answers within its wait at the door and its deadline (it drops a
        # request still queued after that with 503); the margin covers the two hops
        self.metrics = ReplicaMetrics()  # the requests its router sheds, as sota_serve_shed
        self.front = Ingress(self._call, limits, parsed.admission_hold_s + parsed.deadline_s + FORWARD_MARGIN_S,
                             on_shed=self.metrics.count_shed)

    async def _call(self, method: str, *args: Any) -> Any:
        return await getattr(self.model, method).remote(*args)

    async def __call__(self, request: Request) -> Response:
        status, headers, body = await self.front.handle(request.scope, request.receive)
        headers = {k.lower(): v for k, v in headers.items()}
        headers.setdefault("content-type", "application/json")
        headers["content-length"] = str(len(body))  # a HEAD answer's too, without the body
        return Response(b"" if request.method == "HEAD" else body, status_code=status, headers=headers)

    # The Open Inference Protocol over gRPC, through Ray Serve's gRPC proxy (grpc_options in
    # deploy/ray/serve.yaml): the proxy calls the ingress's method named as the call.
    async def ServerLive(self, request: Any, grpc_context: RayServegRPCContext) -> Any:
        return await self._grpc("ServerLive", request, grpc_context)

    async def ServerReady(self, request: Any, grpc_context: RayServegRPCContext) -> Any:
        return await self._grpc("ServerReady", request, grpc_context)

    async def ModelReady(self, request: Any, grpc_context: RayServegRPCContext) -> Any:
        return await self._grpc("ModelReady", request, grpc_context)

    async def ServerMetadata(self, request: Any, grpc_context: RayServegRPCContext) -> Any:
        return await self._grpc("ServerMetadata", request, grpc_context)

    async def ModelMetadata(self, request: Any, grpc_context: RayServegRPCContext) -> Any:
        return await self._grpc("ModelMetadata", request, grpc_context)

    async def ModelInfer(self, request: Any, grpc_context: RayServegRPCContext) -> Any:
        return await self._grpc("ModelInfer", request, grpc_context)

    async def _grpc(self, method: str, request: Any, context: RayServegRPCContext) -> Any:
        """The call's response; a failed call's status set on ``context`` (with an empty
        response, which the client does not see), counted by method and code."""
        outcome = await self.front.grpc(method, request)
        if not isinstance(outcome, Status):
            self.metrics.count_grpc(method, "OK")
            return outcome
        context.set_code(outcome.code)
        context.set_details(outcome.details)
        context.set_trailing_metadata(list(outcome.trailers))
        self.metrics.count_grpc(method, outcome.code.name)
        return empty_response(method)

    def node_id(self) -> str:
        """The Ray node this ingress replica runs on."""
        return ray.get_runtime_context().get_node_id()


def app(args: dict[str, Any]) -> Application:
    """The application builder ``serve run`` and Serve config files name; ``args`` as
    :class:`rayserve.args.AppArgs` reads them, fitted to the cluster (ArgsError, in one line,
    for replicas its nodes cannot hold)."""
    parsed = AppArgs.parse(args).fit(cluster_nodes())
    settings = parsed.replica_settings()
    model = SotaServeModel.options(**parsed.deployment_options()).bind(settings)
    return SotaServeIngress.options(**parsed.ingress_options()).bind(model, settings)


def cluster_nodes() -> list[dict[str, float]] | None:
    """The total resources of each live node of the cluster this process is connected to;
    None when it is not connected (and is not ``serve run``, which connects for it)."""
    if not ray.is_initialized() and not _connect_as_serve_run():
        log.warning("not connected to Ray: the placement is not checked against the cluster")
        return None
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def _connect_as_serve_run() -> bool:
    """``serve run IMPORT_PATH`` calls the builder before it connects to Ray
    (ray/serve/scripts.py), then keeps a connection it finds: connect here as it would, with
    its ``--address`` (default RAY_ADDRESS, else the cluster ``ray start`` began, else a new
    local one) in Serve's namespace, so the placement is checked against that cluster. With a
    runtime environment (``--working-dir``, ``--runtime-env``) ``serve run`` connects itself."""
    context = click.get_current_context(silent=True)
    if context is None or context.info_name != "run" or "address" not in context.params:
        return False
    params = context.params
    if params.get("runtime_env") or params.get("runtime_env_json") or params.get("working_dir"):
        return False
    ray.init(address=params["address"], namespace=SERVE_NAMESPACE)
    return True
