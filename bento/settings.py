"""Service settings, read once from ``SOTA_SERVE_*`` environment variables."""

from __future__ import annotations

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from sota_serve.constants import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from sota_serve.errors import SotaServeError

DEFAULT_MODEL = "sota-demo:latest"


class Settings(BaseSettings):
    """Every knob of the service; the README's "Configuration" table lists them."""

    model_config = SettingsConfigDict(env_prefix="SOTA_SERVE_", extra="ignore")

    #: BentoML model tag, or a package directory
    model: str = DEFAULT_MODEL
    backend: str = Field(default="onnx", pattern="^(onnx|torchscript)$")
    device: str = Field(default="auto", pattern="^(auto|cpu|cuda)$")
    #: images per device batch (plain); five-crop batches hold max_batch_size_tta images = 5x crops
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    max_batch_size_tta: int = Field(default=8, ge=1, le=256)
    #: BentoML's batcher refuses (503) a request whose estimated wait exceeds this, so it must
    #: sit well above the model's time for one full batch (xresnet50 on 2 CPU cores: 1.5 s for
    #: 32 images). It is not a wait added to requests; overload is bounded by max_in_flight
    #: and deadline_s instead.
    max_latency_ms: int = Field(default=5000, ge=1, le=60_000)
    #: ORT / torch intra-op threads of the inference worker (default: all cores)
    threads: int | None = Field(default=None, ge=1, le=256)
    #: request body limit (all files of a request together)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BYTES + 1024 * 1024, ge=1024)
    #: per-image limits
    max_image_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=1)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    max_batch_images: int = Field(default=64, ge=1, le=1024)
    jpeg_draft: bool = False
    #: requests being decoded or queued at once; more get 503 + Retry-After at once
    max_in_flight: int = Field(default=256, ge=1)
    #: a request still waiting for the model after this long is dropped with 503
    deadline_s: float = Field(default=20.0, gt=0)
    #: CPU-side decode/preprocess processes of the API service
    api_workers: int = Field(default=1, ge=1, le=64)


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as e:
        problems = "; ".join(
            f"SOTA_SERVE_{str(err['loc'][0]).upper()}: {err['msg']}" for err in e.errors()
        )
        raise SotaServeError(f"invalid service settings: {problems}") from e

