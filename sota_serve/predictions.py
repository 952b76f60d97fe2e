"""Probabilities -> ranked, labelled predictions (the shape of every JSON answer)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from sota_serve.errors import BadRequestError

DEFAULT_TOP_K = 5
MAX_TOP_K = 1000


class Prediction(BaseModel):
    model_config = ConfigDict(frozen=True)

    label: str
    score: float


class OODResult(BaseModel):
    """How unlike the training images an input looks (:mod:`sota_serve.ood`)."""

    model_config = ConfigDict(frozen=True)

    #: Mahalanobis distance of the input's statistics to the training images'
    distance: float
    #: the card's threshold: the share of validation images above it is ``ood.percentile``'s complement
    threshold: float
    #: distance > threshold: the predictions are not backed by the validation accuracy
    out_of_distribution: bool


class Classified(BaseModel):
    """One image's answer: its ranked predictions and, when the card is calibrated, its OOD check."""

    predictions: list[Prediction]
    ood: OODResult | None = None


def check_top_k(top_k: int, num_classes: int) -> int:
    """Clamp to the number of classes; refuse non-positive or absurd values."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
        raise BadRequestError(f"top_k must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}")
    return min(top_k, num_classes)


def top_k_indices(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores along the last axis, highest first (stable on ties)."""
    return np.argsort(-probs, axis=-1, kind="stable")[..., :k]


def top_k_predictions(probs: np.ndarray, labels: Sequence[str], k: int) -> list[Prediction]:
    """The ``k`` highest scores of one probability vector, highest first (stable on ties)."""
    return [Prediction(label=labels[i], score=float(probs[i])) for i in top_k_indices(probs, k)]
