"""HTTP response bodies."""

from __future__ import annotations

from pydantic import BaseModel

from sota_serve.errors import ImageError
from sota_serve.predictions import Classified, OODResult, Prediction
from sota_serve.serving.pipeline import Answers


class ClassifyResponse(BaseModel):
    model: str
    tta: str
    predictions: list[Prediction]
    #: present when the model card is calibrated for it (extension to the design notes)
    ood: OODResult | None = None


class BatchError(BaseModel):
    error: str
    #: the status this image alone would have got from /classify
    status: int


class BatchResponse(BaseModel):
    model: str
    tta: str
    #: one image of a batch: ``{"predictions": [...], "ood": {...} | null}``, or its error
    results: list[Classified | BatchError]

    @classmethod
    def of(cls, model: str, answers: Answers) -> BatchResponse:
        return cls(model=model, tta=answers.tta, results=[
            BatchError(error=str(r), status=r.http_status) if isinstance(r, ImageError) else r
            for r in answers.results])
