"""The OpenAPI document of the HTTP contract, which every front end serves at ``/docs.json``.

Made from the request models (sota_serve/contract/requests.py: each route's fields with their
types, defaults, bounds and descriptions), the answers' models, and the model card and
server settings it completes them with: what the model is and is not for, the policies and
labels a field takes, the defaults the server applies to omitted fields, and the error
responses the service really gives, all in one shape ``{"error": message}``. OpenAPI 3.1,
whose schemas are the JSON Schema pydantic writes.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from sota_serve.contract.fields import is_file
from sota_serve.contract.requests import FORMS, Form, InferParameters, OutputParameters
from sota_serve.explain.occlusion import MAX_GRID, MIN_GRID, Explanation
from sota_serve.http.schemas import BatchResponse, ClassifyResponse
from sota_serve.oip.messages import InferenceRequest
from sota_serve.package.card import ModelCard
from sota_serve.serving.settings import Settings
from sota_serve.tta import CROPS_PER_IMAGE, DESCRIPTIONS

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"
JSON = "application/json"
ERROR_SCHEMA = {
    "type": "object",
    "title": "Error",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "what went wrong and what to do"}},
}
ERRORS = {
    "400": "not an image, a damaged or truncated one, an extreme aspect ratio, a malformed form",
    "413": "too many bytes or pixels (decompression bombs included), or too many images",
    "415": "an image format outside the allowlist, or a body that is not multipart/form-data",
    "422": "tta is not one of the card's policies, or top_k is outside 1..1000",
    "503": "overloaded: retry after the number of seconds in the Retry-After header",
}
#: image route -> its answer's model, and the errors it describes otherwise than ERRORS
ANSWERS: dict[str, tuple[type[BaseModel], dict[str, str]]] = {
    "/classify": (ClassifyResponse, {}),
    "/classify_batch": (BatchResponse, {}),
    "/explain": (Explanation, {"422": f"label is not one of the card's labels, or grid is outside {MIN_GRID}..{MAX_GRID}"}),
}
#: the request models beside the forms, as components
COMPONENTS: tuple[type[BaseModel], ...] = (InferenceRequest, InferParameters, OutputParameters)


def document(card: ModelCard, settings: Settings, models: Sequence[str] = ()) -> dict[str, Any]:
    """The OpenAPI document of the service serving ``card`` (the default model's) with
    ``settings``; ``models``: the names of the models it serves (default: the card's)."""
    refs, answers = models_json_schema([(model, "serialization") for model, _ in ANSWERS.values()], ref_template=REF)
    _, requests = models_json_schema([(model, "validation") for model in COMPONENTS], ref_template=REF)
    facts = _facts(card, settings)
    schemas = {**answers["$defs"], **{name: _plain(schema, facts) for name, schema in requests["$defs"].items()}}
    for model in (InferParameters, OutputParameters):  # others are ignored, not refused
        schemas[model.__name__]["additionalProperties"] = True
    schemas["InferenceRequest"]["properties"]["parameters"] = {"$ref": REF.format(model="InferParameters")}
    schemas["RequestedOutput"]["properties"]["parameters"] = {"$ref": REF.format(model="OutputParameters")}
    schemas["Error"] = ERROR_SCHEMA
    paths: dict[str, Any] = {}
    for path, form in FORMS.items():
        model, errors = ANSWERS[path]
        paths[path] = {"post": _form_operation(form, refs[(model, "serialization")], {**ERRORS, **errors}, facts)}
    names = list(models) or [card.name]
    paths.update(_other_paths(card, names[0]))
    paths.update(_model_paths(paths, names))
    return {"openapi": OPENAPI_VERSION,
            "info": {"title": f"sota-serve: {card.tag}", "version": card.version, "description": _about(card)},
            "paths": paths, "components": {"schemas": schemas}}


def _facts(card: ModelCard, settings: Settings) -> dict[str, dict[str, Any]]:
    """What this model and server add to a field's schema, by field name (``more``: words
    added to its description)."""
    return {
        "tta": {"enum": list(card.tta.policies()), "default": card.tta.default, "more": _tta_doc(card)},
        "top_k": {"more": f"This model has {card.num_classes} labels."},
        "images": {"maxItems": settings.max_batch_images, "more": f"At most {settings.max_batch_images}."},
        "label": {"enum": list(card.labels)},
        "tta_fallback": {"default": settings.tta_fallback},
        "tta_budget_s": {"default": settings.budget_s()},
        "tta_budget_strict": {"default": settings.tta_budget_strict},
        "classification": {"maximum": card.num_classes},
    }


def _plain(schema: Any, facts: dict[str, dict[str, Any]]) -> Any:
    """``schema`` as a client reads it: an optional field as its type (omitting it is how a
    client leaves it to the server), no generated titles, each property completed with its
    facts."""
    if isinstance(schema, list):
        return [_plain(s, facts) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _plain(v, facts) for k, v in schema.items() if k not in ("title", "anyOf", "properties")}
    options = [s for s in schema.get("anyOf", []) if s != {"type": "null"}]
    if len(options) == 1 and len(schema["anyOf"]) == 2:
        out = {**_plain(options[0], facts), **out}
    elif "anyOf" in schema:
        out["anyOf"] = _plain(schema["anyOf"], facts)
    if out.get("default", 0) is None:
        del out["default"]
    if "properties" in schema:
        out["properties"] = {name: _completed(_plain(prop, facts), facts.get(name, {}))
                             for name, prop in schema["properties"].items()}
    return out


def _completed(schema: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    more = facts.get("more")
    out = {**schema, **{k: v for k, v in facts.items() if k != "more"}}
    if more:
        out["description"] = f"{schema.get('description', '')} {more}".strip()
    return out


def _form_operation(form: type[Form], answer: dict[str, Any], errors: dict[str, str],
                    facts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    about = inspect.cleandoc(form.__doc__ or "")
    schema = _plain(form.model_json_schema(ref_template=REF), facts)
    schema.pop("description", None)  # the operation's
    files = [name for name, field in form.model_fields.items() if is_file(field)]
    schema["properties"] = {name: schema["properties"][name] for name in sorted(
        schema["properties"], key=lambda name: name not in files)}
    return {
        "summary": about.split(":")[0].split(";")[0].split(".")[0],
        "description": about,
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}},
        "responses": {"200": {"description": "OK", "content": {JSON: {"schema": answer}}},
                      **{code: _error(code, text) for code, text in errors.items()}},
    }


def _get(summary: str, content_type: str = JSON, **extra: Any) -> dict[str, Any]:
    return {"summary": summary, **extra, "responses": {
        "200": {"description": "OK", "content": {content_type: {"schema": {"type": "object"}
                                                               if content_type == JSON else {}}}}}}


def _other_paths(card: ModelCard, name: str) -> dict[str, Any]:
    """The routes beside the image routes (the protocol's for the default model, ``name``)."""
    model = f"/v2/models/{name}"
    ok = "200 when the model is loaded, else 503"
    about_card = ("The model card: labels, preprocessing, normalization, metrics, parity, intended use and"
                  " limitations. Also served on POST.")
    return {
        "/card": {"get": _get("The model card", description=about_card, operationId="get_card"),
                  "post": _get("The model card", description=about_card, operationId="card")},
        "/": {"get": _get("The page for people: upload an image, see its predictions and crops", "text/html")},
        "/crops": {"get": _get("Where the crops of a TTA policy fall on a width x height image", parameters=[
            {"name": name, "in": "query", "required": name != "tta", "schema": schema}
            for name, schema in (("width", {"type": "integer", "minimum": 1}),
                                 ("height", {"type": "integer", "minimum": 1}),
                                 ("tta", {"type": "string", "enum": list(card.tta.policies())}))])},
        "/docs": {"get": _get("This document, in Swagger UI", "text/html")},
        "/docs.json": {"get": _get("This document (OpenAPI 3.1)")},
        "/v2": {"get": _get("Open Inference Protocol: server metadata")},
        "/v2/health/live": {"get": _get("Open Inference Protocol: the process answers")},
        "/v2/health/ready": {"get": _get(f"Open Inference Protocol: readiness ({ok})")},
        model: {"get": _get("Open Inference Protocol: model metadata (inputs image or pixels, output probabilities)")},
        f"{model}/ready": {"get": _get(f"Open Inference Protocol: model readiness ({ok})")},
        f"{model}/infer": {"post": {
            "summary": "Open Inference Protocol: inference (JSON, or the binary tensor extension)",
            "requestBody": {"required": True, "content": {
                JSON: {"schema": {"$ref": REF.format(model="InferenceRequest")}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            "responses": {"200": {"description": "probabilities, or top-k classification strings"},
                          **{code: _error(code, ERRORS[code]) for code in ("400", "413", "415", "503")},
                          "404": _error("404", "another model's name or version")},
        }},
    }


def _model_paths(plain: dict[str, Any], models: list[str]) -> dict[str, Any]:
    """Each model's own routes, ``/models/{name}/...``, as the default model's plain ones (whose
    field facts, the policies and labels, are the default model's), and the repository
    extension's."""
    name = {"name": "name", "in": "path", "required": True, "description": "The model's name.",
            "schema": {"type": "string", "examples": models}}
    routes = {f"/models/{{name}}{path}": {method: {**operation, "summary": f"{operation['summary']}, by a model",
                                                   "parameters": [name, *operation.get("parameters", [])],
                                                   **({"operationId": f"{operation['operationId']}_of"}
                                                      if "operationId" in operation else {})}
                                          for method, operation in plain[path].items()}
              for path in (*FORMS, "/card", "/crops")}
    routes["/models/{name}/"] = {"get": _get("The page for people, for this model", "text/html", parameters=[name])}
    control = "403 unless the server runs with SOTA_SERVE_MODEL_CONTROL=explicit"
    routes["/v2/repository/index"] = {"post": _get(
        "Open Inference Protocol repository extension: every model with its version, state and reason")}
    for action, about in (("load", "load (again) the model's latest version, warm it up, then swap it in"),
                          ("unload", "stop serving the model; requests in flight finish")):
        routes[f"/v2/repository/models/{{name}}/{action}"] = {"post": {
            "summary": f"Open Inference Protocol repository extension: {about}", "parameters": [name],
            "responses": {"200": {"description": "done"}, "400": _error("400", "the model could not be loaded"),
                          "403": _error("403", control), "404": _error("404", "no such model")}}}
    return routes


def _tta_doc(card: ModelCard) -> str:
    lines = [f"This model: omitted, `{card.tta.default}`. `none`: resize the shortest edge to"
             f" {card.preprocess.resize_shortest_edge}, center crop."]
    for policy, edge in card.tta.edges().items():
        lines.append(f"`{policy}`: resize to {edge},"
                     f" {DESCRIPTIONS[policy]} ({CROPS_PER_IMAGE[policy]} times the model work).")
    return " ".join(lines)


def _error(code: str, description: str) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {JSON: {"schema": {"$ref": REF.format(model="Error")}}}}
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
