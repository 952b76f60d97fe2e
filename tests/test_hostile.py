"""Hostile files and traffic over real HTTP: documented statuses, and the server keeps serving."""

from __future__ import annotations

import io
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.images import png_chunk, png_header
from bench.server import Server
from tests.helpers import PHOTOS, encode, gradient_image

pytestmark = pytest.mark.slow


def bomb_png(side: int = 8000) -> bytes:
    """A real PNG of side x side pixels (64 MP), all zeros: ~200 KB on the wire."""
    row = b"\x00" + b"\x00" * side  # filter byte + 8-bit grayscale row
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def gif_frames(n: int = 1000) -> bytes:
    frames = [Image.new("P", (16, 16), i % 256) for i in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _corpus() -> list[tuple[str, dict, dict, int]]:
    jpeg = PHOTOS[0].read_bytes()
    gray16 = encode(Image.fromarray((np.arange(64 * 64, dtype=np.uint16) * 16).reshape(64, 64)))
    polyglot = encode(gradient_image(48, 48)) + b"PK\x03\x04" + b"<script>alert(1)</script>" * 10
    f = lambda name, data, ctype="application/octet-stream": {"image": (name, data, ctype)}  # noqa: E731
    return [
        ("bomb-png", f("bomb.png", bomb_png()), {}, 413),
        ("huge-dimension-header", f("huge.png", png_header(60000, 60000)), {}, 413),
        ("truncated-jpeg", f("t.jpg", jpeg[: len(jpeg) // 2]), {}, 400),
        ("zero-length", f("empty.jpg", b""), {}, 400),
        ("svg-text", f("x.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"), {}, 400),
        ("ico-format", f("x.ico", encode(gradient_image(32, 32), "ICO")), {}, 415),
        ("png-zip-polyglot", f("p.png", polyglot), {}, 200),
        ("gif-1000-frames", f("many.gif", gif_frames()), {}, 200),
        ("gray-16-bit-png", f("g16.png", gray16), {}, 200),
        ("cmyk-jpeg", f("cmyk.jpg", encode(gradient_image().convert("CMYK"), "JPEG")), {}, 200),
        ("url-in-file-field", {"image": (None, "http://127.0.0.1:1/x.jpg")}, {}, 400),
        ("url-form-urlencoded", {}, {"image": "http://127.0.0.1:1/x.jpg"}, 415),
        ("missing-file", {"tta": (None, "none")}, {}, 400),
        ("body-over-limit", f("big.jpg", b"\xff\xd8" + b"\x00" * (22 * 1024 * 1024)), {}, 413),
    ]


CORPUS = _corpus()


@pytest.mark.parametrize(("name", "files", "data", "status"), CORPUS, ids=[c[0] for c in CORPUS])
def test_hostile_corpus(server, name, files, data, status):
    r = httpx.post(f"{server.url}/classify", files=files or None, data=data, timeout=60)
    assert r.status_code == status, (name, r.text[:300])
    if status != 200:
        assert r.json()["error"], r.text
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_json_body_is_refused_and_no_server_path_is_read(server):
    r = httpx.post(f"{server.url}/classify", json={"image": "/etc/passwd"}, timeout=30)
    assert r.status_code == 415 and "multipart" in r.json()["error"]
    r = httpx.post(f"{server.url}/classify", content=b"http://127.0.0.1:1/x.jpg",
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 415


def test_too_many_images_in_one_batch(server):
    img = encode(gradient_image(40, 40))
    files = [("images", (f"{i}.png", img, "image/png")) for i in range(65)]
    r = httpx.post(f"{server.url}/classify_batch", files=files, timeout=60)
    assert r.status_code == 413 and "64" in r.json()["error"]


def test_openapi_fuzz_no_5xx(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{server.url}/docs.json")
    schema.config.update(base_url=server.url)
    checked = []

    # Each operation of the service's own OpenAPI schema, as a bounded hypothesis run.
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(case=operation.as_strategy())
        def fuzz(case):
            response = case.call(timeout=30)
            checked.append((case.method, case.path, response.status_code))
            # A strict latency budget that cannot be met is answered 503 + Retry-After by design
            strict = isinstance(case.body, dict) and str(case.body.get("tta_budget_strict")).lower() in ("true", "1")
            refused = strict and response.status_code == 503 and "retry-after" in response.headers
            assert response.status_code < 500 or refused, (case.method, case.path, response.text[:300])

        fuzz()
    paths = {p for _, p, _ in checked}
    assert {"/classify", "/classify_batch", "/card"} <= paths
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_overload_gets_fast_503_with_retry_after_and_recovers(tiny_package, tmp_path):
    big = (tmp_path / "big.jpg")
    Image.open(PHOTOS[1]).convert("RGB").resize((4000, 2668)).save(big, quality=90)
    payload = big.read_bytes()
    env = {"SOTA_SERVE_MAX_WAIT_S": "0.2", "SOTA_SERVE_ADMISSION_HOLD_S": "0", "SOTA_SERVE_DEVICE": "cpu"}
    with Server(tiny_package, env=env, home=tmp_path / "bentoml") as server:
        def one(_):
            start = time.perf_counter()
            r = httpx.post(f"{server.url}/classify", files={"image": ("big.jpg", payload, "image/jpeg")},
                           timeout=120)
            return r, time.perf_counter() - start

        with ThreadPoolExecutor(48) as pool:
            results = list(pool.map(one, range(48)))
        accepted = [t for r, t in results if r.status_code == 200]
        rejected = [(r, t) for r, t in results if r.status_code == 503]
        assert len(accepted) + len(rejected) == 48, {r.status_code for r, _ in results}
        # How many get in depends on how fast this machine decodes while the clients share its
        # cores; a quarter refused is far from what an unguarded server does (none).
        assert accepted and len(rejected) >= 12
        assert all(int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["error"] for r, _ in rejected)
        print(f"\noverload: accepted {len(accepted)}, rejected {len(rejected)},"
              f" p99 accepted {1000 * float(np.percentile(accepted, 99)):.0f} ms,"
              f" median rejection {1000 * float(np.median([t for _, t in rejected])):.0f} ms")
        ok = httpx.post(f"{server.url}/classify", files={"image": ("b.jpg", payload, "image/jpeg")}, timeout=60)
        assert ok.status_code == 200
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def _requests_counted(url: str, endpoint: str) -> float:
    import re

    text = httpx.get(f"{url}/metrics", timeout=30).text
    pattern = rf'bentoml_service_request_total\{{[^}}]*endpoint="{re.escape(endpoint)}"[^}}]*http_response_code="200"'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if re.match(pattern, line))


def test_bentoml_metrics_count_the_front_doors_answers(server):
    before = _requests_counted(server.url, "/classify")
    for _ in range(3):
        r = httpx.post(f"{server.url}/classify", files={"image": ("p.jpg", PHOTOS[0].read_bytes(), "image/jpeg")},
                       timeout=60)
        assert r.status_code == 200
    assert _requests_counted(server.url, "/classify") == before + 3


def test_a_trickled_body_gets_408_and_the_server_keeps_serving(tiny_package, tmp_path):
    import socket

    env = {"SOTA_SERVE_DEVICE": "cpu", "SOTA_SERVE_DEADLINE_S": "2"}
    with Server(tiny_package, home=tmp_path / "bentoml", env=env) as srv:
        head = (b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                b"Content-Length: 100000\r\n\r\n")
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            started = time.monotonic()
            s.sendall(head + b"--x\r\n")  # then nothing more: the upload stalls
            answer = b""
            while chunk := s.recv(65536):  # until the server closes the connection
                answer += chunk
            waited = time.monotonic() - started
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"connection: close" in rest.lower() and b"SOTA_SERVE_DEADLINE_S" in rest
        assert 1.5 < waited < 20  # the front door's 2 s, not BentoML's traffic timeout (120 s)
        r = httpx.post(f"{srv.url}/classify", files={"image": ("p.jpg", PHOTOS[0].read_bytes(), "image/jpeg")},
                       timeout=60)
        assert r.status_code == 200


ORIGIN = "https://app.example"


def test_cors_headers_on_every_answer(tiny_package, tmp_path):
    env = {"SOTA_SERVE_DEVICE": "cpu", "SOTA_SERVE_CORS_ORIGINS": ORIGIN}
    with Server(tiny_package, home=tmp_path / "bentoml", env=env) as srv:
        url = srv.url

        def classify(**headers: str) -> httpx.Response:
            return httpx.post(f"{url}/classify", files={"image": ("p.jpg", PHOTOS[0].read_bytes(), "image/jpeg")},
                              headers=headers, timeout=60)

        r = classify(Origin=ORIGIN)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        bad = httpx.post(f"{url}/classify", content=b"{}", headers={"Origin": ORIGIN}, timeout=30)
        assert bad.status_code == 415 and bad.headers["access-control-allow-origin"] == ORIGIN
        preflight = httpx.options(f"{url}/classify", timeout=30, headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
        assert "access-control-allow-origin" not in classify(Origin="https://other.example").headers
        card = httpx.post(f"{url}/card", headers={"Origin": ORIGIN}, timeout=30)  # answered by BentoML
        assert card.status_code == 200 and card.headers["access-control-allow-origin"] == ORIGIN
