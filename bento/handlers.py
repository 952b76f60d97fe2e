"""What the API service does per request, apart from HTTP wiring: check parameters,
decode and preprocess off the event loop, call the batched model with a deadline, rank."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from pathlib import Path

import aiohttp
import anyio
import numpy as np
from bentoml.exceptions import BentoMLException

from bento.schemas import BatchError, BatchPredictions
from sota_serve.card import ModelCard
from sota_serve.errors import ImageError, SotaServeError
from sota_serve.predictions import Prediction, check_top_k, top_k_predictions
from sota_serve.preprocess import Preprocessor

Infer = Callable[[np.ndarray], Awaitable[np.ndarray]]


def http_error(e: SotaServeError) -> BentoMLException:
    """A typed sota-serve error as the BentoML exception carrying its HTTP status."""
    return BentoMLException(str(e), error_code=HTTPStatus(e.http_status))


def _recycled_connection(e: BaseException) -> bool:
    # aiohttp reports a closed connection as ClientConnectionError while writing the request,
    # ClientPayloadError or RuntimeError("Connection closed.") while reading the response.
    if isinstance(e, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return True
    return isinstance(e, RuntimeError) and "Connection closed" in str(e)


async def _retry_once(run: Infer, chunk: np.ndarray) -> np.ndarray:
    """BentoML's dependency client (1.4.39) recycles its connection pool every 100 calls and
    closes connections other calls are still using; inference is idempotent, so a call that
    hit a closing connection is sent once more."""
    try:
        return await run(chunk)
    except Exception as e:
        if not _recycled_connection(e):
            raise
        return await run(chunk)


class RequestHandler:
    def __init__(self, card: ModelCard, pre: Preprocessor, *, deadline_s: float, chunk: dict[str, int]) -> None:
        self.card, self.pre, self.deadline_s, self.chunk = card, pre, deadline_s, chunk

    def params(self, tta: str, top_k: int) -> tuple[str, int]:
        try:
            self.pre.crops_per_image(tta)
            return tta, check_top_k(top_k, self.card.num_classes)
        except SotaServeError as e:
            raise http_error(e) from e

    async def crops(self, path: Path, tta: str) -> np.ndarray:
        """(1, 3, H, W) or (1, 5, 3, H, W) uint8 for one uploaded file."""

        def work() -> np.ndarray:
            data = path.read_bytes()  # the guard already bounded the body size
            crops = self.pre(data, tta)
            return crops if tta == "none" else crops[None]

        return await anyio.to_thread.run_sync(work)

    async def infer(self, batch: np.ndarray, run: Infer, started: float) -> np.ndarray:
        """Run in chunks of the batcher's max size; drop work still queued past the deadline."""
        size = self.chunk["none" if batch.ndim == 4 else "five_crop"]
        remaining = self.deadline_s - (time.monotonic() - started)
        if remaining <= 0:
            raise BentoMLException("request dropped: it waited past the deadline before inference",
                                   error_code=HTTPStatus.SERVICE_UNAVAILABLE)
        try:
            parts = await asyncio.wait_for(
                asyncio.gather(*(_retry_once(run, batch[i : i + size]) for i in range(0, len(batch), size))),
                timeout=remaining,
            )
        except TimeoutError as e:
            raise BentoMLException(
                f"request dropped: no result within the {self.deadline_s:g}s deadline (server overloaded)",
                error_code=HTTPStatus.SERVICE_UNAVAILABLE,
            ) from e
        return np.concatenate(parts)

    def rank(self, probs: np.ndarray, k: int) -> list[Prediction]:
        return top_k_predictions(probs, self.card.labels, k)

    async def batch(self, paths: Sequence[Path], tta: str, k: int, run: Infer, started: float) -> list[BatchPredictions | BatchError]:
        """Every image gets an entry, in request order; a bad image does not fail the others."""
        decoded = await asyncio.gather(*(self.crops(p, tta) for p in paths), return_exceptions=True)
        for item in decoded:
            if isinstance(item, BaseException) and not isinstance(item, ImageError):
                raise item
        good = [i for i, item in enumerate(decoded) if not isinstance(item, BaseException)]
        ranked: dict[int, BatchPredictions] = {}
        if good:
            probs = await self.infer(np.concatenate([decoded[i] for i in good]), run, started)
            ranked = {i: BatchPredictions(predictions=self.rank(p, k)) for i, p in zip(good, probs, strict=True)}
        return [
            ranked[i] if i in ranked else BatchError(error=str(item), status=item.http_status)  # type: ignore[union-attr]
            for i, item in enumerate(decoded)
        ]
