"""Prometheus metrics of the in-process batcher, the admission policy and the gRPC calls (on
``/metrics``).

BentoML's own ``bentoml_service_adaptive_batch_size`` is not used any more (the service does
its own batching); these count images and crops, not requests.
"""

from __future__ import annotations

import bentoml

from sota_serve.serving.batcher import IMAGES_BUCKETS, SECONDS_BUCKETS
from sota_serve.serving.fallback import TTA_ANSWERS

BATCH_IMAGES = bentoml.metrics.Histogram(
    name="sota_serve_batch_images", documentation="Images per device call",
    labelnames=["crops_per_image"], buckets=IMAGES_BUCKETS)
BATCH_SECONDS = bentoml.metrics.Histogram(
    name="sota_serve_batch_seconds", documentation="Seconds per device call",
    labelnames=["crops_per_image"], buckets=SECONDS_BUCKETS)
SHED = bentoml.metrics.Counter(
    name="sota_serve_shed", documentation="Requests answered 503 with Retry-After", labelnames=["reason"])
GRPC = bentoml.metrics.Counter(name="sota_serve_grpc_requests", documentation="gRPC calls by method and status code",
                               labelnames=["method", "code"])
TTA = bentoml.metrics.Counter(name="sota_serve_tta_answers", documentation=TTA_ANSWERS,
                              labelnames=["requested", "served"])
MODEL_RSS = bentoml.metrics.Gauge(
    name="sota_serve_model_rss_bytes", labelnames=["model", "version"],
    documentation="Resident memory a model version added to its worker when it loaded (0 once unloaded)")


def observe_batch(k: int, images: int, crops: int, seconds: float) -> None:
    BATCH_IMAGES.labels(crops_per_image=str(k)).observe(images)
    BATCH_SECONDS.labels(crops_per_image=str(k)).observe(seconds)


def count_tta(requested: str, served: str) -> None:
    TTA.labels(requested=requested, served=served).inc()


def count_shed(reason: str) -> None:
    SHED.labels(reason=reason).inc()


def model_memory(model: str, version: str, rss_bytes: int) -> None:
    MODEL_RSS.labels(model=model, version=version).set(rss_bytes)


def count_grpc(method: str, code: str) -> None:
    GRPC.labels(method=method, code=code).inc()
