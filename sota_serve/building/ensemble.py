"""Ensembles: several packages of one task averaged into one package.

Each format combines its members' files into one graph that runs every member on the same
uint8 pixels and returns the weighted mean of their probabilities (:meth:`ArtifactFormat.combine`),
so the ensemble serves, batches and does five-crop TTA like any single model. Members must agree
on labels, input size and preprocessing (the crops they see); their normalization may differ,
since each graph normalizes its own input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sota_serve import formats
from sota_serve.classifier import Classifier
from sota_serve.errors import SotaServeError
from sota_serve.image.preprocess import Preprocessor
from sota_serve.package.card import (
    EnsembleMember,
    EnsembleSpec,
    ExportRecord,
    Metrics,
    ModelCard,
    Parity,
    new_version,
)
from sota_serve.package.loading import ModelPackage, draft_package, open_package
from sota_serve.progress import progress

#: Largest |p_ensemble - sum(w_i p_i)| accepted, per probability (float32 sums).
TOLERANCE = 1e-5


class EnsembleError(SotaServeError, ValueError):
    """The packages cannot be ensembled (they disagree on what they classify or how they crop)."""


def check_members(cards: Sequence[ModelCard]) -> None:
    """Refuse members that do not classify the same crops into the same labels, naming the field."""
    if len(cards) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 packages, got {len(cards)}")
    tags = [c.tag for c in cards]
    if len(set(tags)) != len(tags):
        twice = sorted({t for t in tags if tags.count(t) > 1})
        raise EnsembleError(f"{', '.join(twice)} given more than once; weight a member with --weights instead")
    first = cards[0]
    for card in cards[1:]:
        fields = [("labels", first.labels, card.labels),
                  ("input.height", first.input.height, card.input.height),
                  ("input.width", first.input.width, card.input.width),
                  ("input.dtype", first.input.dtype, card.input.dtype),
                  ("output", first.output, card.output),
                  *((f"preprocess.{k}", v, getattr(card.preprocess, k)) for k, v in first.preprocess)]
        for field, want, got in fields:
            if want != got:
                raise EnsembleError(
                    f"{card.tag}: {field} is {got!r} but {first.tag} has {want!r}; the members of an"
                    f" ensemble must agree on {field} (the graph feeds all of them the same crops"
                    " and averages the same labels)"
                )
    for card in cards:
        if not card.normalization.in_graph or card.output != "probabilities":
            raise EnsembleError(
                f"{card.tag}: ensembles average probabilities of graphs that normalize their own"
                " uint8 input (normalization.in_graph true, output probabilities)"
            )


def normalized_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n or any(not w > 0 for w in weights):
        raise EnsembleError(f"give one positive weight per member ({n}), got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


@dataclass(frozen=True)
class Validation:
    """Labelled images to measure the ensemble and its members on: ``targets[i]`` is the index
    in the card's labels of ``files[i]``."""

    files: list[Path]
    targets: np.ndarray


def ensemble_card(members: Sequence[ModelPackage], weights: list[float], *, name: str | None,
                  fmts: Sequence[str]) -> ModelCard:
    """The serving part: the first member's (labels, crops, TTA edges and default, OOD fit: all
    about the crops, which the members share), plus the members."""
    first = members[0].card
    spec = EnsembleSpec(members=[
        EnsembleMember(tag=p.card.tag, sha256={f: p.card.artifacts[f].sha256 for f in fmts if f in p.card.artifacts},
                       weight=w, accuracy=p.card.metrics.accuracy if p.card.metrics else None,
                       normalization=p.card.normalization)
        for p, w in zip(members, weights, strict=True)])
    keep = ("labels", "input", "preprocess", "normalization", "output", "tta", "ood", "license")
    data = {k: v for k, v in first.to_dict().items() if k in keep}
    return ModelCard.parse({
        **data, "schema_version": first.schema_version, "name": name or f"{first.name}-ensemble{len(members)}",
        "version": new_version(), "ensemble": spec.model_dump(mode="json"),
        "architecture": "ensemble of " + ", ".join(sorted({p.card.arch or "?" for p in members})),
        "intended_use": first.intended_use, "limitations": first.limitations,
    })


def build_ensemble(paths: Sequence[str | Path | ModelPackage], out_dir: str | Path, *,
                   weights: Sequence[float] | None = None, name: str | None = None,
                   validation: Validation | None = None) -> ModelCard:
    """Verify the members (package paths or tags, or packages already opened), combine each
    format they all have, check every combined file against the weighted mean of its members,
    measure on ``validation`` when given, write the package."""
    from sota_serve.building.export import write_package

    members = [p if isinstance(p, ModelPackage) else open_package(p) for p in paths]
    check_members([m.card for m in members])
    w = normalized_weights(weights, len(members))
    fmts = [f for f in formats.NAMES if all(f in m.artifacts for m in members)]
    if not fmts:
        raise EnsembleError("the members share no format; export them with a common one")
    card = ensemble_card(members, w, name=name, fmts=fmts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for f in progress(fmts, desc="combine"):
        files[f] = out / formats.get(f).file_name
        formats.get(f).combine([m.read_artifact(f) for m in members], w, files[f])
    draft = draft_package(card, files, out)
    pre = Preprocessor.from_card(card)
    checks = _check_inputs(pre, validation)
    diffs = {f: _max_diff(draft, members, w, f, checks) for f in fmts}
    bad = {f: d for f, d in diffs.items() if not d <= TOLERANCE}
    if bad:
        raise EnsembleError(f"the combined graph disagrees with its members' weighted mean: {bad}")
    record = ExportRecord(formats=fmts, check_images=len(checks), max_abs_diff=diffs, tolerance=TOLERANCE)
    sections: dict = {"export": record}
    if validation is not None:
        sections |= measure(draft, members, w, validation)
    return write_package(out, card.with_updates(**sections), files)


def measure(draft: ModelPackage, members: Sequence[ModelPackage], weights: list[float],
            validation: Validation) -> dict:
    """``metrics`` (the ensemble plain and five-crop, each member plain, on the same images) and
    ``parity`` (the ensemble file against the weighted mean of its members' files)."""
    # fp32 throughout: the combined file is made of the members' fp32 files
    clf = Classifier.from_package(draft, device="cpu", precision="fp32")
    files, t = validation.files, validation.targets
    probs = clf.probabilities_of_files(files, "none", desc="ensemble")
    member_probs = [Classifier.from_package(m, device="cpu", precision="fp32").probabilities_of_files(
                        files, "none", desc=m.card.tag) for m in members]
    mean = sum(wi * p for wi, p in zip(weights, member_probs, strict=True))
    five = (clf.probabilities_of_files(files, "five_crop", desc="ensemble five-crop")
            if "five_crop" in clf.preprocessor.policies else None)
    metrics = Metrics(
        accuracy=_accuracy(probs, t),
        accuracy_five_crop=_accuracy(five, t) if five is not None else None,
        valid_count=len(t),
        members={m.card.tag: _accuracy(p, t) for m, p in zip(members, member_probs, strict=True)},
    )
    agree = float((probs.argmax(1) == mean.argmax(1)).mean())
    diff = float(np.abs(probs - mean).max())
    parity = Parity(images=len(t), backend=formats.DEFAULT, reference="the weighted mean of the members'"
                    " own packages' probabilities", top1_agreement=agree, max_abs_diff=diff,
                    passed=diff <= TOLERANCE)
    return {"metrics": metrics, "parity": parity}


def _accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    return float((probs.argmax(1) == targets).mean())


def _check_inputs(pre: Preprocessor, validation: Validation | None) -> np.ndarray:
    """Up to 16 real validation crops, and random pixels."""
    shape = (3, pre.height, pre.width)
    noise = np.random.default_rng(0).integers(0, 256, (8, *shape), dtype=np.uint8)
    if validation is None:
        return noise
    return np.concatenate([*(pre(f.read_bytes()) for f in validation.files[:16]), noise])


def _max_diff(draft: ModelPackage, members: Sequence[ModelPackage], weights: list[float], fmt: str,
              x: np.ndarray) -> float:
    from sota_serve.runtime import load_runtime

    # the fp32 files: they are what the combined file is made of (auto would pick int8 on a CPU)
    got = load_runtime(draft, fmt, device="cpu", precision="fp32").predict(x)
    want = sum(w * load_runtime(m, fmt, device="cpu", precision="fp32").predict(x)
               for w, m in zip(weights, members, strict=True))
    return float(np.abs(got - want).max())
