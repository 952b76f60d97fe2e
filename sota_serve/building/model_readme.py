"""Render a card into the package's human-readable README.md (tables, plots, limits).

It opens with Hugging Face model-card front matter (YAML: license, tags, datasets, metrics as
a ``model-index``), so the package can be published as it is, and has the sections a model
card is expected to have: usage, how to reproduce, metrics with their caveats, limitations.
"""

from __future__ import annotations

import json
from typing import Any

from sota_serve.package.card import ModelCard, PolicyGain, PrecisionParity, accuracy_key
from sota_serve.tta import CROPS_TAKEN, LABELS, POLICIES

_MAX_LABELS = 60


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, int | float) else "-"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


#: A policy's row in the metrics table: "plain (center crop)", "five-crop TTA"...
_TTA_NAMES = {p: f"{LABELS[p]} (center crop)" if p == "none" else f"{LABELS[p]} TTA" for p in POLICIES}


def _metrics(card: ModelCard) -> list[str]:
    metrics = card.metrics
    if metrics is None:
        return []
    tta = metrics.tta
    out = ["## Metrics", "", f"Validation set: {_or(metrics.valid_count)} images.", ""]
    if tta and tta.policies:
        rows = [[_TTA_NAMES.get(p, p), _or(m.model_calls_per_image), _or(m.resize_shortest_edge),
                 _pct(m.accuracy), _pct(m.accuracy_held_out), _gain(m.held_out_vs_none)]
                for p, m in tta.policies.items()]
        rows.append(["fastai `learn.tta()`", "-", "-", _pct(metrics.accuracy_fastai_tta), "-", "-"])
        out += [_table(["prediction", "model calls/image", "resize", "accuracy",
                        f"held-out ({_or(tta.held_out_images, '?')} images)", "held-out gain vs plain"], rows), ""]
        out += [f"Default policy: `{tta.default or 'none'}`. Selection: {_or(tta.selection)}."
                " The held-out column is the unbiased one for policies whose resize edge was tuned.", ""]
    else:
        rows = [
            [_TTA_NAMES["none"], _pct(metrics.accuracy)],
            [f"{_TTA_NAMES['five_crop']} (resize {_or(metrics.five_crop_resize)})", _pct(metrics.accuracy_five_crop)],
            ["fastai `learn.tta()`", _pct(metrics.accuracy_fastai_tta)],
        ]
        out += [_table(["prediction", "accuracy"], rows), ""]
        tried = metrics.five_crop_by_resize
        if tried and len(tried) > 1:
            out += [f"The five-crop resize edge ({metrics.five_crop_resize}) was chosen among"
                    f" {', '.join(str(k) for k in tried)} on this same validation set, so the five-crop"
                    " figure is slightly optimistic; the plain figure involves no such choice.", ""]
    if metrics.valid_loss is not None:
        out += [f"Validation loss: {metrics.valid_loss:.4f}", ""]
    return out


def _or(value: Any, default: str = "-") -> Any:
    return default if value is None else value


def _gain(record: PolicyGain | None) -> str:
    if record is None:
        return "-"
    verdict = "significant" if record.significant else "within noise"
    return f"{100 * record.gain:+.2f} pts ({record.wins} won, {record.losses} lost; {verdict})"


def _history(card: ModelCard) -> list[str]:
    history = card.training.history if card.training else None
    if not history:
        return []
    header = ["epoch", "stage", "size", "train loss", "valid loss", "accuracy", "seconds"]
    rows = [
        [h.epoch, _or(h.stage), _or(h.size), f"{h.train_loss or 0:.4f}", f"{h.valid_loss or 0:.4f}",
         _pct(h.accuracy), f"{h.seconds or 0:.1f}"]
        for h in history
    ]
    return ["## Training history", "", _table(header, rows), ""]


def _figures(card: ModelCard) -> list[str]:
    return [f"![{name}]({path})\n" for name, path in (card.figures or {}).items()]


def _parity(card: ModelCard) -> list[str]:
    out = []
    if parity := card.parity:
        out += [
            "## Train/serve parity",
            "",
            f"{parity.images} validation images ran through fastai's own validation"
            f" pipeline and through this package ({parity.backend or 'onnx'}): top-1"
            f" agreement {_pct(parity.top1_agreement)}, largest probability difference"
            f" {parity.max_abs_diff:.2e}.",
            "",
        ]
    if export := card.export:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in export.max_abs_diff.items())
        out += [f"Export check (eager vs exported, {_or(export.check_images)} inputs): {diffs}.", ""]
    if half := card.fp16:
        out += _variant_section(half, "fp16", "a GPU", "on a CPU fp32 or int8 serves (fp16 is slower there)")
    if int8 := card.int8:
        fp32_layers = ", ".join(f"`{n}`" for n in (export.int8_fp32_layers or [])) if export else ""
        out += _variant_section(int8, "int8", "a CPU", "on a GPU fp32 or fp16 serves", extra=(
            f" Statically quantized by ONNX Runtime: weights per channel, activations per tensor,"
            f" ranges from {_or(export.int8_calibration_images if export else None)} preprocessed"
            f" training images; kept in fp32: the normalization, the softmax and {fp32_layers or 'no layer'}."))
    return out


def _variant_section(record: PrecisionParity, variant: str, device: str, otherwise: str,
                     extra: str = "") -> list[str]:
    return [
        f"## {variant}",
        "",
        f"Each {variant} file against its fp32 sibling on {record.images} {record.source} images, run on"
        f" {record.device}. `precision auto` serves {variant} on {device} where top-1 agreement is at"
        f" least {_pct(record.min_top1_agreement)}; {otherwise}.{extra}",
        "",
        _table(["format", "top-1 agreement", "max prob. difference", f"on {device} (auto)"],
               [[b, _pct(a), f"{record.max_abs_diff[b]:.2e}", variant if record.holds(b) else "fp32"]
                for b, a in record.top1_agreement.items()]),
        "",
    ]


def _yaml(value: Any) -> str:
    return json.dumps(value)  # a JSON scalar is a valid YAML flow scalar


#: "accuracy (center crop)", "accuracy (five-crop TTA)"..., by ``metrics`` key
_FRONT_MATTER_NAMES = {accuracy_key(p): f"accuracy ({'center crop' if p == 'none' else _TTA_NAMES[p]})"
                       for p in POLICIES}


def _front_matter(card: ModelCard) -> list[str]:
    dataset = card.training.dataset.name if card.training and card.training.dataset else None
    measured = card.metrics.accuracies(fastai=False) if card.metrics else []
    results = [(_FRONT_MATTER_NAMES[key], value) for key, _, value in measured]
    tags = ["image-classification", "sota-serve", "fastai", *sorted(card.artifacts)]
    out = ["---", "library_name: sota-serve", "pipeline_tag: image-classification",
           f"license: {_yaml(card.license or 'other')}", "tags:", *[f"- {t}" for t in tags]]
    if dataset:
        out += ["datasets:", f"- {_yaml(dataset)}"]
    if results:
        out += ["metrics:", "- accuracy", "model-index:", f"- name: {_yaml(card.name)}", "  results:",
                "  - task:", "      type: image-classification"]
        if dataset:
            out += ["    dataset:", f"      name: {_yaml(dataset)}", f"      type: {_yaml(dataset)}",
                    "      split: validation"]
        out += ["    metrics:"]
        out += [f"    - type: accuracy\n      name: {_yaml(name)}\n      value: {value:.4f}"
                for name, value in results]
    return [*out, "---", ""]


def _usage(card: ModelCard) -> list[str]:
    policies = card.tta.policies()
    shown = card.tta.default if card.tta.default != "none" else next(
        (p for p in ("five_crop", *policies[1:]) if p in policies), "none")
    tta = f" -F tta={shown}" if shown != "none" else ""
    return [
        "## Usage", "",
        "```bash",
        "sota-serve predict . photo.jpg --top-k 3            # from this directory",
        "sota-serve import . --name " + card.name + "         # into the BentoML model store",
        f"SOTA_SERVE_MODEL={card.name}:latest bentoml serve   # from the sota-serve repository",
        f"curl -F image=@photo.jpg{tta} localhost:3000/classify",
        "```", "",
        "```python",
        "from sota_serve.classifier import Classifier",
        "",
        "clf = Classifier.open(\".\")                       # checks every file's sha256",
        "print(clf.classify([open(\"photo.jpg\", \"rb\").read()], top_k=3))",
        "```", "",
        "Without sota-serve: `card.json` holds the exact preprocessing below; `model.onnx` takes"
        " uint8 NCHW pixels and returns probabilities (normalization is inside the graph).", "",
    ]


def _reproduce(card: ModelCard) -> list[str]:
    training = card.training
    if training is None or not training.recipe:
        return []
    recipe, dataset = training.recipe, training.dataset
    versions = ", ".join(f"{k} {v}" for k, v in (training.versions or {}).items())
    out = ["## How to reproduce", ""]
    if dataset:
        out += [f"Dataset: {dataset.name}, {dataset.train} training and"
                f" {dataset.valid} validation images, {dataset.classes} classes"
                f" (fingerprint `{(dataset.fingerprint or '')[:16]}`).", ""]
    out += [f"Trained with `sota-serve train` on {_or(training.device, '?')} in"
            f" {_or(training.seconds, '?')} s ({versions}), seed {_or(training.seed, '?')}. The"
            " recipe as recorded (`sota-serve train --help` shows how to pass one):", "",
            "```json", json.dumps(recipe, indent=2), "```", "",
            "Training on CPU is not bit-for-bit deterministic: a rerun lands within a few tenths"
            " of a point of these figures.", ""]
    return out


def _ood(card: ModelCard) -> list[str]:
    if card.ood is None:
        return []
    spec = card.ood
    rows = [[f"`{p}`", f"{f.threshold:g}", _pct(f.valid_flag_rate)] for p, f in spec.policies.items()]
    return [
        "## Out-of-distribution check", "",
        "Every answer carries `ood`: the Mahalanobis distance of the input's pixel statistics"
        f" ({spec.features}) to those of {spec.fit_images} training images, and whether it is above"
        f" the threshold, the {spec.percentile:g}th percentile of {spec.calibration_images} validation"
        " images' distances. A flagged input does not look like the training data, so its scores are"
        " not backed by the accuracy above. It catches other kinds of pictures (photos, inverted"
        " colours, blank or noisy images); it cannot catch a wrong object whose pixels look familiar.",
        "", _table(["policy", "threshold", "validation images flagged"], rows), "",
    ]


def _tta_steps(card: ModelCard) -> list[str]:
    """The TTA policies of the card, exactly (crop order as in sota_serve.tta)."""
    lines = [f"TTA policies (default `{card.tta.default}`; each averages the probability vectors"
             " of its crops):", ""]
    for policy, edge in card.tta.edges().items():
        lines.append(f"- `{policy}`: resize the shortest edge to {edge} px, take {CROPS_TAKEN[policy]}.")
    if not card.tta.edges():
        lines.append("- none beyond the plain center crop.")
    return [*lines, ""]


def render_readme(card: ModelCard) -> str:
    pre, norm, inp = card.preprocess, card.normalization, card.input
    labels = card.labels[:_MAX_LABELS]
    more = f" ... and {card.num_classes - _MAX_LABELS} more" if card.num_classes > _MAX_LABELS else ""
    lines = [
        *_front_matter(card),
        f"# {card.name} ({card.version})",
        "",
        f"An image classifier over {card.num_classes} labels, packaged by sota-serve."
        f" Input {inp.width}x{inp.height} {inp.channels} {inp.dtype} ({inp.layout});"
        f" output {card.output}.",
        "",
        *_usage(card),
        *_metrics(card),
        *_figures(card),
        "## Preprocessing",
        "",
        f"1. Decode; {'apply the EXIF orientation; ' if pre.exif_transpose else ''}convert to RGB.",
        f"2. Resize the shortest edge to {pre.resize_shortest_edge} px ({pre.interpolation}).",
        f"3. Center-crop {inp.width}x{inp.height}.",
        "",
        *_tta_steps(card),
        "## Normalization",
        "",
        _table(["", "R", "G", "B"], [["mean", *norm.mean], ["std", *norm.std]]),
        "",
        f"`x = (pixels / {norm.pixel_scale:g} - mean) / std`, "
        + ("done inside the exported graph: feed uint8 pixels." if norm.in_graph
           else "done by the caller: feed float32."),
        "",
        *_ood(card),
        *_reproduce(card),
        *_history(card),
        *_parity(card),
        "## Labels",
        "",
        ", ".join(f"`{label}`" for label in labels) + more,
        "",
        "## Intended use and limitations",
        "",
        card.intended_use or "Classify images like those of the training set.",
        "",
        card.limitations
        or "Accuracy holds only for images like the validation set; other inputs get a label"
        " anyway (there is no 'none of these' class).",
        "",
        "## Files",
        "",
        _table(["format", "file", "sha256"],
               [[b, a.path, f"`{a.sha256}`"] for b, a in card.artifacts.items()]),
        "",
    ]
    return "\n".join(lines)
