"""The service's own metrics on a replica, through Ray's metrics API (Ray exports them with
its own ``ray_`` prefix: ``ray_sota_serve_shed_total``, ``ray_sota_serve_batch_images``...),
the same names and meaning as under BentoML (bento/metrics.py)."""

from __future__ import annotations

from ray.serve import metrics

from sota_serve.serving.batcher import IMAGES_BUCKETS, SECONDS_BUCKETS
from sota_serve.serving.fallback import TTA_ANSWERS


class ReplicaMetrics:
    """Created in the replica (Ray's metrics belong to the process that records them)."""

    def __init__(self) -> None:
        self.shed = metrics.Counter("sota_serve_shed", description="Requests answered 503 with Retry-After",
                                    tag_keys=("reason",))
        self.images = metrics.Histogram("sota_serve_batch_images", description="Images per device call",
                                        boundaries=list(IMAGES_BUCKETS),
                                        tag_keys=("crops_per_image",))
        self.seconds = metrics.Histogram("sota_serve_batch_seconds", description="Seconds per device call",
                                         boundaries=list(SECONDS_BUCKETS),
                                         tag_keys=("crops_per_image",))
        self.grpc = metrics.Counter("sota_serve_grpc_requests", description="gRPC calls by method and status code",
                                    tag_keys=("method", "code"))
        self.tta = metrics.Counter("sota_serve_tta_answers", description=TTA_ANSWERS, tag_keys=("requested", "served"))

    def count_shed(self, reason: str) -> None:
        self.shed.inc(tags={"reason": reason})

    def count_grpc(self, method: str, code: str) -> None:
        self.grpc.inc(tags={"method": method, "code": code})

    def count_tta(self, requested: str, served: str) -> None:
        self.tta.inc(tags={"requested": requested, "served": served})

    def observe_batch(self, k: int, images: int, crops: int, seconds: float) -> None:
        tags = {"crops_per_image": str(k)}
        self.images.observe(images, tags=tags)
        self.seconds.observe(seconds, tags=tags)
