"""HTTP response bodies."""

from __future__ import annotations

from pydantic import BaseModel

from sota_serve.errors import ImageError
from sota_serve.predictions import Classified, OODResult, Prediction
from sota_serve.serving.pipeline import Answers


class ClassifyResponse(BaseModel):
    model: str
    #: the TTA policy that ran
    tta: str
    #: the policy asked for; another than ``tta`` when the fallback ladder served a cheaper one
    requested_tta: str
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
    requested_tta: str  # as in ClassifyResponse
    #: one image of a batch: ``{"predictions": [...], "ood": {...} | null}``, or its error
    results: list[Classified | BatchError]

    @classmethod
    def of(cls, model: str, answers: Answers) -> BatchResponse:
        return cls(model=model, tta=answers.tta, requested_tta=answers.requested_tta or answers.tta, results=[
            BatchError(error=str(r), status=r.http_status) if isinstance(r, ImageError) else r
            for r in answers.results])
