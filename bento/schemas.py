"""HTTP response bodies."""

from __future__ import annotations

from pydantic import BaseModel

from sota_serve.predictions import Prediction


class ClassifyResponse(BaseModel):
    model: str
    tta: str
    predictions: list[Prediction]


class BatchPredictions(BaseModel):
    predictions: list[Prediction]


class BatchError(BaseModel):
    error: str
    #: the status this image alone would have got from /classify
    status: int


class BatchResponse(BaseModel):
    model: str
    tta: str
    results: list[BatchPredictions | BatchError]
