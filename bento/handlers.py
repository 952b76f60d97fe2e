"""What the service does per request, apart from HTTP wiring: check parameters, decode and
preprocess on a thread pool, hand the crops to the in-process batcher with a deadline, rank.

Every typed sota-serve error becomes a JSON response with its documented status (503s with
``Retry-After``) instead of an exception: BentoML would log a traceback for each client
mistake and replace the message of any 5xx with a generic one.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image
from starlette.responses import Response

from bento.schemas import BatchError, BatchPredictions, BatchResponse, ClassifyResponse
from sota_serve.admission import Admission, Ticket
from sota_serve.batcher import DynamicBatcher
from sota_serve.card import ModelCard
from sota_serve.device_preprocess import DevicePreprocessor, concat_rows
from sota_serve.errors import ImageError, OverloadedError, SotaServeError
from sota_serve.predictions import Prediction, check_top_k, top_k_predictions
from sota_serve.preprocess import Preprocessor

Answer = tuple[int, dict[str, str], bytes]  # status, headers, JSON body


def error_answer(e: SotaServeError) -> Answer:
    """The documented error shape, ``{"error": message}``, with ``Retry-After`` on 503."""
    headers = {"Retry-After": str(e.retry_after_s)} if isinstance(e, OverloadedError) else {}
    return e.http_status, headers, json.dumps({"error": str(e)}).encode()


def error_response(e: SotaServeError) -> Response:
    """:func:`error_answer` as a Starlette response (for the ``@bentoml.api`` methods)."""
    status, headers, body = error_answer(e)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


class RequestHandler:
    def __init__(self, card: ModelCard, pre: Preprocessor, batcher: DynamicBatcher, admission: Admission,
                 *, deadline_s: float, decode_threads: int, device_pre: DevicePreprocessor | None = None) -> None:
        self.card, self.pre, self.batcher, self.admission = card, pre, batcher, admission
        # Crops made on the model's device when decoding there is on (SOTA_SERVE_DECODE).
        self.decoder: Preprocessor | DevicePreprocessor = device_pre or pre
        self.deadline_s = deadline_s
        self.decode_pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="sota-decode")

    def params(self, tta: str, top_k: int) -> tuple[int, int]:
        """(crops per image, k); raises BadRequestError (422)."""
        return self.pre.crops_per_image(tta), check_top_k(top_k, self.card.num_classes)

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
        crops = self.decoder(data, tta)  # the guard already bounded the body size
        self.admission.learn_decode(len(data), time.perf_counter() - started)
        return crops

    async def _decode_all(self, images: Sequence[bytes], tta: str) -> list[Any]:
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.decode_pool, self._decode, data, tta) for data in images]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, ImageError):
                raise r
        return results  # type: ignore[return-value]

    async def classify(self, image: bytes, tta: str, top_k: int, ticket: Ticket | None) -> ClassifyResponse:
        """``POST /classify``; raises typed errors (a bad image, parameters, overload)."""
        k, top_k = self.params(tta, top_k)
        (result,) = await self.predictions([image], tta, k, top_k, ticket)
        if isinstance(result, ImageError):
            raise result
        return ClassifyResponse(model=self.card.tag, tta=tta, predictions=result)

    async def classify_batch(self, images: Sequence[bytes], tta: str, top_k: int,
                             ticket: Ticket | None) -> BatchResponse:
        """``POST /classify_batch``: one entry per image; a bad image fails only its entry."""
        k, top_k = self.params(tta, top_k)
        results = await self.predictions(images, tta, k, top_k, ticket)
        entries = [BatchError(error=str(r), status=r.http_status) if isinstance(r, ImageError)
                   else BatchPredictions(predictions=r) for r in results]
        return BatchResponse(model=self.card.tag, tta=tta, results=entries)

    async def predictions(self, images: Sequence[bytes], tta: str, k: int, top_k: int,
                          ticket: Ticket | None = None) -> list[list[Prediction] | ImageError]:
        """One entry per image, in order: its ranked predictions, or its typed error.

        ``ticket`` is the request's admission ticket (the guard's); progress is reported on it
        so that admission sees decoded bytes and queued crops as they change. The request's
        deadline counts from its admission.
        """
        ticket = ticket or Ticket()
        self.admission.charge(ticket, len(images) * k)
        try:
            decoded = await self._decode_all(images, tta)
        finally:
            self.admission.decoded(ticket)
        good = [i for i, item in enumerate(decoded) if not isinstance(item, BaseException)]
        out: list[list[Prediction] | ImageError] = list(decoded)  # type: ignore[arg-type]
        try:
            if good:
                crops = concat_rows([decoded[i] for i in good])
                probs = await self.batcher.submit(crops, k, ticket.admitted_at + self.deadline_s)
                for i, p in zip(good, probs, strict=True):
                    out[i] = top_k_predictions(p, self.card.labels, top_k)
        finally:
            self.admission.computed(ticket)
        return out
