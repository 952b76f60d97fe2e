"""HTTP response bodies."""

from __future__ import annotations

from pydantic import BaseModel

from sota_serve.predictions import Classified, OODResult, Prediction


class ClassifyResponse(BaseModel):
    model: str
    tta: str
    predictions: list[Prediction]
    #: present when the model card is calibrated for it (extension to the design notes)
    ood: OODResult | None = None


#: One image of a batch: ``{"predictions": [...], "ood": {...} | null}``.
BatchPredictions = Classified


class BatchError(BaseModel):
    error: str
    #: the status this image alone would have got from /classify
    status: int


class BatchResponse(BaseModel):
    model: str
    tta: str
    results: list[BatchPredictions | BatchError]
