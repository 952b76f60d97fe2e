"""Render a card into the package's human-readable README.md (tables, plots, limits).

It opens with Hugging Face model-card front matter (YAML: license, tags, datasets, metrics as
a ``model-index``), so the package can be published as it is, and has the sections a model
card is expected to have: usage, how to reproduce, metrics with their caveats, limitations.
"""

from __future__ import annotations

import json
from typing import Any

from sota_serve.card import ModelCard

_MAX_LABELS = 60


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, int | float) else "-"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


_TTA_NAMES = {"none": "plain (center crop)", "flip": "flip TTA", "five_crop": "five-crop TTA",
              "ten_crop": "ten-crop TTA"}


def _metrics(card: dict[str, Any]) -> list[str]:
    metrics = card.get("metrics")
    if not metrics:
        return []
    tta = metrics.get("tta") if isinstance(metrics.get("tta"), dict) else {}
    policies = tta.get("policies") or {}
    out = ["## Metrics", "", f"Validation set: {metrics.get('valid_count', '?')} images.", ""]
    if policies:
        rows = [[_TTA_NAMES.get(p, p), m.get("model_calls_per_image", "-"), m.get("resize_shortest_edge", "-"),
                 _pct(m.get("accuracy")), _pct(m.get("accuracy_held_out")),
                 _gain(m.get("held_out_vs_none"))]
                for p, m in policies.items()]
        rows.append(["fastai `learn.tta()`", "-", "-", _pct(metrics.get("accuracy_fastai_tta")), "-", "-"])
        out += [_table(["prediction", "model calls/image", "resize", "accuracy",
                        f"held-out ({tta.get('held_out_images', '?')} images)", "held-out gain vs plain"], rows), ""]
        out += [f"Default policy: `{tta.get('default', 'none')}`. Selection: {tta.get('selection', '-')}."
                " The held-out column is the unbiased one for policies whose resize edge was tuned.", ""]
    else:
        rows = [
            ["plain (center crop)", _pct(metrics.get("accuracy"))],
            [f"five-crop TTA (resize {metrics.get('five_crop_resize', '-')})", _pct(metrics.get("accuracy_five_crop"))],
            ["fastai `learn.tta()`", _pct(metrics.get("accuracy_fastai_tta"))],
        ]
        out += [_table(["prediction", "accuracy"], rows), ""]
        tried = metrics.get("five_crop_by_resize")
        if isinstance(tried, dict) and len(tried) > 1:
            out += [f"The five-crop resize edge ({metrics.get('five_crop_resize')}) was chosen among"
                    f" {', '.join(str(k) for k in tried)} on this same validation set, so the five-crop"
                    " figure is slightly optimistic; the plain figure involves no such choice.", ""]
    if "valid_loss" in metrics:
        out += [f"Validation loss: {metrics['valid_loss']:.4f}", ""]
    return out


def _gain(record: Any) -> str:
    if not isinstance(record, dict):
        return "-"
    verdict = "significant" if record.get("significant") else "within noise"
    return (f"{100 * record.get('gain', 0):+.2f} pts ({record.get('wins')} won,"
            f" {record.get('losses')} lost; {verdict})")


def _history(card: dict[str, Any]) -> list[str]:
    history = (card.get("training") or {}).get("history")
    if not history:
        return []
    header = ["epoch", "stage", "size", "train loss", "valid loss", "accuracy", "seconds"]
    rows = [
        [h.get("epoch"), h.get("stage"), h.get("size"), f"{h.get('train_loss', 0):.4f}",
         f"{h.get('valid_loss', 0):.4f}", _pct(h.get("accuracy")), f"{h.get('seconds', 0):.1f}"]
        for h in history
    ]
    return ["## Training history", "", _table(header, rows), ""]


def _figures(card: dict[str, Any]) -> list[str]:
    figures = card.get("figures") or {}
    return [f"![{name}]({path})\n" for name, path in figures.items()]


def _parity(card: dict[str, Any]) -> list[str]:
    out = []
    parity = card.get("parity")
    if parity:
        out += [
            "## Train/serve parity",
            "",
            f"{parity.get('images')} validation images ran through fastai's own validation"
            f" pipeline and through this package ({parity.get('backend', 'onnx')}): top-1"
            f" agreement {_pct(parity.get('top1_agreement'))}, largest probability difference"
            f" {parity.get('max_abs_diff', 0):.2e}.",
            "",
        ]
    export = card.get("export")
    if export:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in (export.get("max_abs_diff") or {}).items())
        out += [f"Export check (eager vs exported, {export.get('check_images')} inputs): {diffs}.", ""]
    return out


def _yaml(value: Any) -> str:
    return json.dumps(value)  # a JSON scalar is a valid YAML flow scalar


def _front_matter(card: ModelCard, data: dict[str, Any]) -> list[str]:
    dataset = ((data.get("training") or {}).get("dataset") or {}).get("name")
    metrics = data.get("metrics") or {}
    results = [(name, metrics[key]) for key, name in (("accuracy", "accuracy (center crop)"),
                                                      ("accuracy_flip", "accuracy (flip TTA)"),
                                                      ("accuracy_five_crop", "accuracy (five-crop TTA)"),
                                                      ("accuracy_ten_crop", "accuracy (ten-crop TTA)"))
               if isinstance(metrics.get(key), int | float)]
    tags = ["image-classification", "sota-serve", "fastai", *sorted(card.artifacts)]
    out = ["---", "library_name: sota-serve", "pipeline_tag: image-classification",
           f"license: {_yaml(data.get('license') or 'other')}", "tags:", *[f"- {t}" for t in tags]]
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


def _reproduce(data: dict[str, Any]) -> list[str]:
    training = data.get("training") or {}
    recipe = training.get("recipe")
    if not recipe:
        return []
    dataset = training.get("dataset") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (training.get("versions") or {}).items())
    out = ["## How to reproduce", ""]
    if dataset:
        out += [f"Dataset: {dataset.get('name')}, {dataset.get('train')} training and"
                f" {dataset.get('valid')} validation images, {dataset.get('classes')} classes"
                f" (fingerprint `{str(dataset.get('fingerprint', ''))[:16]}`).", ""]
    out += [f"Trained with `sota-serve train` on {training.get('device', '?')} in"
            f" {training.get('seconds', '?')} s ({versions}), seed {recipe.get('seed', '?')}. The"
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
    what = {
        "flip": "the center crop, then the same crop mirrored left-right",
        "five_crop": "the four corner crops and the center crop (top-left, top-right, bottom-left,"
                     " bottom-right, center)",
        "ten_crop": "the five crops, then the five crops of the left-right mirrored image",
    }
    lines = [f"TTA policies (default `{card.tta.default}`; each averages the probability vectors"
             " of its crops):", ""]
    for policy, edge in card.tta.edges().items():
        lines.append(f"- `{policy}`: resize the shortest edge to {edge} px, take {what[policy]}.")
    if not card.tta.edges():
        lines.append("- none beyond the plain center crop.")
    return [*lines, ""]


def render_readme(card: ModelCard) -> str:
    data = card.to_dict()
    pre, norm, inp = card.preprocess, card.normalization, card.input
    labels = card.labels[:_MAX_LABELS]
    more = f" ... and {card.num_classes - _MAX_LABELS} more" if card.num_classes > _MAX_LABELS else ""
    lines = [
        *_front_matter(card, data),
        f"# {card.name} ({card.version})",
        "",
        f"An image classifier over {card.num_classes} labels, packaged by sota-serve."
        f" Input {inp.width}x{inp.height} {inp.channels} {inp.dtype} ({inp.layout});"
        f" output {card.output}.",
        "",
        *_usage(card),
        *_metrics(data),
        *_figures(data),
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
        *_reproduce(data),
        *_history(data),
        *_parity(data),
        "## Labels",
        "",
        ", ".join(f"`{label}`" for label in labels) + more,
        "",
        "## Intended use and limitations",
        "",
        data.get("intended_use") or "Classify images like those of the training set.",
        "",
        data.get("limitations")
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
