"""The engine process (bento/engine.py): its wire format, and a real server that runs one."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from bench.server import Server
from bento.engine_protocol import (
    decode_request,
    decode_response,
    encode_pixels_request,
    encode_request,
    encode_response,
)
from bento.pipeline import Scored
from sota_serve.card import ModelCard
from sota_serve.errors import (
    ImageTooLargeError,
    InvalidImageError,
    MalformedRequestError,
    OverloadedError,
)
from sota_serve.predictions import OODResult
from sota_serve.preprocess import Preprocessor
from tests.test_server import post


def test_requests_carry_the_uploads_byte_for_byte():
    images = [b"\xff\xd8jpeg one", b"", b"\x89PNG two" * 1000]
    req = decode_request(encode_request(images, "five_crop", 5, 1.5))
    assert (req.images, req.tta, req.k, req.timeout_s) == (images, "five_crop", 5, 1.5)
    with pytest.raises(MalformedRequestError):
        decode_request(b"\x01\x00")
    body = encode_request(images, "none", 1, 1.0)
    with pytest.raises(MalformedRequestError, match="sizes add up"):
        decode_request(body + b"extra")


def test_pixel_requests_carry_the_crops():
    pixels = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    req = decode_request(encode_pixels_request(pixels, 2.0))
    assert np.array_equal(req.pixels, pixels) and (req.images, req.tta, req.k, req.timeout_s) == ([], "none", 1, 2.0)
    with pytest.raises(MalformedRequestError, match="pixels"):
        decode_request(encode_pixels_request(pixels, 2.0)[:-1])


def test_responses_keep_order_probabilities_and_typed_errors():
    check = OODResult(distance=12.5, threshold=6.4, out_of_distribution=True)
    probs = [Scored(np.array([0.1, 0.9], np.float32), check), InvalidImageError("damaged"),
             Scored(np.array([0.7, 0.3], np.float32)), ImageTooLargeError("too big")]
    out, spc = decode_response(encode_response(probs, 2, seconds_per_crop=0.004))
    assert spc == 0.004 and np.array_equal(out[0].probs, probs[0].probs) and np.array_equal(out[2].probs, probs[2].probs)
    assert out[0].ood == check and out[2].ood is None
    assert type(out[1]) is InvalidImageError and str(out[1]) == "damaged"
    assert type(out[3]) is ImageTooLargeError and out[3].http_status == 413
    with pytest.raises(OverloadedError, match="queue") as e:
        decode_response(encode_response(None, 2, seconds_per_crop=0.0,
                                        overloaded=OverloadedError("queue full", retry_after_s=3)))
    assert e.value.retry_after_s == 3


@pytest.mark.slow
def test_server_with_an_engine_process_answers_as_the_in_process_one(server, tiny_package, photos, tmp_path):
    # What a GPU machine runs by default (SOTA_SERVE_ENGINE=auto with CUDA and several
    # workers), forced on here on the CPU: two HTTP workers, one engine process.
    env = {"SOTA_SERVE_DEVICE": "cpu", "SOTA_SERVE_ENGINE": "on", "SOTA_SERVE_WORKERS": "2"}
    with Server(tiny_package, home=tmp_path / "bentoml", env=env) as engine:
        for tta in ("none", "five_crop"):
            for photo in photos:
                form = {"image": (photo.name, photo.read_bytes(), "image/jpeg")}
                a = post(engine, "/classify", form, {"tta": tta}).json()
                b = post(server, "/classify", form, {"tta": tta}).json()
                assert a == b
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
        files.insert(1, ("images", ("bad.jpg", photos[0].read_bytes()[:4000], "image/jpeg")))
        results = post(engine, "/classify_batch", files, {"top_k": "1"}).json()["results"]
        assert results[1]["status"] == 400 and "damaged" in results[1]["error"]
        assert [r.get("predictions") for r in results[:1] + results[2:]] == [
            post(server, "/classify", {"image": (p.name, p.read_bytes(), "image/jpeg")}, {"top_k": "1"}).json()["predictions"]
            for p in photos]
        # the Open Inference Protocol's preprocessed pixels travel to the engine as crops
        pre = Preprocessor.from_card(ModelCard.load(tiny_package / "card.json"))
        pixels = np.concatenate([pre(p.read_bytes()) for p in photos])
        head = json.dumps({"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8",
                                       "parameters": {"binary_data_size": pixels.nbytes}}],
                           "outputs": [{"name": "probabilities"}]}).encode()
        answers = [httpx.post(f"{srv.url}/v2/models/tiny-cnn/infer", content=head + pixels.tobytes(),
                              headers={"Inference-Header-Content-Length": str(len(head))}).json()
                   for srv in (engine, server)]
        assert answers[0] == answers[1] and answers[0]["outputs"][0]["shape"] == [len(photos), 3]
        assert "engine ready" in engine.output()
