"""Model ceiling and offline pipeline: the two numbers the HTTP service is compared with."""

from __future__ import annotations

import statistics
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

from sota_serve.classifier import Classifier
from sota_serve.image.device_preprocess import concat_rows
from sota_serve.package.loading import ModelPackage
from sota_serve.progress import progress
from sota_serve.runtime import load_runtime


def _timed(fn, *, seconds: float, min_runs: int = 3, max_runs: int = 200) -> list[float]:
    fn()  # warm-up (allocations, kernel selection)
    times: list[float] = []
    stop = time.perf_counter() + seconds
    while len(times) < min_runs or (time.perf_counter() < stop and len(times) < max_runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _concurrent_rate(fn, images_per_call: int, calls_at_once: int, *, seconds: float) -> tuple[float, float, int]:
    """(images/s, median seconds per call, calls) with ``calls_at_once`` threads calling ``fn``."""
    if calls_at_once == 1:
        times = _timed(fn, seconds=seconds)
        median = statistics.median(times)
        return images_per_call / median, median, len(times)
    with ThreadPoolExecutor(calls_at_once) as pool:
        per_thread = list(pool.map(lambda _: _timed(fn, seconds=seconds), range(calls_at_once)))
    times = [t for ts in per_thread for t in ts]
    # Each thread's calls ran back to back: the slowest thread's total is the wall time.
    wall = max(sum(ts) for ts in per_thread)
    return images_per_call * len(times) / wall, statistics.median(times), len(times)


@contextmanager
def _torch_threads_kept() -> Iterator[None]:
    """torch's intra-op thread count is per process: a TorchScript runtime opened with one
    thread would leave every later torch call in this process (training, in a test run) on one.
    Nothing to keep when torch was not imported yet: nothing in the process used it."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if torch is not None:
            torch.set_num_threads(before)


def model_ceiling(
    package: ModelPackage, backends: Sequence[str], batch_sizes: Sequence[int], *, seconds: float,
    device: str = "auto", precisions: Sequence[str] = ("fp32",), splits: Sequence[tuple[int, int]] = ((1, 0),),
) -> list[dict[str, Any]]:
    """The runtime alone on preprocessed uint8 batches: images/s per batch size, for each
    backend at each of ``precisions`` the package has, and for each split of the cores in
    ``splits``: (model calls at once, intra-op threads per call; 0: the runtime's default)."""
    with _torch_threads_kept():
        return _ceilings(package, backends, batch_sizes, seconds, device, precisions, splits)


def _ceilings(package: ModelPackage, backends: Sequence[str], batch_sizes: Sequence[int], seconds: float,
              device: str, precisions: Sequence[str], splits: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    rows = []
    shape = (3, package.card.input.height, package.card.input.width)
    for backend in backends:
        for precision in (p for p in precisions if p in package.precisions(backend)):
            for calls, threads in splits:
                runtime = load_runtime(package, backend, device=device, precision=precision,
                                       intra_op_threads=threads or None)
                for bs in progress(batch_sizes, desc=f"ceiling {backend} {precision} {calls}x{threads or 'auto'}"):
                    x = np.random.default_rng(0).integers(0, 256, (bs, *shape), dtype=np.uint8)
                    rate, median, runs = _concurrent_rate(lambda x=x, rt=runtime: rt.predict(x), bs, calls,
                                                          seconds=seconds)
                    rows.append({"backend": backend, "precision": precision, "device": runtime.device,
                                 "model_threads": calls, "threads": threads or None, "batch_size": bs,
                                 "median_s": median, "images_per_s": rate, "runs": runs})
    return rows


def offline_pipeline(
    clf: Classifier, images: Sequence[bytes], *, tta: str, batch_size: int, threads: int, seconds: float,
    model_threads: int = 1,
) -> dict[str, Any]:
    """Decode + preprocess + model, no HTTP: the best this process does, as a batch job would.
    Each image also gets the card's out-of-distribution check on its crops, as in every answer
    of the server and of :meth:`Classifier.classify`; like the server, for each batch at once
    beside the model call (the offline figures before 2026-11-24's night section left it out,
    and those until its noon section checked one image at a time on the decode threads).

    ``images`` repeat as one long stream: a thread pool decodes (on the device when ``clf``
    decodes there) up to two batches ahead while the model runs full batches of
    ``batch_size`` images, up to ``model_threads`` calls at once (as the server runs them).
    The clock starts after the first batch (warm-up) and runs for ``seconds`` and at least
    three batches, so the figure is the steady state: decoding overlapped with the model,
    every model call a full batch. (Timing whole passes over the nine bench images, as this
    did before, ran the model on one partial batch per pass.)
    """
    def predict(crops: Any) -> Any:  # the model, ranking and OOD check, as on the server's model threads
        return clf.score(crops, tta)

    ahead: deque[Future[Any]] = deque()
    running: deque[Future[Any]] = deque()
    fed = 0
    with ThreadPoolExecutor(threads) as pool, ThreadPoolExecutor(model_threads) as model:

        def feed() -> None:
            nonlocal fed
            ahead.append(pool.submit(clf.crops, images[fed % len(images)], tta))
            fed += 1

        for _ in range((1 + model_threads) * batch_size + threads):
            feed()
        start, done, batches = 0.0, 0, 0
        while True:
            batch = []
            for _ in range(batch_size):
                batch.append(ahead.popleft().result())
                feed()
            running.append(model.submit(predict, concat_rows(batch)))
            if len(running) < model_threads:
                continue
            running.popleft().result()
            batches += 1
            if batches == 1:
                start = time.perf_counter()
                continue
            done += batch_size
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and batches >= 4:
                break
        for f in [*ahead, *running]:
            f.cancel()
    return {"tta": tta, "batch_size": batch_size, "threads": threads, "model_threads": model_threads,
            "images": done, "seconds": elapsed, "images_per_s": done / elapsed, "batches": batches - 1}


def decode_share(clf: Classifier, images: Sequence[bytes], tta: str) -> dict[str, float]:
    """Where the offline time goes, single-threaded, on the Pillow path: decode, preprocess,
    model (per image)."""
    t0 = time.perf_counter()
    decoded = [clf.preprocessor.decode(d) for d in images]
    t1 = time.perf_counter()
    crops = [clf.preprocessor.crops(img, tta) for img in decoded]
    t2 = time.perf_counter()
    clf.runtime.predict(np.concatenate(crops), crops_per_image=clf.preprocessor.crops_per_image(tta))
    t3 = time.perf_counter()
    n = len(images)
    return {"decode_ms": 1000 * (t1 - t0) / n, "preprocess_ms": 1000 * (t2 - t1) / n,
            "model_ms": 1000 * (t3 - t2) / n}
