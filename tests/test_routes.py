"""The multipart split and form reading of the direct image routes (no server)."""

from __future__ import annotations

import httpx
import pytest

from sota_serve.contract.requests import ClassifyBatchForm, ClassifyForm
from sota_serve.errors import MalformedRequestError
from sota_serve.http.form import read_form
from sota_serve.http.multipart import boundary, parts
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
    form = read_form(ClassifyBatchForm, list(parts(body, sep)), "/classify_batch")
    assert (form.images, form.tta, form.top_k, form.fallback()) == ([b"1"], "five_crop", 2, FallbackAsk())
    body, sep = encoded({"images": ("a.jpg", b"1", "image/jpeg")}, {"tta_fallback": "true", "tta_budget_s": "0.5"})
    form = read_form(ClassifyBatchForm, list(parts(body, sep)), "/classify_batch")
    assert (form.images, form.tta, form.top_k, form.fallback()) == ([b"1"], None, 5, FallbackAsk(True, 0.5))  # None: the card's default


@pytest.mark.parametrize(("field", "value"), [("top_k", "abc"), ("top_k", "2.5"), ("top_k", "true"), ("tta", "3"),
                                                     ("tta_fallback", "maybe"), ("tta_budget_s", "soon")])
def test_malformed_values_are_400_with_the_field_named(field, value):
    body, sep = encoded({"image": ("a.jpg", b"1", "image/jpeg")}, {field: value})
    with pytest.raises(MalformedRequestError) as e:
        read_form(ClassifyForm, list(parts(body, sep)), "/classify")
    assert field in str(e.value) and e.value.http_status == 400


def _sent(send_messages):
    """A real ASGI ``send`` that keeps what it is given."""
    async def send(message):
        send_messages.append(message)
    return send


@pytest.mark.parametrize(("status", "body", "head", "logged"), [
    (404, b"Not Found", False, "GET /nowhere -> 404: Not Found"),  # BentoML's plain text
    (400, b'[{"error": "bad\\nfield"}]', False, "GET /nowhere -> 400: bad field"),  # its list, one line
    (405, b"", True, "GET /nowhere -> 405: Method Not Allowed"),  # HEAD: no body to read
    (200, b'{"ok": true}', False, None),
    (503, b"busy", False, None),
])
def test_json_errors_logs_each_4xx_once_as_one_line(caplog, status, body, head, logged):
    import asyncio

    from sota_serve.http.errors import json_errors

    out: list[dict] = []
    send = json_errors(_sent(out), lambda: 3, head=head, request="GET /nowhere")

    async def answer():
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body[:3], "more_body": True})
        await send({"type": "http.response.body", "body": body[3:]})

    with caplog.at_level("WARNING", logger="sota_serve.http"):
        asyncio.run(answer())
    lines = [r.getMessage() for r in caplog.records if r.name == "sota_serve.http"]
    assert lines == ([logged] if logged else []), lines
    assert all(r.levelname == "WARNING" for r in caplog.records if r.name == "sota_serve.http")
    if 400 <= status < 500 and not head:
        sent = b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body")
        assert sent.endswith(b"\n") and list(__import__("json").loads(sent)) == ["error"]


def test_the_ray_ingress_logs_the_4xx_it_answers_itself(caplog):
    """The Ray front end hands its answers to Ray rather than sending them through
    json_errors: a 413 from its body limit is one warning line there too."""
    import asyncio

    from rayserve.ingress import Ingress
    from sota_serve.http.limits import Limits

    async def call(method, *args):  # never reached: the limit answers first
        raise AssertionError(f"{method} forwarded")

    ingress = Ingress(call, Limits(max_body_bytes=1024, body_timeout_s=5, max_files=4), timeout_s=5)
    scope = {"type": "http", "method": "POST", "path": "/classify", "root_path": "",
             "headers": [(b"content-length", b"4096"), (b"content-type", b"multipart/form-data; boundary=x")]}

    async def receive():
        return {"type": "http.request", "body": b"x" * 4096, "more_body": False}

    with caplog.at_level("WARNING", logger="sota_serve.http"):
        status, _, _ = asyncio.run(ingress.handle(scope, receive))
    assert status == 413
    lines = [r.getMessage() for r in caplog.records if r.name == "sota_serve.http"]
    assert len(lines) == 1 and lines[0].startswith("POST /classify -> 413: request body above the limit"), lines
