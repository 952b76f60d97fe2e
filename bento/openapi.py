"""The OpenAPI document, made to describe the model it serves.

BentoML's generated document knows only the Python signatures: no model name, labels or input
size, bare strings for ``tta``, its own generic error schemas, a "None" version and a page of
BentoML badges (broken offline) as the description. This adds what a client needs, from the
model card: what the model is and is not for, field descriptions, defaults and allowed values,
and the error responses the service really gives, all in one shape ``{"error": message}``.
"""

from __future__ import annotations

import copy
from typing import Any

from sota_serve.explain.occlusion import DEFAULT_GRID, MAX_GRID, MIN_GRID
from sota_serve.package.card import ModelCard
from sota_serve.predictions import DEFAULT_TOP_K, MAX_TOP_K
from sota_serve.serving.fallback import MAX_BUDGET_S
from sota_serve.tta import CROPS_PER_IMAGE, DESCRIPTIONS

ERROR_SCHEMA = {
    "type": "object",
    "title": "Error",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "what went wrong and what to do"}},
}

_ERRORS = {
    "400": "not an image, a damaged or truncated one, an extreme aspect ratio, a malformed form",
    "413": "too many bytes or pixels (decompression bombs included), or too many images",
    "415": "an image format outside the allowlist, or a body that is not multipart/form-data",
    "422": "tta is not one of the card's policies, or top_k is outside 1..1000",
    "503": "overloaded: retry after the number of seconds in the Retry-After header",
}


def describe(spec: dict[str, Any], card: ModelCard, *, max_batch_images: int, tta_fallback: bool = False,
             tta_budget_s: float = 1.0, tta_budget_strict: bool = False) -> dict[str, Any]:
    """``spec`` (BentoML's ``openapi_spec.asdict()``) completed from ``card`` and the server's
    TTA fallback defaults."""
    spec = copy.deepcopy(spec)
    spec["info"] = {"title": f"sota-serve: {card.tag}", "version": card.version, "description": _about(card)}
    spec.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    routes = {
        "/classify": ("image", "One image file.",
                      "Classify one image: the labels with the highest probabilities."),
        "/classify_batch": ("images", f"Image files (the field repeated, at most {max_batch_images}).",
                            "Classify several images in one request; the results keep the order of"
                            " the files, and a bad image gets its own error entry without failing"
                            " the others."),
    }
    for path, (field, field_doc, summary) in routes.items():
        operation = spec["paths"][path]["post"]
        operation["summary"] = summary.split(":")[0].split(";")[0]
        operation["description"] = summary
        props = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
        props[field]["description"] = field_doc
        props["tta"] = {"type": "string", "enum": list(card.tta.policies()), "default": card.tta.default,
                        "description": _tta_doc(card)}
        props["tta_fallback"] = {"type": "boolean", "default": tta_fallback, "description": (
            "Under load, serve a cheaper TTA policy the card lists (ten_crop, five_crop, flip, none) rather"
            " than miss the latency budget; the answer's tta names the policy served, requested_tta the one"
            " asked for. Omitted: the server's SOTA_SERVE_TTA_FALLBACK.")}
        props["tta_budget_s"] = {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": MAX_BUDGET_S, "default": tta_budget_s,
                                 "description": "The latency budget in seconds that tta_fallback keeps to."
                                                " Omitted: the server's SOTA_SERVE_TTA_BUDGET_S."}
        props["tta_budget_strict"] = {"type": "boolean", "default": tta_budget_strict, "description": (
            "With tta_fallback: when not even tta none can be answered within the budget, answer 503 with"
            " Retry-After at once (and at dispatch, when the batch could no longer end in time) instead of"
            " late. Omitted: the server's SOTA_SERVE_TTA_BUDGET_STRICT.")}
        props["top_k"].update(minimum=1, maximum=MAX_TOP_K, default=DEFAULT_TOP_K,
                              description=f"How many labels to return, best first (at most the"
                                          f" {card.num_classes} labels).")
        ok = operation["responses"].get(200) or operation["responses"]["200"]  # int keys before JSON
        operation["responses"] = {"200": ok, **{code: _error(code) for code in _ERRORS}}
    card_op = spec["paths"].get("/card", {}).get("post")
    if card_op is not None:
        card_op["description"] = ("The model card: labels, preprocessing, normalization, metrics,"
                                  " parity, intended use and limitations. Also served on GET.")
        get = {key: value for key, value in card_op.items() if key != "requestBody"}
        spec["paths"]["/card"]["get"] = {**get, "operationId": "get_card"}
    spec["paths"].update(_direct_paths(card))
    _describe_explain(spec, card)
    return spec


def _describe_explain(spec: dict[str, Any], card: ModelCard) -> None:
    """``POST /explain``'s fields, limits and errors (docs/explanations.md)."""
    operation = spec["paths"].get("/explain", {}).get("post")
    if operation is None:
        return
    operation["summary"] = "Explain a prediction: which parts of the image the score depends on"
    operation["description"] = (
        "Occlusion sensitivity over the plain (center) crop: each cell of a grid x grid grid is covered in"
        " turn with the normalization mean, and grid[i][j] is the label's probability on the whole crop"
        " minus its probability with cell (row i, column j) covered. The grid*grid + 1 crops cost as"
        " many model calls as that many plain /classify requests. `window` is the crop's box on the"
        " uploaded image, in its pixels, to draw the map over it.")
    props = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    props["image"]["description"] = "One image file."
    props["label"] = {"type": "string", "enum": list(card.labels),
                      "description": "The label to explain; omitted: the crop's top-1 label."}
    props["grid"] = {"type": "integer", "minimum": MIN_GRID, "maximum": MAX_GRID, "default": DEFAULT_GRID,
                     "description": "Cells per side of the occlusion grid."}
    ok = operation["responses"].get(200) or operation["responses"]["200"]
    errors = {**_ERRORS, "422": "label is not one of the card's labels, or grid is outside"
                                f" {MIN_GRID}..{MAX_GRID}"}
    operation["responses"] = {"200": ok, **{code: {**_error(code), "description": errors[code]} for code in errors}}


def _get(summary: str, content_type: str = "application/json", **extra: Any) -> dict[str, Any]:
    return {"get": {"summary": summary, **extra, "responses": {
        "200": {"description": "OK", "content": {content_type: {"schema": {"type": "object"}
                                                                 if content_type == "application/json" else {}}}}}}}


def _direct_paths(card: ModelCard) -> dict[str, Any]:
    """The routes the front door answers that BentoML does not declare."""
    model = f"/v2/models/{card.name}"
    ok = "200 when the model is loaded, else 503"
    paths: dict[str, Any] = {
        "/": _get("The page for people: upload an image, see its predictions and crops", "text/html"),
        "/crops": _get("Where the crops of a TTA policy fall on a width x height image", parameters=[
            {"name": name, "in": "query", "required": name != "tta", "schema": schema}
            for name, schema in (("width", {"type": "integer", "minimum": 1}),
                                 ("height", {"type": "integer", "minimum": 1}),
                                 ("tta", {"type": "string", "enum": list(card.tta.policies())}))]),
        "/v2": _get("Open Inference Protocol: server metadata"),
        "/v2/health/live": _get("Open Inference Protocol: the process answers"),
        "/v2/health/ready": _get(f"Open Inference Protocol: readiness ({ok})"),
        model: _get("Open Inference Protocol: model metadata (inputs image or pixels, output probabilities)"),
        f"{model}/ready": _get(f"Open Inference Protocol: model readiness ({ok})"),
        f"{model}/infer": {"post": {
            "summary": "Open Inference Protocol: inference (JSON, or the binary tensor extension)",
            "requestBody": {"content": {"application/json": {"schema": {"type": "object"}},
                                        "application/octet-stream": {"schema": {"type": "string",
                                                                                "format": "binary"}}}},
            "responses": {"200": {"description": "probabilities, or top-k classification strings"},
                          **{code: _error(code) for code in ("400", "413", "415", "503")},
                          "404": {"description": "another model's name or version",
                                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
        }},
    }
    return paths


def _tta_doc(card: ModelCard) -> str:
    lines = [f"Test-time augmentation; omitted: `{card.tta.default}` (the card's default)."
             f" `none`: resize the shortest edge to {card.preprocess.resize_shortest_edge},"
             " center crop."]
    for policy, edge in card.tta.edges().items():
        lines.append(f"`{policy}`: resize to {edge},"
                     f" {DESCRIPTIONS[policy]} ({CROPS_PER_IMAGE[policy]} times the model work).")
    return " ".join(lines)


def _error(code: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _ERRORS[code],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if code == "503":
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                               "description": "seconds to wait before retrying"}}
    return response


def _about(card: ModelCard) -> str:
    inp, pre, norm = card.input, card.preprocess, card.normalization
    measured = card.metrics.accuracies(fastai=False) if card.metrics else []
    accuracy = ", ".join(f"{name} {100 * value:.2f} %" for _, name, value in measured)
    lines = [
        f"Serves **{card.tag}**, an image classifier packaged by sota-serve.",
        "",
        f"- **Labels** ({card.num_classes}): {', '.join(card.labels[:50])}"
        + (" ..." if card.num_classes > 50 else ""),
        f"- **Input**: any JPEG, PNG, WebP, GIF, BMP or TIFF; EXIF orientation applied, resized so"
        f" the shortest edge is {pre.resize_shortest_edge} px ({pre.interpolation}), center crop"
        f" {inp.width}x{inp.height}, normalized with mean {list(norm.mean)} and std {list(norm.std)}"
        " inside the model.",
        f"- **Validation accuracy**: {accuracy or 'not recorded'}.",
    ]
    for text, title in ((card.intended_use, "Intended use"), (card.limitations, "Limitations")):
        if text:
            lines.append(f"- **{title}**: {text}")
    if card.ood is not None:
        lines.append("- **Out-of-distribution check**: each answer's `ood` gives the distance of the"
                     " input's pixel statistics to the training images' and `out_of_distribution`"
                     " when it is above the threshold calibrated on the validation set"
                     f" ({card.ood.percentile:g}th percentile): such inputs get a label anyway, but"
                     " the validation accuracy does not apply to them.")
    lines += ["", "Errors are JSON `{\"error\": message}`; overload is a 503 with `Retry-After`."]
    return "\n".join(lines)
