"""Images to probabilities inside this worker: decode on a thread pool (on the CPU, or on the
model's device), batch across requests in-process, run the model.

The handler asks a pipeline for ``probabilities``; the engine client (bento/engine.py) answers
the same question from a process that owns the GPU for all workers.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from bento.settings import Plan, Settings
from sota_serve.admission import Admission, Ticket
from sota_serve.batcher import Annotator, BatchObserver, DynamicBatcher, Ranked
from sota_serve.decode import DecodeLimits
from sota_serve.device_preprocess import DevicePreprocessor
from sota_serve.errors import ImageError
from sota_serve.ood import Screen
from sota_serve.package import ModelPackage
from sota_serve.predictions import OODResult
from sota_serve.preprocess import Preprocessor
from sota_serve.runtime import Runtime, load_runtime
from sota_serve.tta import CROPS_PER_IMAGE


def _seconds_per_crop(runtime: Runtime, batch_size: int) -> float:
    batch = np.zeros((batch_size, 3, runtime.card.input.height, runtime.card.input.width), dtype=np.uint8)
    started = time.perf_counter()
    runtime.predict(batch)
    return (time.perf_counter() - started) / batch_size


class Scored(NamedTuple):
    """One image's (C,) probabilities, its OOD check (None: the card has no ``ood``) and its
    leading class indices, highest first, when the batcher ranked them."""

    probs: np.ndarray
    ood: OODResult | None = None
    ranked: np.ndarray | None = None


#: One entry per image: its scores, or the typed error its bytes raised.
Results = list[Scored | ImageError]

#: group size k -> its TTA policy (each k is one policy's)
_POLICY_OF_K = {k: policy for policy, k in CROPS_PER_IMAGE.items()}


class LocalPipeline:
    def __init__(self, decoder: Preprocessor | DevicePreprocessor, batcher: DynamicBatcher,
                 admission: Admission, *, decode_threads: int) -> None:
        self.decoder, self.batcher, self.admission = decoder, batcher, admission
        self.decode_pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="sota-decode")
        #: pillow or torchvision (Settings.decode), for the logs
        self.decode = "torchvision" if isinstance(decoder, DevicePreprocessor) else "pillow"

    @property
    def precision(self) -> str:
        """The model artifact's precision (fp32/fp16/int8), for the logs."""
        return self.batcher.runtime.precision

    @classmethod
    def build(cls, package: ModelPackage, settings: Settings, plan: Plan, admission: Admission,
              observer: BatchObserver | None = None) -> LocalPipeline:
        """Load the model on the plan's device, warm it up, and wire decoder and batcher."""
        card = package.card
        runtime = load_runtime(package, settings.backend, device=plan.device, intra_op_threads=plan.threads,
                               precision=settings.precision)
        ks = sorted({CROPS_PER_IMAGE[p] for p in card.tta.policies()})
        max_crops = {1: plan.max_batch_size, **{k: plan.max_batch_size_tta * k for k in ks[1:]}}
        # Warm up every batch shape the device will see, so readiness means "fast", not just
        # "loaded", and admission starts with a measured model cost instead of none.
        runtime.warmup(plan.max_batch_size)
        for k in ks[1:]:
            runtime.warmup(plan.max_batch_size_tta, k)
        admission.seconds_per_crop.add(_seconds_per_crop(runtime, plan.max_batch_size))
        screen = Screen.from_card(card)
        batcher = DynamicBatcher(runtime, max_crops=max_crops, observer=observer,
                                 seconds_per_crop=admission.seconds_per_crop, model_threads=plan.model_threads,
                                 annotate=_ood_check(screen) if screen else None)
        limits = DecodeLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_pixels,
                              max_aspect_ratio=settings.max_aspect_ratio)
        pre = Preprocessor.from_card(card, limits=limits, jpeg_draft=settings.jpeg_draft)
        decode = settings.decoder(plan.device)
        decoder = DevicePreprocessor(pre, plan.device) if decode == "torchvision" else pre
        pipeline = cls(decoder, batcher, admission, decode_threads=plan.decode_threads)
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

    def _decode(self, data: bytes, tta: str) -> Any:
        started = time.perf_counter()
        crops = self.decoder(data, tta)  # the guard bounded the body size
        self.admission.learn_decode(len(data), time.perf_counter() - started)
        return crops

    def _decode_many(self, images: list[bytes], tta: str) -> list[Any]:
        started = time.perf_counter()
        out = self.decoder.many(images, tta)  # type: ignore[union-attr]
        self.admission.learn_decode(sum(map(len, images)), time.perf_counter() - started)
        return out

    async def _decode_all(self, images: Sequence[bytes], tta: str) -> list[Any]:
        """Each upload's (k, 3, H, W) crops, or the typed error its bytes raised."""
        loop = asyncio.get_running_loop()
        if len(images) > 1 and isinstance(self.decoder, DevicePreprocessor):
            # All of a call's JPEGs in one nvJPEG batch (the engine gets many per call).
            return await loop.run_in_executor(self.decode_pool, self._decode_many, list(images), tta)
        jobs = [loop.run_in_executor(self.decode_pool, self._decode, data, tta) for data in images]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, ImageError):
                raise r
        return results  # type: ignore[return-value]

    async def probabilities(self, images: Sequence[bytes], tta: str, k: int, ticket: Ticket,
                            deadline: float) -> Results:
        """Progress is reported on ``ticket`` (decoded bytes, queued crops) as it happens."""
        self.admission.charge(ticket, len(images) * k)
        try:
            decoded = await self._decode_all(images, tta)
        finally:
            self.admission.decoded(ticket)
        good = [item for item in decoded if not isinstance(item, ImageError)]
        try:
            # joined on the model thread: a copy of 224 px crops would give up the loop's GIL
            result = await self.batcher.submit(good, k, deadline) if good else None
        finally:
            self.admission.computed(ticket)
        scored = iter(_scored(result) if result else [])  # one per decoded image, in order
        return [item if isinstance(item, ImageError) else next(scored) for item in decoded]

    async def pixels(self, crops: np.ndarray, ticket: Ticket, deadline: float) -> Results:
        """Already-preprocessed (N, 3, H, W) uint8 crops (the Open Inference Protocol's
        ``pixels``), batched with every other request's single crops."""
        self.admission.charge(ticket, len(crops))
        self.admission.decoded(ticket)  # nothing to decode
        try:
            result = await self.batcher.submit(crops, 1, deadline)
        finally:
            self.admission.computed(ticket)
        return _scored(result._replace(notes=None))  # no OOD check: the protocol has no place for it


def _scored(result: Ranked) -> list[Scored]:
    notes = result.notes if result.notes is not None else [None] * len(result.probs)
    return [Scored(p, ood, r) for p, r, ood in zip(result.probs, result.ranked, notes, strict=True)]


def _ood_check(screen: Screen) -> Annotator:
    """The batcher's annotator: each image's OOD check, for a whole batch at once."""
    return lambda crops, k: screen.check_batch(crops, _POLICY_OF_K[k])
