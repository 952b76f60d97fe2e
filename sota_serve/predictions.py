"""Probabilities -> ranked, labelled predictions (the shape of every JSON answer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict

from sota_serve.errors import BadRequestError

DEFAULT_TOP_K = 5
#: classes ranked per image ahead of the request (:func:`rank_rows`); a request for more sorts
RANKED = 10
MAX_TOP_K = 1000


class Prediction(BaseModel):
    model_config = ConfigDict(frozen=True)

    label: str
    score: float


class OODResult(BaseModel):
    """How unlike the training images an input looks (:mod:`sota_serve.image.ood`)."""

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


def rank_rows(probs: np.ndarray, k: int = RANKED) -> np.ndarray:
    """(N, C) scores -> (N, min(k, C)) class indices: exactly ``top_k_indices(probs, k)``.

    The batcher ranks each batch with it on a model thread, so that the event loop never
    sorts: numpy's sorts release the GIL even for 10 numbers, and a loop thread that gives
    the GIL up waits to get it back behind the decode threads (a 2.5 us argsort took 72 us on
    the loop under load). A partition finds each row's k highest, then only those k are sorted:
    a tenth of a full stable sort for 1000 classes. Rows with a tie across the k-th place, or
    a NaN, are sorted whole, so the order stays the stable sort's.
    """
    n, c = probs.shape
    k = min(k, c)
    if k == c or n == 0:
        return top_k_indices(probs, k)
    kth = -np.partition(-probs, k - 1, axis=1)[:, k - 1]  # each row's k-th highest score
    above = probs >= kth[:, None]
    simple = above.sum(1) == k
    out = np.empty((n, k), dtype=np.intp)
    if simple.any():
        idx = np.nonzero(above[simple])[1].reshape(-1, k)  # ascending in each row
        order = np.argsort(-np.take_along_axis(probs[simple], idx, 1), axis=1, kind="stable")
        out[simple] = np.take_along_axis(idx, order, 1)
    if not simple.all():
        out[~simple] = top_k_indices(probs[~simple], k)
    return out


def top_k_predictions(probs: np.ndarray, labels: Sequence[str], k: int,
                      ranked: np.ndarray | None = None) -> list[Prediction]:
    """The ``k`` highest scores of one probability vector, highest first (stable on ties).
    ``ranked``: the row's leading class indices from :func:`rank_rows`, used when it has k."""
    idx = ranked[:k] if ranked is not None and len(ranked) >= k else top_k_indices(probs, k)
    return [Prediction(label=labels[i], score=float(probs[i])) for i in idx.tolist()]


class Ranked(NamedTuple):
    """A batch's answer for n images: (n, C) probabilities, each row's leading class indices,
    highest first (``rank_rows``), and the annotator's value for each image (None: no annotator)."""

    probs: np.ndarray
    ranked: np.ndarray
    notes: list[Any] | None = None

    def rows(self, start: int, stop: int) -> Ranked:
        notes = self.notes[start:stop] if self.notes is not None else None
        return Ranked(self.probs[start:stop], self.ranked[start:stop], notes)
