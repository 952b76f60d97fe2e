"""Dynamic batching inside one process: concurrent callers' crops go to the device together.

Callers ``await batcher.submit(crops, k, deadline)`` from an asyncio loop. One dispatcher task
takes whatever is queued when a model thread is free (up to ``max_crops`` for its group size) and runs it as one
``runtime.predict`` call on that thread, so the event loop keeps accepting requests
while the device works. ``model_threads`` calls may run at once on one runtime (ORT sessions
and TorchScript modules are safe to call concurrently): on a CPU, one single-threaded call
per core beats one call spread over the cores by intra-op threads, whose every operator
ends in a barrier that waits for the slowest core (measured on 2 cores, the server on the
demo model: 1.10x five-crop, 1.02x plain; BENCHMARKS.md). Nothing waits for a batch to fill: at low load a request runs at
once (batch of one), under load the queue that builds up while the model is busy becomes the
next batch (continuous batching). Requests of each TTA policy
queue apart, since one device call averages one group size k (1 plain, 2 flip, 5, 10) and the
annotator checks one policy's crops; the queue whose oldest request is
oldest goes first.

The event loop only queues and hands out: joining a batch's crops, ranking its classes
(:func:`sota_serve.predictions.rank_rows`) and the per-image ``annotate`` (the server's OOD
check, a dozen numpy calls per batch rather than per image) happen on the model thread. All
are numpy calls that can release the GIL (a crop's copy, any sort), and a loop thread that
gives the GIL up waits to get it back behind the decode threads while every connection waits
on it.

Requests whose deadline passed while queued are failed with :class:`OverloadedError` instead
of being computed late. The batcher keeps running averages of the model's time per crop so
that admission control (:mod:`sota_serve.serving.admission`) can estimate how long the queue takes
to drain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sota_serve.errors import BudgetExceededError, OverloadedError
from sota_serve.image.device_preprocess import concat_rows
from sota_serve.predictions import Ranked, rank_rows
from sota_serve.runtime.base import Runtime
from sota_serve.serving.profile import LatencyProfile

log = logging.getLogger("sota_serve.batcher")

BatchObserver = Callable[[int, int, int, float], None]  # (k, images, crops, seconds)
#: histogram buckets for what a BatchObserver sees (every front end's metrics use these)
IMAGES_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SECONDS_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


#: (crops, k, policy) -> one value per image, computed on the model thread beside the model call
Annotator = Callable[[Any, int, str], "list[Any] | None"]


@dataclass
class _Item:
    #: (m*k, 3, H, W) uint8 arrays, n*k crops in all: numpy, or torch tensors decoded on the
    #: device; joined on the model thread
    parts: list[Any]
    k: int
    policy: str  # the TTA policy the crops were cut with
    deadline: float  # time.monotonic()
    future: asyncio.Future[Ranked]
    queued_at: float = field(default_factory=time.monotonic)
    #: a strict latency budget's end: past it the answer is not wanted (None: no such budget)
    due: float | None = None

    @property
    def crops(self) -> int:
        return sum(p.shape[0] for p in self.parts)

    @property
    def images(self) -> int:
        return self.crops // self.k


def _runs(parts: list[Any], step: int) -> list[list[Any]]:
    """Crop arrays grouped into runs of at most ``step`` crops, without copying: a longer
    array is cut into views (``step`` is a multiple of k, so the cuts fall between images)."""
    runs: list[list[Any]] = [[]]
    size = 0
    for part in parts:
        for i in range(0, part.shape[0], step):
            piece = part[i : i + step]
            if runs[-1] and size + piece.shape[0] > step:
                runs.append([])
                size = 0
            runs[-1].append(piece)
            size += piece.shape[0]
    return runs if runs[-1] else []


class Ewma:
    """Exponentially weighted mean; ``None`` until the first sample."""

    def __init__(self, alpha: float = 0.2, initial: float | None = None) -> None:
        self.alpha, self.value = alpha, initial

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.alpha * sample + (1 - self.alpha) * self.value


class DynamicBatcher:
    def __init__(self, runtime: Runtime, *, max_crops: int | Mapping[int, int],
                 observer: BatchObserver | None = None, seconds_per_crop: Ewma | None = None,
                 model_threads: int = 1, annotate: Annotator | None = None,
                 profile: LatencyProfile | None = None, model_pool: ThreadPoolExecutor | None = None) -> None:
        """``max_crops``: crops per device call, one figure or one per group size k.
        ``model_threads``: device calls that may run at once. ``annotate``: a per-image value
        computed from each batch's crops on the model thread (the server's OOD check).
        ``profile``: told every device call's size and time (admission's, for the tail of a
        request's completion); it also decides at dispatch whether a strict item can still
        make its due time. ``model_pool``: model threads shared with other models' batchers
        (default: ``model_threads`` of its own); either way at most ``model_threads`` of this
        batcher's calls run at once."""
        caps = max_crops.values() if isinstance(max_crops, Mapping) else [max_crops]
        if min(caps) < 1:
            raise ValueError(f"max_crops must be >= 1, got {max_crops}")
        if model_threads < 1:
            raise ValueError(f"model_threads must be >= 1, got {model_threads}")
        self.runtime, self.max_crops, self.observer, self.annotate = runtime, max_crops, observer, annotate
        self.model_threads = model_threads
        self._queues: dict[tuple[int, str], deque[_Item]] = {}
        self._wakeup = asyncio.Event()
        self._own_pool = model_pool is None
        self._model_pool = model_pool or ThreadPoolExecutor(model_threads, thread_name_prefix="sota-model")
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.seconds_per_crop = seconds_per_crop or Ewma()
        self.profile = profile or LatencyProfile()
        self.batches = 0

    # --- caller side ----------------------------------------------------------------------

    async def submit(self, crops: Any, k: int, deadline: float, policy: str = "", due: float | None = None) -> Ranked:
        """(n*k, 3, H, W) uint8, as one array or a list of them (each whole images) -> the n
        images' probabilities and rankings, computed in a shared batch with other requests
        of the same ``policy`` (the TTA policy, named to the annotator).

        A request larger than ``max_crops`` is split on image boundaries. ``due``: a strict
        budget's end; a request that the batch it would join cannot finish by then, at the
        tail of the measured call times, is refused (:class:`BudgetExceededError`) instead of
        computed late.
        """
        self._ensure_running()
        step = max(k, self.cap(k) // k * k)
        loop = asyncio.get_running_loop()
        futures = []
        for run in _runs(crops if isinstance(crops, list) else [crops], step):
            item = _Item(run, k, policy, deadline, loop.create_future(), due=due)
            self._queues.setdefault((k, policy), deque()).append(item)
            futures.append(item.future)
        self._wakeup.set()
        parts = await asyncio.gather(*futures)
        if len(parts) == 1:
            return parts[0]
        notes = None if parts[0].notes is None else [n for p in parts for n in p.notes]  # type: ignore[union-attr]
        return Ranked(np.concatenate([p.probs for p in parts]), np.concatenate([p.ranked for p in parts]), notes)

    # --- dispatcher -----------------------------------------------------------------------

    def cap(self, k: int) -> int:
        """The most crops one device call of group size ``k`` takes."""
        if isinstance(self.max_crops, Mapping):
            return self.max_crops.get(k, max(self.max_crops.values()))
        return self.max_crops

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="sota-batcher")

    def _next_batch(self) -> list[_Item]:
        """The next batch: live items from the queue whose oldest live item is oldest.

        Dead heads (cancelled, or past their deadline and failed here) are dropped from every
        queue before choosing, so a queue that held only dead items never hides another
        queue's live work: an empty answer means no queue holds a live item.
        """
        now = time.monotonic()
        while True:
            for queue in self._queues.values():
                while queue and not self._alive(queue[0], now):
                    queue.popleft()
            heads = [(q[0].queued_at, key) for key, q in self._queues.items() if q]
            if not heads:
                return []
            _, key = min(heads)
            queue, batch, crops, cap = self._queues[key], [], 0, self.cap(key[0])
            while queue and (not batch or crops + queue[0].crops <= cap):
                item = queue.popleft()
                if self._alive(item, now) and self._in_time(item, crops + item.crops, now):
                    batch.append(item)
                    crops += item.crops
            if batch:  # else every item taken was refused: choose again among what is left
                return batch

    def _in_time(self, item: _Item, batch_crops: int, now: float) -> bool:
        """Whether a strict item, run in a call of ``batch_crops`` crops, is answered by its due
        time; one that is not is refused here, before any model time is spent on it."""
        if item.due is None:
            return True
        run_s = self.profile.run_s(batch_crops)
        if run_s is None or now + run_s <= item.due:
            return True
        item.future.set_exception(BudgetExceededError(
            f"refused before running: its answer would come about {now + run_s - item.due:.2f} s after its"
            " budget (tta_budget_strict); the server is busy", retry_after_s=1))
        return False

    @staticmethod
    def _alive(item: _Item, now: float) -> bool:
        """Whether ``item`` still wants an answer; one past its deadline is failed here."""
        if item.future.done():  # the caller went away (cancelled)
            return False
        if now > item.deadline:
            item.future.set_exception(OverloadedError(
                f"request dropped: it waited {now - item.queued_at:.1f}s in the queue, past its"
                " deadline (SOTA_SERVE_DEADLINE_S); the server is overloaded", retry_after_s=1))
            return False
        return True

    async def _dispatch(self) -> None:
        # A batch is taken only when a model thread is free: until then the queue grows, and
        # becomes the next (larger) batch.
        free = asyncio.Semaphore(self.model_threads)
        while True:
            await free.acquire()
            batch = self._next_batch()
            while not batch:
                self._wakeup.clear()
                await self._wakeup.wait()
                batch = self._next_batch()
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            task.add_done_callback(lambda _: free.release())

    async def _run_batch(self, batch: list[_Item]) -> None:
        k, policy = batch[0].k, batch[0].policy
        crops = sum(it.crops for it in batch)
        started = time.perf_counter()
        try:
            parts = [p for it in batch for p in it.parts]
            result = await asyncio.get_running_loop().run_in_executor(self._model_pool, self._predict, parts, k,
                                                                      policy)
        except Exception as e:  # a model failure fails this batch only, typed for the caller
            log.exception("model call failed for a batch of %d crops", crops)
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        elapsed = time.perf_counter() - started
        self.seconds_per_crop.add(elapsed / crops)
        self.profile.add(crops, elapsed)
        self.batches += 1
        if self.observer:
            self.observer(k, crops // k, crops, elapsed)
        row = 0
        for it in batch:
            n = it.images
            if not it.future.done():
                it.future.set_result(result.rows(row, row + n))
            row += n

    def _predict(self, parts: list[Any], k: int, policy: str) -> Ranked:
        """On a model thread: join the crops, run the model, rank each image's classes, and
        annotate each image."""
        x = concat_rows(parts)
        probs = self.runtime.predict(x, crops_per_image=k)
        return Ranked(probs, rank_rows(probs), self.annotate(x, k, policy) if self.annotate else None)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in list(self._running):
            task.cancel()
        if self._own_pool:
            self._model_pool.shutdown(wait=False, cancel_futures=True)
