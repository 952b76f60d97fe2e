"""Serving settings, read once from ``SOTA_SERVE_*`` environment variables.

Knobs left unset are sized to the machine (:meth:`Settings.plan`): one worker process that
owns all cores on a CPU, decoding on two threads per core and running one single-threaded
model call per core at once; several workers sharing one GPU (each decodes on its own cores;
on an H100, 8 workers served 1.5x what 4 did), one model call at a time each; batch sizes
from the device.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from sota_serve import formats
from sota_serve.constants import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from sota_serve.device import Device, resolve_device
from sota_serve.errors import SotaServeError
from sota_serve.package import precision
from sota_serve.serving.fallback import DEFAULT_BUDGET_SHARE, MAX_BUDGET_S

if TYPE_CHECKING:
    from sota_serve.package.loading import ModelPackage

DEFAULT_MODEL = "sota-demo:latest"


class Settings(BaseSettings):
    """Every knob of the service; the README's "Configuration" table lists them."""

    model_config = SettingsConfigDict(env_prefix="SOTA_SERVE_", extra="ignore")

    #: what to serve: a package directory or file, a BentoML model-store tag, a comma-separated
    #: list of those, or a repository directory of packages (``name/`` or ``name/version/``;
    #: docs/models.md)
    model: str = DEFAULT_MODEL
    #: the model the plain routes (/classify, /card...) answer; default: the first
    default_model: str | None = None
    #: ``explicit``: models may be loaded and unloaded through /v2/repository/models/{name}/load
    #: and /unload (Triton's model-control mode of that name); ``none``: what starts, serves
    model_control: str = Field(default="none", pattern="^(none|explicit)$")
    #: follow a repository directory every this many seconds: new versions are loaded and
    #: swapped in, versions replaced in place reloaded, models whose folder is gone unloaded
    model_poll_s: float | None = Field(default=None, gt=0)
    #: a worker's resident memory above which a model is refused at load; default: the
    #: container's memory bound (cgroup) shared by the workers, none where there is none
    memory_limit_mb: int | None = Field(default=None, ge=64)
    backend: str = Field(default=formats.DEFAULT, pattern=f"^({'|'.join(formats.NAMES)})$")
    device: str = Field(default="auto", pattern="^(auto|cpu|cuda)$")
    #: auto: the package's fp16 artifact on a GPU, its int8 artifact on a CPU, when its
    #: agreement with fp32 holds (the card's ``fp16`` / ``int8`` record), fp32 otherwise;
    #: fp32 / fp16 / int8: that artifact or a clear error
    precision: str = Field(default="auto", pattern=f"^({'|'.join(precision.CHOICES)})$")
    #: worker processes; each loads the model, decodes and batches its own requests
    workers: int | None = Field(default=None, ge=1, le=64)
    #: decode/preprocess threads per worker (Pillow releases the GIL); default: two per core
    #: on a CPU, one per core on a GPU
    decode_threads: int | None = Field(default=None, ge=1, le=256)
    #: ORT / torch intra-op threads per model call
    threads: int | None = Field(default=None, ge=1, le=256)
    #: model calls (batches) that run at once per worker, each on its own thread; on a CPU,
    #: one single-threaded call per core outran one call over all cores (BENCHMARKS.md)
    model_threads: int | None = Field(default=None, ge=1, le=64)
    #: images per device call (plain); five-crop calls hold max_batch_size_tta images = 5x crops
    max_batch_size: int | None = Field(default=None, ge=1, le=1024)
    max_batch_size_tta: int | None = Field(default=None, ge=1, le=256)
    #: request body limit (all files of a request together)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BYTES + 1024 * 1024, ge=1024)
    #: per-image limits
    max_image_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=1)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    max_aspect_ratio: float = Field(default=20.0, ge=1.0)
    max_batch_images: int = Field(default=64, ge=1, le=1024)
    jpeg_draft: bool = False
    #: where uploads are decoded: pillow (CPU threads, the card's reference pixels), or
    #: torchvision (nvJPEG on the model's GPU; libjpeg when the device is the CPU). Measured on
    #: an H100 it served no more than pillow (BENCHMARKS.md), so it is opt-in
    decode: str = Field(default="pillow", pattern="^(pillow|torchvision)$")
    #: the Open Inference Protocol over gRPC (and gRPC's health service) on this port, beside
    #: HTTP, in every worker process; off unless set
    grpc_port: int | None = Field(default=None, ge=1, le=65535)
    #: origins (comma-separated, or *) whose web pages may call the service (CORS); the
    #: answers of the front door and of BentoML both carry the headers
    cors_origins: str = ""
    #: one log line per request (BentoML's access log); off by default, it costs throughput
    access_log: bool = False
    #: OpenTelemetry spans for the image routes (with BentoML's tracing configured); off: they
    #: cost throughput and BentoML's default sample rate (0) records none
    trace_requests: bool = False
    #: admission: a request is refused (503 + Retry-After) when the work already in flight
    #: needs longer than this to drain, at the measured decode and model speed
    max_wait_s: float = Field(default=10.0, gt=0)
    #: a request over that bound waits at the door up to this long for room before its 503
    admission_hold_s: float = Field(default=2.0, ge=0)
    #: memory backstop: requests in flight per worker, whatever the estimates say
    max_in_flight: int = Field(default=1024, ge=1)
    #: a request still queued for the model after this long is dropped with 503
    deadline_s: float = Field(default=20.0, gt=0)
    #: the TTA fallback ladder's default for requests that do not say (``tta_fallback``): under
    #: load, serve a cheaper policy the card lists rather than miss the latency budget
    tta_fallback: bool = False
    #: the latency budget of a request that does not give one (``tta_budget_s``); default: a
    #: tenth of max_wait_s (1 s), what a person waiting on a page reads as "at once"
    tta_budget_s: float | None = Field(default=None, gt=0, le=MAX_BUDGET_S)
    #: the default of requests that do not say (``tta_budget_strict``): when not even ``none``
    #: can be answered within the budget, 503 + Retry-After at once instead of a late answer
    tta_budget_strict: bool = False

    def memory_limit_bytes(self, plan: Plan) -> int | None:
        """The resident memory bound of one worker, in bytes (None: no bound)."""
        if self.memory_limit_mb is not None:
            return self.memory_limit_mb * 2**20
        container = _cgroup_memory_bytes()
        return None if container is None else container // plan.workers

    def budget_s(self) -> float:
        """The default latency budget of the TTA fallback ladder, in seconds."""
        return self.tta_budget_s or DEFAULT_BUDGET_SHARE * self.max_wait_s

    def plan(self) -> Plan:
        device = resolve_device(self.device)
        cores = os.cpu_count() or 1
        workers = self.workers or (max(1, min(8, cores // 2)) if device == "cuda" else 1)
        per_worker = max(1, cores // workers)
        model_threads, threads = self._model_threads(device, per_worker)
        return Plan(
            device=device,
            workers=workers,
            decode_threads=self.decode_threads or self._decode_threads(device, per_worker),
            threads=threads,
            model_threads=model_threads,
            max_batch_size=self.batch_size(device),
            max_batch_size_tta=self.max_batch_size_tta or (32 if device == "cuda" else 8),
        )

    def batch_size(self, device: Device) -> int:
        """Images per plain device call on ``device``."""
        return self.max_batch_size or (128 if device == "cuda" else 32)

    @staticmethod
    def _decode_threads(device: Device, per_worker: int) -> int:
        """Decode threads when not set.

        On a CPU, two per
        core: each thread holds the GIL for Pillow's Python between its C calls, and a thread
        waiting for the GIL leaves its core idle; a second thread keeps it busy. On 2 cores
        (demo, 128 clients) that took the machine from 12.5 to 6.9 % idle and served 1.25x
        (BENCHMARKS.md, 2026-11-24 noon); four per core served no more. A GPU worker keeps
        one per core, as measured on an H100 before this change.
        """
        return 2 * per_worker if device == "cpu" else per_worker

    def _model_threads(self, device: Device, cores: int) -> tuple[int, int]:
        """(model calls at once, intra-op threads per call) for a worker with ``cores``.

        A GPU runs one call at a time per worker (its kernels queue on one stream anyway).
        A CPU's cores go to calls rather than to intra-op threads unless told otherwise.
        """
        if device == "cuda":
            return self.model_threads or 1, self.threads or 1
        if self.model_threads and self.threads:
            return self.model_threads, self.threads
        if self.threads:
            return max(1, cores // self.threads), self.threads
        model_threads = self.model_threads or cores
        return model_threads, max(1, cores // model_threads)

    def check(self, package: ModelPackage, plan: Plan) -> None:
        """Refuse, naming the variable, a setting that ``package`` or this machine cannot serve.

        For where the settings are read before any worker starts (the service module's import):
        a worker that fails on the same setting while loading the model exits, and BentoML
        starts it again, forever, with the port bound and ``/readyz`` never answering. What is
        left to the worker is what needs the model loaded or a CUDA context opened (nvJPEG
        decoding a JPEG for ``SOTA_SERVE_DECODE=torchvision`` on a GPU).
        """
        try:
            precision.choose(package.card, package.artifacts, self.backend, plan.device, self.precision)
        except SotaServeError as e:
            raise SotaServeError(f"SOTA_SERVE_PRECISION={self.precision}: {e}") from None
        if self.backend in TORCH_BACKENDS and (reason := _torch_unavailable(plan.device)):
            raise SotaServeError(f"SOTA_SERVE_BACKEND={self.backend}: {reason}; or set SOTA_SERVE_BACKEND=onnx")
        if self.backend == formats.DEFAULT and plan.device == "cuda" and (reason := _onnx_cuda_unavailable()):
            raise SotaServeError(f"SOTA_SERVE_DEVICE={self.device}: {reason}; or set SOTA_SERVE_DEVICE=cpu")
        if self.decode == "torchvision":
            if plan.device == "cpu":
                self.decoder("cpu")  # decodes a JPEG on the CPU: no CUDA context
            elif reason := _torch_unavailable("cuda", "torchvision"):
                raise SotaServeError(f"SOTA_SERVE_DECODE=torchvision: {reason}; or set SOTA_SERVE_DECODE=pillow")

    def decoder(self, device: Device) -> str:
        """``pillow`` or ``torchvision``, for the process that runs the model (asked there
        only: proving that torchvision decodes on a GPU opens a CUDA context)."""
        if self.decode == "pillow":
            return "pillow"  # no torch import
        from sota_serve.image.device_preprocess import unavailable_reason

        reason = unavailable_reason(device)
        if reason is not None:
            raise SotaServeError(f"SOTA_SERVE_DECODE=torchvision: {reason}; or set SOTA_SERVE_DECODE=pillow")
        return "torchvision"


@dataclass(frozen=True)
class Plan:
    """The settings resolved for this machine."""

    device: Device
    workers: int
    decode_threads: int
    #: intra-op threads per model call
    threads: int
    #: model calls at once per worker
    model_threads: int
    max_batch_size: int
    max_batch_size_tta: int


#: backends that run on torch (the ``torchscript`` extra)
TORCH_BACKENDS = ("pt2", "torchscript")


def _torch_unavailable(device: Device, *modules: str) -> str | None:
    """Why torch (and ``modules``) cannot run on ``device`` here, or None. Asks torch whether
    it sees a CUDA device, which opens no CUDA context."""
    missing = [m for m in ("torch", *modules) if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed; pip install 'sota-serve[torchscript]'"
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return f"this torch ({torch.__version__}) sees no CUDA device"
    return None


def _onnx_cuda_unavailable() -> str | None:
    """Why ONNX Runtime cannot run on the CUDA device that is present, or None."""
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return ("a CUDA device is present but this onnxruntime has no CUDA provider (the CPU build):"
                " pip uninstall -y onnxruntime, then pip install 'sota-serve[gpu]'")
    return None


def _cgroup_memory_bytes() -> int | None:
    """The container's memory bound (cgroup v2's memory.max), where there is one."""
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as e:
        problems = "; ".join(
            f"SOTA_SERVE_{str(err['loc'][0]).upper()}: {err['msg']}" for err in e.errors()
        )
        raise SotaServeError(f"invalid service settings: {problems}") from e
