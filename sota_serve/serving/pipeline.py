"""Images to answers for a server: the offline pipeline's two stages (:mod:`sota_serve.classifier`),
decoding on a thread pool and scoring on the batcher's model threads, with the crops of
concurrent requests batched together (:mod:`sota_serve.serving.batcher`) and every request's
progress reported to admission control (:mod:`sota_serve.serving.admission`).

No web framework here: a front end (``bento/`` for BentoML) parses the request, admits it,
and turns the answer into its protocol.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from sota_serve.classifier import Classifier, ranked_answers
from sota_serve.errors import BudgetExceededError, ImageError
from sota_serve.explain import occlusion
from sota_serve.explain.budget import CropBudget
from sota_serve.image.decode import DecodeLimits
from sota_serve.package.card import ModelCard
from sota_serve.package.loading import ModelPackage
from sota_serve.predictions import Classified, check_top_k
from sota_serve.serving.admission import Admission, ModelCost, Ticket
from sota_serve.serving.batcher import BatchObserver, DynamicBatcher
from sota_serve.serving.fallback import (
    DEFAULT_BUDGET_SHARE,
    REFUSED,
    FallbackAsk,
    Ladder,
    recorded_accuracy,
)
from sota_serve.serving.settings import Plan, Settings
from sota_serve.tta import CROPS_PER_IMAGE


class Pools(NamedTuple):
    """Threads shared by the pipelines of the models one worker serves: decoding's and the
    device calls' (at most ``model_threads`` at once, whichever model they are for)."""

    decode: ThreadPoolExecutor
    model: ThreadPoolExecutor

    @classmethod
    def of(cls, plan: Plan) -> Pools:
        return cls(ThreadPoolExecutor(plan.decode_threads, thread_name_prefix="sota-decode"),
                   ThreadPoolExecutor(plan.model_threads, thread_name_prefix="sota-model"))


class Answers(NamedTuple):
    """A request's answer: the policy applied (the card's default when none was asked) and one
    entry per image, in order: its ranked predictions and OOD check, or its typed error."""

    tta: str
    results: list[Classified | ImageError]
    #: the policy asked for (or the card's default); differs from ``tta`` when the fallback
    #: ladder served a cheaper one (sota_serve.serving.fallback)
    requested_tta: str | None = None


class Probabilities(NamedTuple):
    """A request's answer for protocols without per-image entries."""

    tta: str
    probs: np.ndarray  # (N, C) float32
    requested_tta: str | None = None  # as in Answers


#: (requested policy, served policy), once per answered request (the front end's metrics)
TTAObserver = Callable[[str, str], None]


class Pipeline:
    def __init__(self, clf: Classifier, batcher: DynamicBatcher, admission: Admission, *,
                 decode_threads: int, deadline_s: float, tta_fallback: bool = False,
                 tta_budget_s: float | None = None, tta_budget_strict: bool = False, on_tta: TTAObserver | None = None,
                 explain_crops: int | None = None, cost: ModelCost | None = None,
                 decode_pool: ThreadPoolExecutor | None = None) -> None:
        """``tta_fallback``, ``tta_budget_s``, ``tta_budget_strict``: the TTA fallback ladder's defaults for requests
        that do not say (off; the budget: a share of admission's bound, as Settings.budget_s);
        ``on_tta``: told each answer's policies; ``explain_crops``: the most occluded crops
        that exist at once across all explanations (default: two plain batches per model
        thread, one running and one ready); ``cost``: this model's costs in admission (default:
        the first model's); ``decode_pool``: decode threads shared with other models' pipelines
        (default: a pool of ``decode_threads`` of its own)."""
        self.clf, self.batcher, self.admission, self.deadline_s = clf, batcher, admission, deadline_s
        self.cost = cost or admission.cost
        self._explain_crops = explain_crops
        self._explain_budget: CropBudget | None = None
        self.ladder = Ladder(clf.card.tta.policies(), admission, enabled=tta_fallback,
                             budget_s=tta_budget_s or DEFAULT_BUDGET_SHARE * admission.max_wait_s,
                             accuracy=recorded_accuracy(clf.card), strict=tta_budget_strict, cost=self.cost)
        self.on_tta = on_tta
        self._own_pool = decode_pool is None
        self.decode_pool = decode_pool or ThreadPoolExecutor(decode_threads, thread_name_prefix="sota-decode")
        #: pillow or torchvision (Settings.decode), for the logs
        self.decode = "torchvision" if clf.device_preprocessor is not None else "pillow"

    @property
    def explain_budget(self) -> CropBudget:
        """The occluded crops that may exist at once across all explanations: an explanation's
        crops are made a slice (:attr:`explain_slice`) at a time within it, so that their memory
        is bounded whatever the number of explanations in flight."""
        if self._explain_budget is None:
            self._explain_budget = CropBudget(self._explain_crops or 2 * self.batcher.model_threads * self.batcher.cap(1))
        return self._explain_budget

    @property
    def explain_slice(self) -> int:
        """Crops per slice: one plain device call's worth."""
        return min(self.batcher.cap(1), self.explain_budget.capacity)

    @property
    def card(self) -> ModelCard:
        return self.clf.card

    @property
    def precision(self) -> str:
        """The model artifact's precision (fp32/fp16/int8), for the logs."""
        return self.clf.runtime.precision

    @classmethod
    def build(cls, package: ModelPackage, settings: Settings, plan: Plan, admission: Admission,
              observer: BatchObserver | None = None, on_tta: TTAObserver | None = None, *,
              cost: ModelCost | None = None, pools: Pools | None = None) -> Pipeline:
        """Load the model on the plan's device, warm it up, and wire decoder, batcher and the
        TTA fallback ladder. ``cost`` and ``pools``: for a model served beside others in one
        worker (:mod:`sota_serve.serving.models`), its own costs in admission and the worker's
        shared decode and model threads."""
        cost = cost or admission.cost
        limits = DecodeLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_pixels,
                              max_aspect_ratio=settings.max_aspect_ratio)
        clf = Classifier.from_package(package, backend=settings.backend, device=plan.device,
                                      intra_op_threads=plan.threads, limits=limits, jpeg_draft=settings.jpeg_draft,
                                      decode=settings.decoder(plan.device), precision=settings.precision)
        runtime = clf.runtime
        ks = sorted({CROPS_PER_IMAGE[p] for p in clf.card.tta.policies()})
        max_crops = {1: plan.max_batch_size, **{k: plan.max_batch_size_tta * k for k in ks[1:]}}
        # Warm up every batch shape the device will see, so readiness means "fast", not just
        # "loaded", and admission starts with a measured model cost instead of none.
        runtime.warmup(plan.max_batch_size)
        for k in ks[1:]:
            runtime.warmup(plan.max_batch_size_tta, k)
        cost.seconds_per_crop.add(_seconds_per_crop(clf, plan.max_batch_size))
        batcher = DynamicBatcher(runtime, max_crops=max_crops, observer=observer,
                                 seconds_per_crop=cost.seconds_per_crop, profile=cost.profile,
                                 model_threads=plan.model_threads, model_pool=pools.model if pools else None,
                                 annotate=(lambda crops, k, tta: clf.ood(crops, tta)) if clf.screen else None)
        pipeline = cls(clf, batcher, admission, decode_threads=plan.decode_threads, deadline_s=settings.deadline_s,
                       tta_fallback=settings.tta_fallback, tta_budget_s=settings.budget_s(),
                       tta_budget_strict=settings.tta_budget_strict, on_tta=on_tta, cost=cost,
                       decode_pool=pools.decode if pools else None)
        pipeline.calibrate()
        return pipeline

    def calibrate(self, repeats: int = 3) -> None:
        """Seed admission's decode cost before the first request, from a photo-like JPEG.

        Without a prior, a cold server would admit a whole burst at zero estimated cost.
        Real requests replace the figure within a few samples (a moving average).
        """
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:480, 0:640]
        smooth = np.stack([x / 640 * 255, y / 480 * 255, (x + y) / 1120 * 255], axis=-1)
        pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        for _ in range(repeats):
            self._decode(buffer.getvalue(), "none")

    def close(self) -> None:
        """Stop the batcher and the threads this pipeline owns (not shared ones): for a model
        being unloaded, once its requests have left."""
        self.batcher.close()
        if self._own_pool:
            self.decode_pool.shutdown(wait=False, cancel_futures=True)

    # --- the two entry points -------------------------------------------------------------

    def policy(self, tta: str | None, images: int, ticket: Ticket, fallback: FallbackAsk | None) -> tuple[str, str]:
        """(requested, served) policy for ``images`` images; an omitted ``tta`` is the card's
        ``tta.default``. Raises BadRequestError (422) for a policy the card lacks."""
        requested = self.clf.policy(tta)
        self.clf.preprocessor.crops_per_image(requested)  # the card lists it, or 422
        return requested, self.ladder.choose(requested, images, ticket, fallback)

    async def classify(self, images: Sequence[bytes], tta: str | None, top_k: int,
                       ticket: Ticket | None = None, fallback: FallbackAsk | None = None) -> Answers:
        """``tta`` None: the card's default. Raises BadRequestError (422) for a policy the card
        lacks or a ``top_k`` out of range; an image's own error is its entry. ``fallback``:
        the request's TTA fallback options (None: the server's)."""
        ticket = ticket or Ticket()
        top_k = check_top_k(top_k, self.card.num_classes)
        requested, tta, items, ranked = await self._served(images, tta, ticket, fallback)
        self._answered(requested, tta)
        return Answers(tta, ranked_answers(items, ranked, self.card.labels, top_k), requested)

    async def probabilities(self, images: Sequence[bytes] | None, pixels: np.ndarray | None,
                            tta: str | None, ticket: Ticket | None = None,
                            fallback: FallbackAsk | None = None) -> Probabilities:
        """(N, C) probabilities of encoded ``images`` or of preprocessed (N, 3, H, W) uint8
        ``pixels`` (one of the two; pixels are single crops, no TTA and no OOD check), for
        protocols without per-image errors: the first bad image fails the request, its message
        naming which one."""
        ticket = ticket or Ticket()
        if pixels is not None:
            return Probabilities("none", await self._pixels(pixels, ticket), "none")
        assert images is not None, "probabilities needs images or pixels"
        requested, tta, items, ranked = await self._served(images, tta, ticket, fallback)
        for i, item in enumerate(items):
            if isinstance(item, ImageError):
                raise type(item)(f"image {i} of {len(items)}: {item}")
        self._answered(requested, tta)
        return Probabilities(tta, ranked[0].probs.astype(np.float32, copy=False) if ranked
                             else np.zeros((0, self.card.num_classes), np.float32), requested)

    async def _served(self, images: Sequence[bytes], tta: str | None, ticket: Ticket,
                      fallback: FallbackAsk | None) -> tuple[str, str, list[Any], list[Any]]:
        """(requested, served policy, each image's crops or error, the scored batch): the
        ladder's choice, run with a strict budget's due time; a strict refusal, at the door
        or at dispatch, is counted as served ``refused`` before it propagates (503)."""
        requested = self.clf.policy(tta)
        self.admission.loop_lag.ensure_running()
        try:
            requested, served = self.policy(tta, len(images), ticket, fallback)
            due = self.ladder.due(ticket, fallback)
            # the model must be done early enough for the answer to be written by the due time
            finish_by = None if due is None else due - self.admission.delivery_s()
            items, ranked = await self._run(images, served, self.clf.preprocessor.crops_per_image(served), ticket,
                                            due=finish_by)
            self.admission.learn_ready(ticket)
            if finish_by is not None and time.monotonic() > finish_by:
                raise BudgetExceededError(
                    f"answered {time.monotonic() - finish_by:.2f} s too late for its {due - ticket.sent_at:g} s"
                    " budget (a device call ran longer than measured); refused instead of answered late because"
                    " the budget is strict (tta_budget_strict)", retry_after_s=self.admission.retry_after())
        except BudgetExceededError:
            self._answered(requested, REFUSED)
            raise
        return requested, served, items, ranked

    def _answered(self, requested: str, served: str) -> None:
        if self.on_tta is not None:
            self.on_tta(requested, served)

    async def explain(self, image: bytes, label: str | None, grid: int,
                      ticket: Ticket | None = None) -> occlusion.Explanation:
        """The occlusion map of ``label`` (None: the top-1) over the plain crop of ``image``
        (:mod:`sota_serve.explain.occlusion`): decoded on the decode pool, its grid*grid + 1 crops
        made a slice at a time within the server's crop budget (:attr:`explain_budget`) and
        batched as single crops with other requests' on the model threads. Raises
        BadRequestError (422) for a label the card lacks or a grid outside 2..16, and the
        image's typed error."""
        grid = occlusion.check_grid(grid)
        index = occlusion.label_index(self.card.labels, label)
        ticket = ticket or Ticket()
        self.admission.charge(ticket, grid * grid + 1, self.cost)
        try:
            try:
                # not a sample of the decode cost admission learns: a full-scale decode
                occluded = await asyncio.get_running_loop().run_in_executor(self.decode_pool, lambda: occlusion.occlusions(
                    self.clf.preprocessor, self.card.normalization, image, grid=grid, label=index))
            finally:
                self.admission.decoded(ticket)
            probs = await self._occluded_probs(occluded, ticket)
        finally:
            self.admission.computed(ticket)
        return occlusion.explanation(self.card.tag, self.card.labels, occluded, probs)

    async def _occluded_probs(self, occluded: occlusion.Occlusions, ticket: Ticket) -> np.ndarray:
        """The (grid*grid + 1, C) probabilities of an explanation's crops, made and scored a
        slice at a time: each slice is made only once the budget holds room for it and is freed
        once scored. All slices are asked for at once (the budget serves the oldest request's
        first), so one explanation alone still keeps every model thread busy."""
        step = self.explain_slice
        jobs = [asyncio.ensure_future(self._occluded_slice(occluded, start, min(start + step, occluded.count), ticket))
                for start in range(0, occluded.count, step)]
        try:
            parts = await asyncio.gather(*jobs)
        except BaseException:
            for job in jobs:  # one slice failed (or the request went away): the others are not wanted
                job.cancel()
            raise
        return np.concatenate(parts)

    async def _occluded_slice(self, occluded: occlusion.Occlusions, start: int, stop: int, ticket: Ticket) -> np.ndarray:
        await self.explain_budget.acquire(stop - start, (ticket.admitted_at, id(ticket), start))
        try:
            return await self._score_rows(occluded, start, stop, ticket.admitted_at + self.deadline_s)
        finally:  # the slice's crops are gone once _score_rows has returned
            self.explain_budget.release(stop - start)

    async def _score_rows(self, occluded: occlusion.Occlusions, start: int, stop: int, deadline: float) -> np.ndarray:
        # made on the decode pool: a slice is a copy of up to batch-size crops, which would hold
        # the event loop (and its GIL) as long
        crops = await asyncio.get_running_loop().run_in_executor(self.decode_pool, occluded.rows, start, stop)
        # "pixels": the queue of preprocessed single crops, which the OOD annotator has no
        # detector for (an occluded crop is out of distribution by construction)
        ranked = await self.batcher.submit(crops, 1, deadline, "pixels")
        return ranked.probs

    # --- stages ---------------------------------------------------------------------------

    async def _run(self, images: Sequence[bytes], tta: str, k: int, ticket: Ticket,
                   due: float | None = None) -> tuple[list[Any], list[Any]]:
        """Each image's crops or typed error, and the scored batch of the good ones (a list
        of none or one). Progress is reported on ``ticket`` (decoded bytes, queued crops)."""
        deadline = ticket.admitted_at + self.deadline_s  # the request's deadline counts from its admission
        self.admission.charge(ticket, len(images) * k, self.cost)
        try:
            decoded = await self._decode_all(images, tta)
        finally:
            self.admission.decoded(ticket)
        good = [item for item in decoded if not isinstance(item, ImageError)]
        try:
            # joined on the model thread: a copy of 224 px crops would give up the loop's GIL
            ranked = [await self.batcher.submit(good, k, deadline, tta, due=due)] if good else []
        finally:
            self.admission.computed(ticket)
        return decoded, ranked

    async def _pixels(self, crops: np.ndarray, ticket: Ticket) -> np.ndarray:
        """Already-preprocessed crops, batched with every other request's single crops."""
        self.admission.charge(ticket, len(crops), self.cost)
        self.admission.decoded(ticket)  # nothing to decode
        try:
            result = await self.batcher.submit(crops, 1, ticket.admitted_at + self.deadline_s, "pixels")
        finally:
            self.admission.computed(ticket)
        return result.probs.astype(np.float32, copy=False)

    def _decode(self, data: bytes, tta: str) -> Any:
        started = time.perf_counter()
        crops = self.clf.crops(data, tta)  # the front end bounded the body size
        self.admission.learn_decode(len(data), time.perf_counter() - started)
        return crops

    def _decode_many(self, images: list[bytes], tta: str) -> list[Any]:
        started = time.perf_counter()
        out = self.clf.device_preprocessor.many(images, tta)  # type: ignore[union-attr]
        self.admission.learn_decode(sum(map(len, images)), time.perf_counter() - started)
        return out

    async def _decode_all(self, images: Sequence[bytes], tta: str) -> list[Any]:
        """Each upload's (k, 3, H, W) crops, or the typed error its bytes raised."""
        loop = asyncio.get_running_loop()
        if len(images) > 1 and self.clf.device_preprocessor is not None:
            # All of a call's JPEGs in one nvJPEG batch.
            return await loop.run_in_executor(self.decode_pool, self._decode_many, list(images), tta)
        jobs = [loop.run_in_executor(self.decode_pool, self._decode, data, tta) for data in images]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, ImageError):
                raise r
        return results  # type: ignore[return-value]


def _seconds_per_crop(clf: Classifier, batch_size: int) -> float:
    card = clf.card
    batch = np.zeros((batch_size, 3, card.input.height, card.input.width), dtype=np.uint8)
    started = time.perf_counter()
    clf.runtime.predict(batch)
    return (time.perf_counter() - started) / batch_size
