"""One benchmark run: for each model, ceiling -> offline -> HTTP (ours and the naive peer)."""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.images import image_set
from bench.load import closed_loop
from bench.measure import decode_share, model_ceiling, offline_pipeline
from bench.models import synthetic_package
from bench.report import model_fields
from bench.server import Server
from sota_serve import formats
from sota_serve.classifier import Classifier
from sota_serve.device import resolve_device
from sota_serve.package.loading import ModelPackage, open_package
from sota_serve.package.precision import choose
from sota_serve.serving.settings import Plan, Settings
from sota_serve.tta import CROPS_PER_IMAGE

log = logging.getLogger("sota_serve.bench")


@dataclass
class BenchConfig:
    out: Path = Path("bench/results")
    cache: Path = Path("bench/.cache")
    models: tuple[str, ...] = ("xresnet50", "demo")
    quick: bool = False
    concurrency: tuple[int, ...] = (1, 8, 32, 128, 512)
    seconds: float = 10.0
    images: str = "imagenet"
    processes: int | None = None  # load-generator processes (default: one per 4 cores)
    ceiling_seconds: float = 3.0
    batch_sizes: tuple[int, ...] = (1, 8, 16, 32, 64)
    backends: tuple[str, ...] = formats.NAMES
    naive: bool = True
    litserve: bool = True
    http: bool = True
    jpeg_draft: bool = False
    #: where uploads are decoded, server and offline alike (SOTA_SERVE_DECODE)
    decode: str = "pillow"
    server_env: dict[str, str] = field(default_factory=dict)
    #: the model artifact's precision for the server, the offline pipeline and LitServe alike
    #: (SOTA_SERVE_PRECISION); the ceiling measures it and fp32
    precision: str = "auto"
    #: TTA policies measured (offline, HTTP, LitServe); "none" always comes first
    policies: tuple[str, ...] = ("none", "five_crop")
    #: LitServe inference processes (workers_per_device) tried, each with its share of the
    #: cores; the ratios use the best. None: 1 and one per core on a CPU, 1 and 4 on a GPU
    litserve_workers: tuple[int, ...] | None = None

    def settings(self, device: str) -> Settings:
        """The server's settings with ``server_env`` applied, so the offline pipeline splits
        the cores as the server does."""
        given = {k.removeprefix("SOTA_SERVE_").lower(): v for k, v in self.server_env.items()
                 if k.startswith("SOTA_SERVE_")}
        return Settings(**{**given, "device": device})

    def peers(self, device: str) -> tuple[int, ...]:
        if self.litserve_workers:
            return self.litserve_workers
        return tuple(sorted({1, 4 if device == "cuda" else os.cpu_count() or 1}))

    @classmethod
    def quick_mode(cls, **kwargs: Any) -> BenchConfig:
        return cls(models=("tiny",), quick=True, concurrency=(1, 4), seconds=1.5, ceiling_seconds=0.2,
                   batch_sizes=(1, 8), **kwargs)

    def load(self, url: str, images: list[Path], concurrency: int, tta: str | None) -> dict[str, Any]:
        return closed_loop(url, images, data={"tta": tta} if tta else None, concurrency=concurrency,
                           seconds=self.seconds, processes=self.processes)


def package_for(name: str, cfg: BenchConfig) -> Path | None:
    if name == "tiny":
        return synthetic_package(cfg.cache / "tiny-32", arch="tiny", size=32, num_classes=3)
    if name == "xresnet50":  # int8 calibrated on the bench's ImageNet-sized photos
        return synthetic_package(cfg.cache / "xresnet50-224", arch="xresnet50", size=224, num_classes=1000,
                                 calibration=image_set("imagenet", cfg.cache / "images"))
    if name == "demo":
        path = Path("packages/sota-demo")
        if not (path / "card.json").exists():
            log.warning("skipping the demo model: run `sota-serve demo` first")
            return None
        return path
    return Path(name)  # a package directory


def core_split(plan: Plan) -> tuple[int, int]:
    """(model calls at once, intra-op threads per call) as the server splits the cores; 0
    threads: the runtime's default, one call over all cores."""
    return (plan.model_threads, plan.threads) if plan.model_threads > 1 else (1, 0)


@dataclass
class Offline:
    """The offline pipeline as the server would run it: the same model file, the same split of
    the cores (:func:`core_split`), as many decode threads, the bench's images in memory."""

    clf: Classifier
    calls: int
    data: list[bytes]
    decode_threads: int

    @classmethod
    def open(cls, package: ModelPackage, images: list[Path], plan: Plan, precision: str, **options: Any) -> Offline:
        """``options``: more :meth:`Classifier.from_package` keywords (decode, batch size...)."""
        calls, threads = core_split(plan)
        clf = Classifier.from_package(package, device=plan.device, precision=precision,
                                      intra_op_threads=threads or None, **options)
        return cls(clf, calls, [p.read_bytes() for p in images], plan.decode_threads)

    def run(self, tta: str, batch_crops: int, seconds: float) -> dict[str, Any]:
        """:func:`offline_pipeline` with batches of about ``batch_crops`` crops."""
        return offline_pipeline(self.clf, self.data, tta=tta, batch_size=max(1, batch_crops // CROPS_PER_IMAGE[tta]),
                                threads=self.decode_threads, seconds=seconds, model_threads=self.calls)


def _best(http: list[dict[str, Any]], service: str, tta: str, max_p99: float = float("inf")) -> dict[str, Any] | None:
    """The highest error-free throughput of ``service`` (shedding with 503 is not an error)."""
    rows = [r for r in http if r["service"] == service and r["tta"] == tta and r["errors"] == 0
            and r["p99_ms"] <= max_p99]
    return max(rows, key=lambda r: r["throughput"], default=None)


def _ratios(offline: list[dict[str, Any]], http: list[dict[str, Any]]) -> dict[str, Any]:
    off = {r["tta"]: r["images_per_s"] for r in offline}
    ours, ours5 = _best(http, "sota-serve", "none"), _best(http, "sota-serve", "five_crop")
    naive, lit, lit5 = _best(http, "naive", "none"), _best(http, "litserve", "none"), _best(http, "litserve", "five_crop")
    at_naive_p99 = _best(http, "sota-serve", "none", naive["p99_ms"]) if naive else None
    nan = float("nan")
    return {
        "http_img_per_s_plain": ours["throughput"] if ours else nan,
        "http_img_per_s_five_crop": ours5["throughput"] if ours5 else nan,
        "http_to_offline": ours["throughput"] / off["none"] if ours else nan,
        "http_to_offline_five_crop": ours5["throughput"] / off["five_crop"] if ours5 and "five_crop" in off else nan,
        "to_litserve": ours["throughput"] / lit["throughput"] if ours and lit else nan,
        "to_litserve_five_crop": ours5["throughput"] / lit5["throughput"] if ours5 and lit5 else nan,
        "litserve_best_concurrency": lit["concurrency"] if lit else None,
        "litserve_best_workers": lit.get("workers", 1) if lit else None,
        "to_naive": at_naive_p99["throughput"] / naive["throughput"] if naive and at_naive_p99 else nan,
        "naive_best_concurrency": naive["concurrency"] if naive else None,
        "naive_best_p99_ms": naive["p99_ms"] if naive else None,
        "per_policy": _per_policy(off, http),
    }


def _per_policy(off: dict[str, float], http: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What each TTA policy costs: best error-free req/s over HTTP and offline img/s, and
    both relative to ``none``."""
    out: dict[str, dict[str, Any]] = {}
    plain = _best(http, "sota-serve", "none")
    for tta, offline in off.items():
        best = _best(http, "sota-serve", tta)
        lit = _best(http, "litserve", tta)
        out[tta] = {
            "model_calls_per_image": CROPS_PER_IMAGE[tta],
            "offline_img_per_s": offline,
            "offline_vs_none": offline / off["none"] if off.get("none") else None,
            "http_req_per_s": best["throughput"] if best else None,
            "http_vs_none": best["throughput"] / plain["throughput"] if best and plain else None,
            "to_litserve": best["throughput"] / lit["throughput"] if best and lit else None,
        }
    return out


def bench_model(name: str, package_dir: Path, images: list[Path], cfg: BenchConfig) -> dict[str, Any]:
    package = open_package(package_dir)
    device = resolve_device(os.environ.get("SOTA_SERVE_DEVICE", "auto"))
    log.info("[%s] model ceiling", name)
    batch_sizes = cfg.batch_sizes + ((128, 256) if device == "cuda" and not cfg.quick else ())
    served_precision = choose(package.card, package.artifacts, formats.DEFAULT, device, cfg.precision)
    plan = cfg.settings(device).plan()
    # The server's split of the cores (model calls at once, threads per call; 0 threads: the
    # runtime's default, one call over all cores), measured beside one call over all cores.
    calls, threads_per_call = core_split(plan)
    splits = sorted({(1, 0), (calls, threads_per_call)})
    ceiling = model_ceiling(package, cfg.backends, batch_sizes, seconds=cfg.ceiling_seconds, device=device,
                            precisions=sorted({"fp32", served_precision}), splits=splits)
    served = [r for r in ceiling if r["backend"] == formats.DEFAULT and r["precision"] == served_precision
              and (r["model_threads"], r["threads"] or 0) == (calls, threads_per_call)]
    best_bs = max(served, key=lambda r: r["images_per_s"])["batch_size"]

    decode = Settings(decode=cfg.decode).decoder(device)
    log.info("[%s] offline pipeline (decode: %s, %s, %d model calls at once)", name, decode, served_precision, calls)
    pipeline = Offline.open(package, images, plan, served_precision, jpeg_draft=cfg.jpeg_draft,
                            batch_size=best_bs, decode=decode)
    policies = ["none", *(p for p in cfg.policies if p != "none")]
    for policy in policies:
        pipeline.clf.preprocessor.crops_per_image(policy)  # refuse a policy the card lacks before measuring
    offline = [pipeline.run(tta, best_bs, cfg.seconds / 2) for tta in policies]
    breakdown = {tta: decode_share(pipeline.clf, pipeline.data, tta) for tta in policies}
    del pipeline

    http: list[dict[str, Any]] = []
    if cfg.http:
        env = {"SOTA_SERVE_JPEG_DRAFT": "1" if cfg.jpeg_draft else "0", "SOTA_SERVE_DECODE": decode,
               "SOTA_SERVE_PRECISION": served_precision, **cfg.server_env}
        with Server(package_dir, env=env) as server:
            for tta in policies:
                for c in cfg.concurrency:
                    log.info("[%s] HTTP sota-serve tta=%s concurrency=%d", name, tta, c)
                    http.append({"service": "sota-serve", "tta": tta,
                                 **cfg.load(f"{server.url}/classify", images, c, tta)})
        if cfg.litserve:
            for tta in policies:
                for workers in cfg.peers(device):
                    with Server.litserve(package_dir, tta=tta, precision=served_precision, workers=workers,
                                         max_batch_size=max(1, best_bs // CROPS_PER_IMAGE[tta])) as server:
                        for c in cfg.concurrency:
                            log.info("[%s] HTTP litserve (%d workers) tta=%s concurrency=%d", name, workers, tta, c)
                            http.append({"service": "litserve", "workers": workers, "tta": tta,
                                         **cfg.load(f"{server.url}/classify", images, c, None)})
        if cfg.naive:
            with Server(package_dir, target="bench.naive_service:NaiveClassifier") as server:
                for c in cfg.concurrency:
                    log.info("[%s] HTTP naive concurrency=%d", name, c)
                    http.append({"service": "naive", "tta": "none",
                                 **cfg.load(f"{server.url}/classify", images, c, None)})
    return {**model_fields(name, package.card.tag),
            "input": f"{package.card.input.width}x{package.card.input.height}",
            "best_batch_size": best_bs, "decode": decode, "precision": served_precision, "ceiling": ceiling, "offline": offline,
            "time_per_image_single_thread": breakdown, "http": http,
            "ratios": _ratios(offline, http)}


#: CPU features that move the model's speed: int8 on a CPU with VNNI ran ~1.7x what it did on
#: one without (BENCHMARKS.md, 2026-11-24 noon), so results say which CPU they come from.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU's model and which of :data:`CPU_FEATURES` it has (Linux; elsewhere what
    :mod:`platform` knows and no features)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {"cpu": platform.processor() or platform.machine(), "cpu_features": []}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:  # the first processor's block is enough
                break
            continue
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    model = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:  # "AMD EPYC" alone does not say which generation
        model += f", family {fields['cpu family']} model {fields.get('model', '?')}"
    return {"cpu": model, "cpu_features": [f for f in CPU_FEATURES if f in flags]}


def machine_info() -> dict[str, Any]:
    import bentoml
    import onnxruntime
    import PIL

    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), **cpu_info(),
            "device": resolve_device(os.environ.get("SOTA_SERVE_DEVICE", "auto")),
            "onnxruntime": onnxruntime.__version__, "bentoml": bentoml.__version__, "pillow": PIL.__version__}


def run(cfg: BenchConfig) -> dict[str, Any]:
    images = image_set(cfg.images, cfg.cache / "images")
    models = []
    for name in cfg.models:
        package_dir = package_for(name, cfg)
        if package_dir is not None:
            models.append(bench_model(name, package_dir, images, cfg))
    primary = models[0]["ratios"] if models else {}
    ceiling = max((r["images_per_s"] for r in models[0]["ceiling"]), default=None) if models else None
    return {
        "http_img_per_s_plain": primary.get("http_img_per_s_plain"),
        "http_img_per_s_five_crop": primary.get("http_img_per_s_five_crop"),
        "ceiling_img_per_s": ceiling,
        "ratio_to_litserve": primary.get("to_litserve"),
        "ratio_to_litserve_five_crop": primary.get("to_litserve_five_crop"),
        "ratio_http_to_offline": primary.get("http_to_offline"),
        "ratio_http_to_offline_five_crop": primary.get("http_to_offline_five_crop"),
        "ratio_to_naive": primary.get("to_naive"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {"quick": cfg.quick, "concurrency": list(cfg.concurrency), "seconds": cfg.seconds,
                   "image_set": cfg.images, "images": [p.name for p in images], "jpeg_draft": cfg.jpeg_draft,
                   "decode": cfg.decode, "precision": cfg.precision, "server_env": cfg.server_env,
                   "loadgen_processes": cfg.processes or "auto"},
        "models": models,
    }
