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
from sota_serve.image import ood
from sota_serve.image.preprocess import Preprocessor
from sota_serve.package.card import Parity
from sota_serve.progress import interactive, progress, step
from sota_serve.tta import CROPS_PER_IMAGE

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
    step(f"evaluate tta {tta} (resize {clf.preprocessor.edge(tta)}) on {len(files)} validation images")
    return clf.probabilities_of_files(files, tta, desc=desc)


def edge_search(
    clf: Classifier, files: Sequence[Path], targets: np.ndarray, policy: str, edges: Sequence[int]
) -> tuple[int, dict[int, float]]:
    """``policy``'s accuracy through the package at each resize edge; the best edge wins
    (the smaller one on a tie)."""
    scores: dict[int, float] = {}
    for edge in edges:
        clf.preprocessor = dataclasses.replace(
            clf.preprocessor, tta_edges={**clf.preprocessor.tta_edges, policy: edge})
        probs = package_probs(clf, files, policy, f"{policy} @{edge}")
        scores[edge] = float((probs.argmax(1) == targets).mean())
    best = max(scores, key=lambda e: (scores[e], -e))
    return best, scores


#: z for a two-sided 95 % test: a policy's gain must exceed this many standard errors.
_Z = 1.96


def paired_gain(base_correct: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    """A policy against ``none`` on the same images (McNemar's test, normal approximation):
    only the images where exactly one of the two is right tell them apart."""
    wins = int((correct & ~base_correct).sum())
    losses = int((base_correct & ~correct).sum())
    noise = _Z * float(np.sqrt(wins + losses))
    return {"gain": (wins - losses) / max(1, len(correct)), "wins": wins, "losses": losses,
            "significant": wins - losses > noise and wins > losses}


def choose_default(accuracy: dict[str, float], gains: dict[str, dict[str, Any]],
                   calls: dict[str, int]) -> str:
    """The most accurate policy whose gain over ``none`` is significant, fewer calls on a tie;
    ``none`` when no gain is."""
    candidates = [p for p, g in gains.items() if g["significant"]]
    if not candidates:
        return "none"
    return max(candidates, key=lambda p: (accuracy[p], -calls[p]))


@dataclasses.dataclass
class TTAEvaluation:
    """Every TTA policy measured through the package, and the default chosen from that.

    Resize edges are tuned on the even-indexed validation images; the held-out figures (and
    the choice of default) use only the odd-indexed ones, so they are not optimistic. The
    full-set accuracies are comparable to the plain ``accuracy`` but include the tuning half.
    """

    edges: dict[str, int]
    accuracy: dict[str, float]
    held_out: dict[str, float]
    gains: dict[str, dict[str, Any]]
    searched: dict[str, dict[int, float]]
    default: str
    tune_images: int
    held_out_images: int

    def card_tta(self) -> dict[str, Any]:
        """The card's ``tta`` section."""
        return {"default": self.default, **{p: {"resize_shortest_edge": e} for p, e in self.edges.items()}}

    def metrics(self) -> dict[str, Any]:
        """Flat ``accuracy_<policy>`` keys (next to ``accuracy``) and the ``tta`` record."""
        policies = {
            p: {"accuracy": self.accuracy[p], "accuracy_held_out": self.held_out[p],
                "model_calls_per_image": CROPS_PER_IMAGE[p],
                **({"resize_shortest_edge": self.edges[p]} if p in self.edges else {}),
                **({"held_out_vs_none": self.gains[p]} if p in self.gains else {}),
                **({"tune_accuracy_by_resize": {str(e): a for e, a in self.searched[p].items()}}
                   if p in self.searched else {})}
            for p in self.accuracy
        }
        return {
            **{f"accuracy_{p}": a for p, a in self.accuracy.items() if p != "none"},
            "tta": {
                "policies": policies,
                "default": self.default,
                "tune_images": self.tune_images,
                "held_out_images": self.held_out_images,
                "selection": "resize edges tuned on the even-indexed validation images; the default"
                             " is the most accurate policy on the odd-indexed (held-out) ones whose"
                             " gain over none passes McNemar's test at 95 %, else none",
            },
        }


def evaluate_tta(clf: Classifier, files: Sequence[Path], targets: np.ndarray, plain: np.ndarray,
                 *, flip_edge: int, edges: Sequence[int]) -> TTAEvaluation:
    """``plain``: the package's probabilities with ``none`` on ``files`` (already computed)."""
    chosen: dict[str, int] = {"flip": flip_edge}
    searched: dict[str, dict[int, float]] = {}
    for policy in ("five_crop", "ten_crop"):
        chosen[policy], searched[policy] = edge_search(clf, files[0::2], targets[0::2], policy, edges)
    clf.preprocessor = dataclasses.replace(clf.preprocessor, tta_edges=chosen)
    probs = {"none": plain, **{p: package_probs(clf, files, p, f"{p} eval") for p in chosen}}
    correct = {p: pr.argmax(1) == targets for p, pr in probs.items()}
    held_out = {p: float(c[1::2].mean()) for p, c in correct.items()}
    gains = {p: paired_gain(correct["none"][1::2], correct[p][1::2]) for p in chosen}
    return TTAEvaluation(
        edges=chosen,
        accuracy={p: float(c.mean()) for p, c in correct.items()},
        held_out=held_out,
        gains=gains,
        searched=searched,
        default=choose_default(held_out, gains, CROPS_PER_IMAGE),
        tune_images=len(files[0::2]),
        held_out_images=len(files[1::2]),
    )


def calibrate_ood(pre: Preprocessor, train_files: Sequence[Path], valid_files: Sequence[Path],
                  policies: Sequence[str], *, sample: int = 1000, seed: int = 0,
                  percentile: float = 99.0) -> dict[str, Any]:
    """The card's ``ood`` section: per policy, a Gaussian over the crops' statistics of (up to
    ``sample``) training images, its threshold at ``percentile`` of the validation images'."""
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(train_files), size=min(sample, len(train_files)), replace=False))
    fit_files = [train_files[i] for i in picked]
    step(f"OOD fit on {len(fit_files)} training images, threshold on {len(valid_files)} validation images")

    def vectors(files: Sequence[Path], desc: str) -> dict[str, np.ndarray]:
        """Each file decoded once, then cropped for every policy."""
        rows: dict[str, list[np.ndarray]] = {p: [] for p in policies}
        for f in progress(files, desc=desc):
            img = pre.decode(f.read_bytes())
            for p in policies:
                rows[p].append(ood.features(pre.crops(img, p)))
        return {p: np.stack(r) for p, r in rows.items()}

    fit, calibration = vectors(fit_files, "ood fit"), vectors(valid_files, "ood calibration")
    fits = {p: ood.fit_policy(fit[p], calibration[p], percentile=percentile) for p in policies}
    return ood.spec(fits, percentile=percentile, fit_images=len(fit_files),
                    calibration_images=len(valid_files))


def parity(fastai_probs: np.ndarray, served_probs: np.ndarray, backend: str) -> Parity:
    agree = float((fastai_probs.argmax(1) == served_probs.argmax(1)).mean())
    return Parity(
        images=int(len(fastai_probs)),
        backend=backend,
        reference="fastai learn.get_preds on the validation DataLoader",
        top1_agreement=agree,
        max_abs_diff=float(np.abs(fastai_probs - served_probs).max()),
        passed=agree >= MIN_PARITY,
    )
