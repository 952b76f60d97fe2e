"""Validation metrics (fastai's pipeline and the exported package) and the parity figure."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import fastai.callback.progress  # noqa: F401  (patches Learner.no_bar)
import numpy as np
from fastai.learner import Learner

from sota_serve.classifier import Classifier
from sota_serve.errors import SotaServeError
from sota_serve.progress import interactive, progress

#: Below this top-1 agreement between fastai and the package, the package is refused.
MIN_PARITY = 0.99


class ParityError(SotaServeError):
    """The exported package does not reproduce fastai's validation predictions."""


@dataclasses.dataclass
class FastaiEval:
    probs: np.ndarray
    targets: np.ndarray
    loss: float
    accuracy: float
    tta_accuracy: float


def fastai_eval(learn: Learner) -> FastaiEval:
    """fastai's own view: get_preds on the validation set, its loss, and ``learn.tta()``."""
    with ExitStack() as quiet:
        if not interactive():
            quiet.enter_context(learn.no_bar())
            quiet.enter_context(learn.no_logging())
        probs, targets = learn.get_preds(ds_idx=1)
        loss = float(learn.validate()[0])
        tta_probs, _ = learn.tta(ds_idx=1)
    p, t = probs.float().numpy(), targets.numpy()
    return FastaiEval(
        probs=p,
        targets=t,
        loss=loss,
        accuracy=float((p.argmax(1) == t).mean()),
        tta_accuracy=float((tta_probs.float().numpy().argmax(1) == t).mean()),
    )


def package_probs(clf: Classifier, files: Sequence[Path], tta: str, desc: str) -> np.ndarray:
    step = 64
    parts = [
        clf.probabilities([f.read_bytes() for f in files[i : i + step]], tta)
        for i in progress(range(0, len(files), step), desc=desc)
    ]
    return np.concatenate(parts)


def five_crop_search(
    clf: Classifier, files: Sequence[Path], targets: np.ndarray, edges: Sequence[int]
) -> tuple[int, dict[int, float]]:
    """Five-crop accuracy through the package at each resize edge; the best edge wins."""
    scores: dict[int, float] = {}
    for edge in edges:
        clf.preprocessor = dataclasses.replace(clf.preprocessor, five_crop_edge=edge)
        probs = package_probs(clf, files, "five_crop", f"five-crop @{edge}")
        scores[edge] = float((probs.argmax(1) == targets).mean())
    best = max(scores, key=lambda e: (scores[e], -e))
    return best, scores


def parity(fastai_probs: np.ndarray, served_probs: np.ndarray, backend: str) -> dict[str, Any]:
    agree = float((fastai_probs.argmax(1) == served_probs.argmax(1)).mean())
    return {
        "images": int(len(fastai_probs)),
        "backend": backend,
        "reference": "fastai learn.get_preds on the validation DataLoader",
        "top1_agreement": agree,
        "max_abs_diff": float(np.abs(fastai_probs - served_probs).max()),
        "passed": agree >= MIN_PARITY,
    }
