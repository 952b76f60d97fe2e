"""Render a card into the package's human-readable README.md (tables, plots, limits)."""

from __future__ import annotations

from typing import Any

from sota_serve.card import ModelCard

_MAX_LABELS = 60


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, int | float) else "-"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _metrics(card: dict[str, Any]) -> list[str]:
    metrics = card.get("metrics")
    if not metrics:
        return []
    rows = [
        ["plain (center crop)", _pct(metrics.get("accuracy"))],
        [
            f"five-crop TTA (resize {metrics.get('five_crop_resize', '-')})",
            _pct(metrics.get("accuracy_five_crop")),
        ],
        ["fastai `learn.tta()`", _pct(metrics.get("accuracy_fastai_tta"))],
    ]
    out = ["## Metrics", "", f"Validation set: {metrics.get('valid_count', '?')} images.", ""]
    out += [_table(["prediction", "accuracy"], rows), ""]
    if "valid_loss" in metrics:
        out += [f"Validation loss: {metrics['valid_loss']:.4f}", ""]
    return out


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


def render_readme(card: ModelCard) -> str:
    data = card.to_dict()
    pre, norm, inp = card.preprocess, card.normalization, card.input
    five = card.tta.five_crop
    labels = card.labels[:_MAX_LABELS]
    more = f" ... and {card.num_classes - _MAX_LABELS} more" if card.num_classes > _MAX_LABELS else ""
    lines = [
        f"# {card.name} ({card.version})",
        "",
        f"An image classifier over {card.num_classes} labels, packaged by sota-serve."
        f" Input {inp.width}x{inp.height} {inp.channels} {inp.dtype} ({inp.layout});"
        f" output {card.output}.",
        "",
        *_metrics(data),
        *_figures(data),
        "## Preprocessing",
        "",
        f"1. Decode; {'apply the EXIF orientation; ' if pre.exif_transpose else ''}convert to RGB.",
        f"2. Resize the shortest edge to {pre.resize_shortest_edge} px ({pre.interpolation}).",
        f"3. Center-crop {inp.width}x{inp.height}.",
        "",
        (f"Five-crop TTA: resize the shortest edge to {five.resize_shortest_edge} px, take the four"
         " corner crops and the center crop, average the five probability vectors."
         f" Default: `{card.tta.default}`.") if five else "No five-crop TTA settings.",
        "",
        "## Normalization",
        "",
        _table(["", "R", "G", "B"], [["mean", *norm.mean], ["std", *norm.std]]),
        "",
        f"`x = (pixels / {norm.pixel_scale:g} - mean) / std`, "
        + ("done inside the exported graph: feed uint8 pixels." if norm.in_graph
           else "done by the caller: feed float32."),
        "",
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
