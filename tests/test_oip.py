"""The Open Inference Protocol v2 routes: the message codec, and tritonclient against a real server."""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.http import InferResult
from tritonclient.utils import InferenceServerException

from sota_serve.errors import BadRequestError, MalformedRequestError
from sota_serve.http.oip_codec import MAX_JSON_VALUES, JsonTooLargeError, encode_infer, parse_infer
from sota_serve.image.preprocess import Preprocessor
from sota_serve.oip.messages import classification, decode_bytes, encode_bytes
from sota_serve.package.card import ModelCard
from sota_serve.serving.fallback import FallbackAsk
from sota_serve.serving.pipeline import Probabilities
from tests.helpers import LABELS, card_dict
from tests.test_server import post

CARD = ModelCard.parse(card_dict())
NAME = "tiny-cnn"


def _parse(head: dict, binary: bytes = b"") -> object:
    header = json.dumps(head).encode()
    return parse_infer(header + binary, len(header) if binary else None, CARD, max_images=8)


# --- codec --------------------------------------------------------------------------------


def test_binary_bytes_tensors_round_trip():
    items = [b"\xff\xd8one", b"", b"\x89PNG" * 300]
    assert decode_bytes(encode_bytes(items)) == items
    with pytest.raises(MalformedRequestError, match="overruns"):
        decode_bytes(encode_bytes(items)[:-1])
    with pytest.raises(MalformedRequestError, match="truncated"):
        decode_bytes(b"\x01\x00")


def test_requests_in_json_and_binary_and_nested_data():
    images = [b"\xff\xd8a", b"\x89PNGb"]
    raw = encode_bytes(images)
    binary = _parse({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                 "parameters": {"binary_data_size": len(raw)}}],
                     "parameters": {"tta": "five_crop", "binary_data_output": True}}, raw)
    assert binary.images == images and binary.tta == "five_crop" and binary.binary and binary.classification == 0
    as_json = _parse({"id": "r1", "inputs": [{"name": "image", "shape": [2, 1], "datatype": "BYTES",
                                              "data": [[base64.b64encode(b).decode()] for b in images]}],
                      "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]})
    assert as_json.images == images and as_json.id == "r1" and not as_json.binary and as_json.classification == 2
    pixels = np.arange(2 * 3 * 32 * 32, dtype=np.uint32).astype(np.uint8).reshape(2, 3, 32, 32)
    nested = _parse({"inputs": [{"name": "pixels", "shape": [2, 3, 32, 32], "datatype": "UINT8",
                                 "data": pixels.tolist()}]})
    assert np.array_equal(nested.pixels, pixels) and nested.tta == "none"
    packed = _parse({"inputs": [{"name": "pixels", "shape": [2, 3, 32, 32], "datatype": "UINT8",
                                 "parameters": {"binary_data_size": pixels.nbytes}}]}, pixels.tobytes())
    assert np.array_equal(packed.pixels, pixels)


@pytest.mark.parametrize("head, binary, message", [
    ({"inputs": []}, b"", "inputs"),
    ({"inputs": [{"name": "img", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}]}, b"", "exactly one input"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "UINT8", "data": [1]}]}, b"", "must be BYTES"),
    ({"inputs": [{"name": "image", "shape": [1, 2], "datatype": "BYTES", "data": ["eA==", "eA=="]}]}, b"",
     r"shape \[N\] or \[N, 1\]"),
    ({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["eA=="]}]}, b"", "holds 1"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]}, b"", "base64"),
    ({"inputs": [{"name": "image", "shape": [9], "datatype": "BYTES", "data": ["eA=="] * 9}]}, b"", "more than 8"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]}, b"", "neither data"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                  "parameters": {"binary_data_size": 99}}]}, b"\x01\x00\x00\x00x", "binary_data_size 99"),
    ({"inputs": [{"name": "pixels", "shape": [1, 3, 16, 16], "datatype": "UINT8", "data": [0] * 768}]}, b"",
     r"\[N, 3, 32, 32\]"),
    ({"inputs": [{"name": "pixels", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072}]}, b"",
     "must be UINT8"),
    ({"inputs": [{"name": "pixels", "shape": [1, 3, 32, 32], "datatype": "UINT8", "data": [256] * 3072}]}, b"",
     "0..255"),
    ({"inputs": [{"name": "pixels", "shape": [1, 3, 32, 32], "datatype": "UINT8", "data": [0] * 3072}],
      "parameters": {"tta": "five_crop"}}, b"", "needs the 'image' input"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}],
      "outputs": [{"name": "logits"}]}, b"", "the only output"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}],
      "outputs": [{"name": "probabilities", "parameters": {"classification": 4}}]}, b"", r"0\.\.3"),
])
def test_bad_requests_name_what_is_wrong(head, binary, message):
    with pytest.raises(MalformedRequestError, match=message):
        _parse(head, binary)


def test_the_tta_fallback_parameters_are_read_and_checked():
    image = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(b"x").decode()]}
    request = _parse({"inputs": [image], "parameters": {"tta_fallback": True, "tta_budget_s": 0.5}}, b"")
    assert request.fallback == FallbackAsk(True, 0.5)
    assert _parse({"inputs": [image]}, b"").fallback == FallbackAsk(None, None)
    with pytest.raises(MalformedRequestError, match="parameter tta_fallback must be true or false"):
        _parse({"inputs": [image], "parameters": {"tta_fallback": "sometimes"}}, b"")
    with pytest.raises(BadRequestError, match="parameter tta_budget_s must be above 0"):
        _parse({"inputs": [image], "parameters": {"tta_budget_s": -1}}, b"")


def test_responses_decode_with_tritonclient_in_both_encodings():
    probs = np.array([[0.2, 0.7, 0.1], [0.5, 0.2, 0.3]], np.float32)
    raw = encode_bytes([b"a", b"b"])
    for binary in (True, False):
        for k in (0, 2):
            request = _parse({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                          "parameters": {"binary_data_size": len(raw)}}],
                              "outputs": [{"name": "probabilities",
                                           "parameters": {"binary_data": binary, "classification": k}}]}, raw)
            body, headers = encode_infer(request, Probabilities("none", probs, "five_crop"), CARD)
            length = headers.get("inference-header-content-length")
            result = InferResult.from_response_body(body, header_length=int(length) if length else None)
            assert (length is not None) == binary
            assert result.get_response()["parameters"] == {"tta": "none", "requested_tta": "five_crop"}
            got = result.as_numpy("probabilities")
            if k == 0:
                assert got.dtype == np.float32 and np.array_equal(got, probs)
            else:
                labels = [[s.decode() if isinstance(s, bytes) else s for s in row] for row in got.tolist()]
                assert labels == classification(probs, LABELS, 2) == [["0.700000:1:dog", "0.200000:0:cat"],
                                                                    ["0.500000:0:cat", "0.300000:2:bird"]]


# --- a real server and tritonclient ---------------------------------------------------------


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.url.removeprefix("http://")) as c:
        yield c


def _image_input(files) -> triton.InferInput:
    data = np.array([f.read_bytes() for f in files], dtype=np.object_)
    tensor = triton.InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(data)  # binary, tritonclient's default
    return tensor


def _classify_probs(server, photo, tta: str) -> np.ndarray:
    answer = post(server, "/classify", {"image": (photo.name, photo.read_bytes())},
                  {"tta": tta, "top_k": len(LABELS)}).json()
    scores = {p["label"]: p["score"] for p in answer["predictions"]}
    return np.array([scores[label] for label in LABELS], np.float32)


@pytest.mark.slow
def test_tritonclient_health_and_metadata(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME) and client.is_model_ready(NAME, "1")
    assert not client.is_model_ready("another-model")
    meta = client.get_model_metadata(NAME)
    assert meta["name"] == NAME and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "image": ("BYTES", [-1]), "pixels": ("UINT8", [-1, 3, 32, 32])}
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    assert "classification" in client.get_server_metadata()["extensions"]
    with pytest.raises(InferenceServerException, match="no model 'another-model'"):
        client.get_model_metadata("another-model")
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}


@pytest.mark.slow
@pytest.mark.parametrize("tta", ["none", "five_crop"])
def test_tritonclient_infer_equals_classify(client, server, photos, tta):
    result = client.infer(NAME, [_image_input(photos)], parameters={"tta": tta})
    assert result.get_response()["parameters"]["tta"] == tta
    got = result.as_numpy("probabilities")
    want = np.stack([_classify_probs(server, p, tta) for p in photos])
    assert got.shape == (len(photos), len(LABELS))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    top = client.infer(NAME, [_image_input(photos)], parameters={"tta": tta},
                       outputs=[triton.InferRequestedOutput("probabilities", class_count=2)])
    labels = [[s.decode().split(":", 2)[2] for s in row] for row in top.as_numpy("probabilities")]
    assert labels == [[LABELS[i] for i in np.argsort(-row, kind="stable")[:2]] for row in want]


@pytest.mark.slow
def test_tritonclient_pixels_as_json_equal_classify(client, server, tiny_package, photos):
    pre = Preprocessor.from_card(ModelCard.load(tiny_package / "card.json"))
    pixels = np.concatenate([pre(p.read_bytes()) for p in photos])
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=False)
    result = client.infer(NAME, [tensor], outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)])
    want = np.stack([_classify_probs(server, p, "none") for p in photos])
    np.testing.assert_allclose(result.as_numpy("probabilities"), want, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_bad_tensors_get_4xx_with_a_message(client, server, photos):
    cases = []
    wrong_dtype = triton.InferInput("image", [1], "INT32")
    wrong_dtype.set_data_from_numpy(np.array([7], np.int32))
    cases.append((wrong_dtype, "must be BYTES"))
    wrong_shape = triton.InferInput("pixels", [1, 3, 8, 8], "UINT8")
    wrong_shape.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.uint8))
    cases.append((wrong_shape, r"\[N, 3, 32, 32\]"))
    undecodable = triton.InferInput("image", [2], "BYTES")
    undecodable.set_data_from_numpy(np.array([photos[0].read_bytes(), b"not an image"], dtype=np.object_))
    cases.append((undecodable, "image 1 of 2: the bytes are not a recognised image"))
    truncated = triton.InferInput("image", [1], "BYTES")
    truncated.set_data_from_numpy(np.array([photos[0].read_bytes()[:3000]], dtype=np.object_))
    cases.append((truncated, "image 0 of 1"))
    for tensor, message in cases:
        with pytest.raises(InferenceServerException, match=message) as e:
            client.infer(NAME, [tensor])
        assert e.value.status() == "400"
    with pytest.raises(InferenceServerException, match="unknown tta") as e:
        client.infer(NAME, [_image_input(photos[:1])], parameters={"tta": "twenty_crop"})
    assert e.value.status() == "400"
    url = f"{server.url}/v2/models/{NAME}/infer"
    for body, headers, status in [
        (b"{not json", {}, 400),
        (b'{"inputs": []}xx', {"Inference-Header-Content-Length": "999"}, 400),
        (b'{"inputs": []}', {"Content-Encoding": "gzip"}, 415),
    ]:
        response = httpx.post(url, content=body, headers=headers)
        assert response.status_code == status and "error" in response.json()
    assert httpx.post(f"{server.url}/v2/models/other/infer", content=b"{}").status_code == 404
    assert client.is_server_ready()  # and it keeps serving


def test_a_json_head_with_too_many_values_is_refused_before_it_is_parsed():
    big = {"inputs": [{"name": "pixels", "shape": [1, 3, 32, 32], "datatype": "UINT8",
                       "data": [7] * (MAX_JSON_VALUES + 1)}]}
    with pytest.raises(JsonTooLargeError, match="binary tensor extension") as e:
        _parse(big)
    assert e.value.http_status == 413
    # Not by parsing it: a head that is not even JSON past its values is refused the same way.
    with pytest.raises(JsonTooLargeError):
        parse_infer(b"{" + b"1," * MAX_JSON_VALUES + b"oops", None, CARD, max_images=8)
    # The binary part is not counted: a body of any size there is the binary extension's.
    pixels = np.full((1, 3, 32, 32), 44, np.uint8).tobytes() * 1
    ok = _parse({"inputs": [{"name": "pixels", "shape": [1, 3, 32, 32], "datatype": "UINT8",
                             "parameters": {"binary_data_size": len(pixels)}}]}, pixels)
    assert ok.pixels.shape == (1, 3, 32, 32)


@pytest.mark.slow
def test_a_client_sending_huge_json_bodies_does_not_hold_a_probe_on_another_connection(server):
    """Four connections keep sending infer bodies of JSON pixels near the body limit (18 MB
    each) while a liveness probe on its own connection is timed: each probe is answered
    within 100 ms, and every big body gets its 413."""
    n = 1464  # images of 3 x 32 x 32: 18 MB of JSON, under the 21 MB body limit
    body = json.dumps({"inputs": [{"name": "pixels", "shape": [n, 3, 32, 32], "datatype": "UINT8",
                                   "data": [200] * (n * 3072)}]}, separators=(",", ":")).encode()
    assert 17_000_000 < len(body) < 20_000_000
    statuses, stop = [], threading.Event()
    host, port = server.url.removeprefix("http://").split(":")

    def send():  # http.client sends the body with one sendall, which leaves the GIL to the probe
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        while not stop.is_set():
            connection.request("POST", f"/v2/models/{NAME}/infer", body=body)
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        connection.close()

    senders = [threading.Thread(target=send) for _ in range(4)]
    for t in senders:
        t.start()
    probes = []
    try:
        with httpx.Client(timeout=10) as probe:
            probe.get(f"{server.url}/v2/health/live")
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline or len(statuses) < 8:
                started = time.perf_counter()
                assert probe.get(f"{server.url}/v2/health/live").status_code == 200
                probes.append(time.perf_counter() - started)
                time.sleep(0.02)
    finally:
        stop.set()
        for t in senders:
            t.join()
    assert statuses and set(statuses) == {413}
    assert max(probes) < 0.1, f"slowest probe {max(probes) * 1000:.0f} ms of {len(probes)}"
