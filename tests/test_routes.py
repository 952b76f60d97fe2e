"""The multipart split and form reading of the direct image routes (no server)."""

from __future__ import annotations

import httpx
import pytest

from sota_serve.errors import MalformedRequestError
from sota_serve.http.multipart import boundary, parts
from sota_serve.http.routes import _form
from sota_serve.serving.fallback import FallbackAsk


def encoded(files, data=None) -> tuple[bytes, bytes]:
    """A body and boundary exactly as a real client (httpx) builds them."""
    request = httpx.Request("POST", "http://x/classify", files=files, data=data or {})
    sep = boundary(request.headers["content-type"])
    assert sep is not None
    return request.read(), sep


def test_parts_match_what_the_client_sent():
    jpeg = bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n"  # binary, with CRLFs inside
    body, sep = encoded({"image": ("a.jpg", jpeg, "image/jpeg")}, {"tta": "five_crop", "top_k": "3"})
    got = {p.name: p for p in parts(body, sep)}
    assert got["image"].content == jpeg and got["image"].is_file
    assert got["tta"].text() == "five_crop" and not got["tta"].is_file
    assert got["top_k"].text() == "3"


def test_empty_file_part_is_kept_empty():
    body, sep = encoded({"image": ("e.png", b"", "image/png")})
    (part,) = parts(body, sep)
    assert part.content == b"" and part.is_file


@pytest.mark.parametrize("cut", [0.3, 0.7, 0.99])
def test_truncated_body_is_malformed_not_a_short_image(cut):
    body, sep = encoded({"image": ("a.jpg", b"x" * 1000, "image/jpeg")})
    with pytest.raises(MalformedRequestError) as e:
        list(parts(body[: int(len(body) * cut)], sep))
    assert e.value.http_status == 400


def test_form_reads_values_as_bentoml_does():
    body, sep = encoded({"images": ("a.jpg", b"1", "image/jpeg")}, {"tta": '"five_crop"', "top_k": "2"})
    assert _form(list(parts(body, sep)), "images") == ([b"1"], "five_crop", 2, FallbackAsk())
    body, sep = encoded({"images": ("a.jpg", b"1", "image/jpeg")}, {"tta_fallback": "true", "tta_budget_s": "0.5"})
    assert _form(list(parts(body, sep)), "images") == ([b"1"], None, 5, FallbackAsk(True, 0.5))  # None: the card's default


@pytest.mark.parametrize(("field", "value"), [("top_k", "abc"), ("top_k", "2.5"), ("top_k", "true"), ("tta", "3"),
                                                     ("tta_fallback", "maybe"), ("tta_budget_s", "soon")])
def test_malformed_values_are_400_with_the_field_named(field, value):
    body, sep = encoded({"image": ("a.jpg", b"1", "image/jpeg")}, {field: value})
    with pytest.raises(MalformedRequestError) as e:
        _form(list(parts(body, sep)), "image")
    assert field in str(e.value) and e.value.http_status == 400
