"""What the service does per request, apart from HTTP wiring: check parameters, get
probabilities from the pipeline (this worker's, or the GPU engine's) with a deadline, rank.

Every typed sota-serve error becomes a JSON response with its documented status (503s with
``Retry-After``) instead of an exception: BentoML would log a traceback for each client
mistake and replace the message of any 5xx with a generic one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np
from starlette.responses import Response

from bento.pipeline import Results
from bento.schemas import BatchError, BatchResponse, ClassifyResponse
from sota_serve.admission import Ticket
from sota_serve.card import ModelCard
from sota_serve.errors import ImageError, OverloadedError, SotaServeError
from sota_serve.predictions import Classified, check_top_k, top_k_predictions
from sota_serve.preprocess import Preprocessor

Answer = tuple[int, dict[str, str], bytes]  # status, headers, JSON body


class Scores(NamedTuple):
    """A whole request's answer for protocols without per-image entries."""

    tta: str
    probs: np.ndarray  # (N, C) float32


def error_answer(e: SotaServeError) -> Answer:
    """The documented error shape, ``{"error": message}``, with ``Retry-After`` on 503."""
    headers = {"Retry-After": str(e.retry_after_s)} if isinstance(e, OverloadedError) else {}
    return e.http_status, headers, json.dumps({"error": str(e)}).encode()


def error_response(e: SotaServeError) -> Response:
    """:func:`error_answer` as a Starlette response (for the ``@bentoml.api`` methods)."""
    status, headers, body = error_answer(e)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


class Pipeline(Protocol):
    """Where probabilities come from: ``bento.pipeline.LocalPipeline`` or ``bento.engine.EngineClient``."""

    async def probabilities(self, images: Sequence[bytes], tta: str, k: int, ticket: Ticket,
                            deadline: float) -> Results: ...

    async def pixels(self, crops: np.ndarray, ticket: Ticket, deadline: float) -> Results:
        """Already-preprocessed (N, 3, H, W) uint8 crops, one per image (no TTA)."""
        ...


class RequestHandler:
    def __init__(self, card: ModelCard, pre: Preprocessor, pipeline: Pipeline, *,
                 deadline_s: float) -> None:
        self.card, self.pre, self.pipeline, self.deadline_s = card, pre, pipeline, deadline_s

    def params(self, tta: str | None, top_k: int) -> tuple[str, int, int]:
        """(policy, crops per image, top k); an omitted ``tta`` is the card's ``tta.default``.
        Raises BadRequestError (422)."""
        tta = tta or self.card.tta.default
        return tta, self.pre.crops_per_image(tta), check_top_k(top_k, self.card.num_classes)

    async def classify(self, image: bytes, tta: str | None, top_k: int, ticket: Ticket | None) -> ClassifyResponse:
        """``POST /classify``; raises typed errors (a bad image, parameters, overload)."""
        tta, k, top_k = self.params(tta, top_k)
        (result,) = await self.predictions([image], tta, k, top_k, ticket)
        if isinstance(result, ImageError):
            raise result
        return ClassifyResponse(model=self.card.tag, tta=tta, predictions=result.predictions, ood=result.ood)

    async def classify_batch(self, images: Sequence[bytes], tta: str | None, top_k: int,
                             ticket: Ticket | None) -> BatchResponse:
        """``POST /classify_batch``: one entry per image; a bad image fails only its entry."""
        tta, k, top_k = self.params(tta, top_k)
        results = await self.predictions(images, tta, k, top_k, ticket)
        entries = [BatchError(error=str(r), status=r.http_status) if isinstance(r, ImageError)
                   else r for r in results]
        return BatchResponse(model=self.card.tag, tta=tta, results=entries)

    async def predictions(self, images: Sequence[bytes], tta: str, k: int, top_k: int,
                          ticket: Ticket | None = None) -> list[Classified | ImageError]:
        """One entry per image, in order: its ranked predictions and OOD check, or its typed error.

        ``ticket`` is the request's admission ticket (the guard's). The request's deadline
        counts from its admission.
        """
        ticket = ticket or Ticket()
        results = await self.pipeline.probabilities(images, tta, k, ticket, ticket.admitted_at + self.deadline_s)
        return [r if isinstance(r, ImageError)
                else Classified(predictions=top_k_predictions(r.probs, self.card.labels, top_k, r.ranked), ood=r.ood)
                for r in results]

    async def scores(self, images: Sequence[bytes] | None, pixels: np.ndarray | None,
                     tta: str | None, ticket: Ticket | None) -> Scores:
        """The policy and (N, C) float32 probabilities of encoded ``images`` or of
        preprocessed ``pixels`` (one of them), for protocols without per-image errors: the
        first bad image fails the request, its message naming which one."""
        ticket = ticket or Ticket()
        deadline = ticket.admitted_at + self.deadline_s
        if pixels is not None:
            tta = "none"  # pixels are single crops
            results = await self.pipeline.pixels(pixels, ticket, deadline)
        else:
            assert images is not None, "scores needs images or pixels"
            tta, k, _ = self.params(tta, 1)
            results = await self.pipeline.probabilities(images, tta, k, ticket, deadline)
        probs = []
        for i, r in enumerate(results):
            if isinstance(r, ImageError):
                raise type(r)(f"image {i} of {len(results)}: {r}")
            probs.append(r.probs)
        return Scores(tta, np.stack(probs).astype(np.float32, copy=False))
