"""The Ray Serve application: ``serve run rayserve.app:app model=PACKAGE_OR_TAG [KEY=VALUE ...]``,
or ``import_path: rayserve.app:app`` in a Serve config file (deploy/ray/serve.yaml).

Each replica is what one ``bentoml serve`` worker is: it opens the package (every artifact's
sha256 checked against the card), loads and warms the model, and serves the HTTP contract
(sota_serve.http) over the serving pipeline: decode pool, batcher, TTA on the device, OOD
screen, admission with 503 + Retry-After. Ray's proxy routes each request to a replica; Ray
places the replicas on the cluster's nodes and scales their number on ongoing requests
(rayserve/args.py).
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from rayserve.args import AppArgs
from rayserve.metrics import ReplicaMetrics
from sota_serve.http.app import contract_app
from sota_serve.http.front_door import App
from sota_serve.http.oip import OpenInference
from sota_serve.http.routes import Routes
from sota_serve.package.loading import check_backend, open_package
from sota_serve.serving.admission import Admission
from sota_serve.serving.pipeline import Pipeline
from sota_serve.serving.settings import Settings

log = logging.getLogger("ray.serve.sota_serve")


@serve.deployment(name="sota_serve")
@serve.ingress()
class SotaServeReplica:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.ready = False
        self.settings = Settings(**settings)
        package = open_package(self.settings.model)  # raises IntegrityError on a sha256 mismatch
        check_backend(package, self.settings.backend)
        plan = self.settings.plan()
        self.metrics = ReplicaMetrics()
        self.admission = Admission(max_wait_s=self.settings.max_wait_s, max_in_flight=self.settings.max_in_flight,
                                   decode_threads=plan.decode_threads, model_threads=plan.model_threads,
                                   on_shed=self.metrics.count_shed)
        pipeline = Pipeline.build(package, self.settings, plan, self.admission, observer=self.metrics.observe_batch)
        oip = OpenInference(pipeline, backend=self.settings.backend, max_images=self.settings.max_batch_images,
                            ready=lambda: self.ready)
        self.routes = Routes()
        # no OpenAPI document: BentoML derives it from its API declarations (bento/openapi.py)
        self.routes.bind(pipeline, {}, oip)
        self.ready = True
        log.info("ready: serving %s on %s, %s (%s)", pipeline.card.tag, plan.device, pipeline.precision, plan)

    def __serve_build_asgi_app__(self) -> App:
        return contract_app(self.routes, self.admission, self.settings)

    def node_id(self) -> str:
        """The Ray node this replica runs on (through a deployment handle: which nodes serve)."""
        return ray.get_runtime_context().get_node_id()

    def check_health(self) -> None:
        if not self.ready:
            raise RuntimeError("the model is not loaded")


def app(args: dict[str, Any]) -> Application:
    """The application builder ``serve run`` and Serve config files name; ``args`` as
    :class:`rayserve.args.AppArgs` reads them."""
    parsed = AppArgs.parse(args)
    return SotaServeReplica.options(**parsed.deployment_options()).bind(parsed.replica_settings())
