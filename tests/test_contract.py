"""The request contract written once (sota_serve/contract/): every field of every route is
read by the form reader, stated in the OpenAPI document and in BentoML's declarations, and
the Open Inference Protocol's parameters are the forms' fields. No server: the parts the
front ends serve, fed what a client sends."""

from __future__ import annotations

from pathlib import Path

import pytest

from bento.declarations import Declared
from bento.upload import Upload
from sota_serve.contract.fields import is_file
from sota_serve.contract.requests import FORMS, ClassifyForm, InferParameters, OutputParameters
from sota_serve.errors import BadRequestError, MalformedRequestError
from sota_serve.http import docs
from sota_serve.http.form import read_form
from sota_serve.http.multipart import Part
from sota_serve.http.openapi import document
from sota_serve.oip.messages import read_inference, request_of
from sota_serve.package.card import ModelCard
from sota_serve.serving.settings import Settings
from tests.helpers import card_dict

CARD = ModelCard.parse(card_dict())
SETTINGS = Settings(model="unused", max_batch_images=7, tta_fallback=True)
DOCUMENT = document(CARD, SETTINGS)


def sample(schema: dict) -> object:
    """A valid value of a field that is not its default, from the field's own schema: its
    bounds for numbers, true for flags, the first allowed text."""
    kind = schema["type"]
    if kind == "integer":
        return schema["minimum"]
    if kind == "number":
        return schema["maximum"]
    if kind == "boolean":
        return True
    assert kind == "string", f"no sample for a field of type {kind}: add one here"
    return schema.get("enum", ["cat"])[-1]


def form_schema(path: str) -> dict:
    return DOCUMENT["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]


@pytest.mark.parametrize("path", list(FORMS))
def test_every_field_is_read_by_the_form_reader_and_stated_in_the_document(path):
    form, schema = FORMS[path], form_schema(path)
    assert list(schema["properties"]) == sorted(form.model_fields, key=lambda n: not is_file(form.model_fields[n]))
    parts, want = [], {}
    for name, field in form.model_fields.items():
        stated = schema["properties"][name]
        assert stated["description"].startswith(field.description), name
        assert field.is_required() == (name in schema.get("required", [])), name
        if field.default is not None and not field.is_required():
            assert stated["default"] == field.default, name
        if is_file(field):
            parts += [Part(name, True, b"file-1"), Part(name, True, b"file-2")][:1 if field.annotation is bytes else 2]
            want[name] = b"file-1" if field.annotation is bytes else [b"file-1", b"file-2"]
        else:
            want[name] = sample(stated)
            text = str(want[name]).lower() if isinstance(want[name], bool) else str(want[name])
            assert want[name] != field.default, name
            parts.append(Part(name, False, text.encode()))
    read = read_form(form, parts + [Part("not_a_field", False, b"ignored")], path)
    assert {name: getattr(read, name) for name in form.model_fields} == want


def test_the_document_states_the_cards_and_the_servers_choices():
    props = form_schema("/classify_batch")["properties"]
    assert props["tta"]["enum"] == list(CARD.tta.policies()) and props["tta"]["default"] == CARD.tta.default
    assert props["tta_fallback"]["default"] is True and props["images"]["maxItems"] == 7
    assert props["tta_budget_s"]["exclusiveMinimum"] == 0 and props["tta_budget_s"]["default"] == SETTINGS.budget_s()
    assert form_schema("/explain")["properties"]["label"]["enum"] == CARD.labels
    explain = DOCUMENT["paths"]["/explain"]["post"]
    assert explain["summary"] == "Explain a prediction" and "grid" in explain["responses"]["422"]["description"]
    assert DOCUMENT["openapi"].startswith("3.1") and {"/docs", "/docs.json", "/card", "/crops"} <= set(DOCUMENT["paths"])


def test_the_protocol_parameters_are_the_forms_fields():
    """tta and the fallback fields are one declaration for a form and for an infer request,
    over REST and gRPC; classification is the infer output's."""
    shared = ClassifyForm.model_fields
    for name, field in InferParameters.model_fields.items():
        assert shared[name] is field or (shared[name].description, shared[name].metadata) == (
            field.description, field.metadata), name
    schemas = DOCUMENT["components"]["schemas"]
    assert set(schemas["InferParameters"]["properties"]) == set(InferParameters.model_fields)
    assert set(schemas["OutputParameters"]["properties"]) == set(OutputParameters.model_fields)
    assert schemas["OutputParameters"]["properties"]["classification"]["maximum"] == CARD.num_classes
    pixels = {"name": "pixels", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * (3 * 32 * 32)}
    request = request_of({"inputs": [pixels], "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
                          "parameters": {"tta_fallback": True, "tta_budget_s": 0.5, "tta_budget_strict": "false"}})
    inference = read_inference(request, None, CARD, max_images=4)
    assert (inference.classification, inference.fallback.enabled, inference.fallback.budget_s,
            inference.fallback.strict) == (2, True, 0.5, False)
    for parameters, error, message in (({"tta": 3}, MalformedRequestError, "parameter tta must be a string"),
                                       ({"tta_budget_s": 0}, BadRequestError, "parameter tta_budget_s must be above 0")):
        with pytest.raises(error, match=message):
            read_inference(request_of({"inputs": [pixels], "parameters": parameters}), None, CARD, max_images=4)


@pytest.mark.parametrize("path", list(FORMS))
def test_bentomls_declarations_are_the_request_models(path, tmp_path):
    declared, form = Declared(path), FORMS[path]
    assert list(declared.spec.model_fields) == list(form.model_fields)
    for name, field in form.model_fields.items():
        mine = declared.spec.model_fields[name]
        assert mine.description == field.description and mine.default == field.default, name
        if is_file(field):
            assert mine.annotation in (Upload, list[Upload]), name
    image = tmp_path / "a.png"
    image.write_bytes(b"image bytes")
    file_field = next(name for name, field in form.model_fields.items() if is_file(field))
    files = image if form.model_fields[file_field].annotation is bytes else [image, Upload(data=b"more")]
    read = declared.request({file_field: files})  # an in-process call: a path and an upload
    assert getattr(read, file_field) in (b"image bytes", [b"image bytes", b"more"])
    option, bad = ("grid", "eight") if path == "/explain" else ("top_k", "abc")
    with pytest.raises(MalformedRequestError, match=f"{option} must be an integer"):
        declared.request({file_field: files, option: bad})


def test_the_openapi_ui_is_the_pinned_copy():
    status, headers, page = docs.answer("/docs")
    assert status == 200 and docs.SWAGGER_UI_VERSION.encode() in page and b"__VERSION__" not in page
    for name, kind in docs.ASSETS.items():
        status, headers, body = docs.answer(docs.ASSET_PREFIX + name)
        assert status == 200 and headers["content-type"] == kind and f"docs/swagger-ui-{docs.SWAGGER_UI_VERSION}/{name}" in page.decode()
        assert body == (Path(docs.PAGE_DIR) / name).read_bytes()
    assert docs.SWAGGER_UI_VERSION in (Path(docs.PAGE_DIR) / "swagger-ui-bundle.js").read_text()
    assert docs.answer("/docs/swagger-ui-0.0.0/swagger-ui.css") is None and docs.answer("/docs/other") is None
