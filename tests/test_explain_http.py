"""``POST /explain`` on a real ``bentoml serve`` of the tiny test package."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import bentoml
import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from sota_serve.classifier import Classifier
from tests.test_server import post

pytestmark = pytest.mark.slow


def _explain(server, data: bytes, **fields) -> httpx.Response:
    return post(server, "/explain", {"image": ("upload.jpg", data)}, {k: str(v) for k, v in fields.items()})


def test_explain_answers_the_map_over_the_plain_crop(server, tiny_package, photos):
    offline = Classifier.open(tiny_package, device="cpu")
    for photo in photos:
        data = photo.read_bytes()
        r = _explain(server, data)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert set(answer) == {"model", "label", "score", "grid", "window"} and answer["model"] == "tiny-cnn:1"
        assert len(answer["grid"]) == 8 and all(len(row) == 8 for row in answer["grid"])
        top1 = post(server, "/classify", {"image": ("a.jpg", data)}, {"tta": "none", "top_k": 1}).json()
        assert answer["label"] == top1["predictions"][0]["label"]
        assert abs(answer["score"] - top1["predictions"][0]["score"]) < 1e-5
        width, height = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size
        w = answer["window"]
        assert 0 <= w["left"] and w["left"] + w["width"] <= width + 1e-6
        assert 0 <= w["top"] and w["top"] + w["height"] <= height + 1e-6
        assert min(w["width"], w["height"]) == pytest.approx(min(width, height) * 32 / 36, rel=0.03)
        want = offline.explain(data)  # the server's batcher computes what one runtime call does
        assert np.abs(np.asarray(answer["grid"]) - np.asarray(want.grid)).max() < 1e-5
        assert answer["window"] == want.window.model_dump()


def test_explain_takes_a_label_and_a_grid(server, photos):
    data = photos[0].read_bytes()
    answer = _explain(server, data, label="dog", grid=3).json()
    assert answer["label"] == "dog" and len(answer["grid"]) == 3 and len(answer["grid"][0]) == 3
    assert len(_explain(server, data, grid=16).json()["grid"]) == 16
    with bentoml.SyncHTTPClient(server.url) as client:  # the declared endpoint, as BentoML's clients call it
        got = client.explain(image=photos[0], label="bird", grid=4)
    assert got["label"] == "bird" and len(got["grid"]) == 4
    assert got["grid"] == _explain(server, data, label="bird", grid=4).json()["grid"]


@pytest.mark.parametrize(("fields", "status", "message"), [
    ({"label": "zebra"}, 422, "unknown label 'zebra'; this model's labels are cat, dog, bird"),
    ({"grid": 1}, 422, "grid must be an integer in 2..16"),
    ({"grid": 17}, 422, "grid must be an integer in 2..16"),
    ({"grid": "eight"}, 400, "grid must be an integer"),
])
def test_explain_refuses_what_it_cannot_do_as_json(server, photos, fields, status, message):
    r = _explain(server, photos[0].read_bytes(), **fields)
    assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
    assert message in r.json()["error"]


def test_a_bad_image_gets_the_same_answer_as_from_classify(server):
    for data in (b"plain text, not an image", b"\x89PNG\r\n\x1a\n truncated"):
        explained = _explain(server, data)
        classified = post(server, "/classify", {"image": ("upload.jpg", data)})
        assert 400 <= explained.status_code < 500 and explained.status_code == classified.status_code
        assert explained.json()["error"] == classified.json()["error"]
    two = post(server, "/explain", [("image", ("a.png", b"x")), ("image", ("b.png", b"y"))])
    assert two.status_code == 400 and "one 'image' file" in two.json()["error"]


def test_the_server_keeps_serving_after_concurrent_explanations(server, photos):
    data = [p.read_bytes() for p in photos]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: _explain(server, data[i % len(data)], grid=12), range(12)))
    assert [r.status_code for r in answers] == [200] * 12  # 12 x 145 crops admitted and released
    r = post(server, "/classify", {"image": ("a.jpg", data[0])})
    assert r.status_code == 200 and r.json()["predictions"]


def test_the_openapi_document_describes_explain(server):
    spec = httpx.get(f"{server.url}/docs.json", timeout=30).json()
    operation = spec["paths"]["/explain"]["post"]
    props = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert props["label"]["enum"] == ["cat", "dog", "bird"]
    assert (props["grid"]["minimum"], props["grid"]["maximum"], props["grid"]["default"]) == (2, 16, 8)
    assert "grid" in operation["responses"]["422"]["description"]
    assert set(operation["responses"]) == {"200", "400", "413", "415", "422", "503"}
