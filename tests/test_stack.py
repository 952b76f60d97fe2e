"""Where the guard sits among BentoML's middlewares (bento/stack.py): the order itself, and a
real server whose outer layers (metrics, CORS) still see the guard's answers, while the body
of a request is bounded by the guard's own time limit instead of BentoML's traffic timeout."""

from __future__ import annotations

import re
import socket
import time

import httpx
import pytest
from starlette.middleware import Middleware

from bench.server import Server
from bento.guard import RequestGuard
from bento.stack import guard_placed, outside
from tests.helpers import PHOTOS


class _Named:
    """A stand-in middleware class of a given name: only names decide the order."""

    def __init__(self, app: object) -> None:
        self.app = app


def named(name: str) -> Middleware:
    return Middleware(type(name, (_Named,), {}))


def order(middlewares: list[Middleware]) -> list[str]:
    return [m.cls.__name__ for m in middlewares]


BENTOML = ["RunnerTrafficMetricsMiddleware", "OpenTelemetryMiddleware", "TimeoutMiddleware"]


def bentoml_stack(*names: str, cors: bool = False) -> list[Middleware]:
    """BentoML 1.4's order: its outer middlewares, the service's own, CORS, its context."""
    stack = [named(n) for n in names] + [Middleware(RequestGuard)]
    return stack + ([named("CORSMiddleware")] if cors else []) + [named("ContextMiddleware")]


def test_the_guard_moves_out_past_the_timeout_and_untraced_tracing():
    placed = guard_placed(bentoml_stack(*BENTOML), RequestGuard, outside(traced=False))
    assert order(placed) == ["RunnerTrafficMetricsMiddleware", "RequestGuard", "OpenTelemetryMiddleware",
                             "TimeoutMiddleware", "ContextMiddleware"]


def test_layers_that_must_see_its_answers_stay_outside():
    traced = guard_placed(bentoml_stack(*BENTOML), RequestGuard, outside(traced=True))
    assert order(traced)[:3] == [*BENTOML[:2], "RequestGuard"]
    logged = bentoml_stack(BENTOML[0], BENTOML[1], "AccessLogMiddleware", BENTOML[2], "MaxConcurrencyMiddleware")
    assert order(guard_placed(logged, RequestGuard, outside(traced=False))) == [
        *BENTOML[:2], "AccessLogMiddleware", "RequestGuard", "TimeoutMiddleware", "MaxConcurrencyMiddleware",
        "ContextMiddleware"]
    # CORS comes after the service's middlewares in BentoML: the guard moves in past it.
    with_cors = guard_placed(bentoml_stack(*BENTOML, cors=True), RequestGuard, outside(traced=False))
    assert order(with_cors) == [*BENTOML, "CORSMiddleware", "RequestGuard", "ContextMiddleware"]


def test_a_stack_without_the_guard_or_without_known_layers_is_kept():
    plain = [named(n) for n in BENTOML]
    assert guard_placed(plain, RequestGuard, outside(traced=False)) == plain
    unknown = [named("Other"), Middleware(RequestGuard)]
    assert order(guard_placed(unknown, RequestGuard, outside(traced=False))) == ["RequestGuard", "Other"]


ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def layered_server(tiny_package, tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml-stack")
    config = home / "bentoml.yaml"
    config.write_text("services:\n  sota_serve:\n    http:\n      cors:\n        enabled: true\n"
                      f"        access_control_allow_origins: ['{ORIGIN}']\n"
                      "        access_control_allow_methods: ['GET', 'POST']\n")
    env = {"SOTA_SERVE_DEVICE": "cpu", "SOTA_SERVE_DEADLINE_S": "2", "BENTOML_CONFIG": str(config)}
    with Server(tiny_package, home=home / "home", env=env) as srv:
        yield srv


def classify(url: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/classify", files={"image": ("p.jpg", PHOTOS[0].read_bytes(), "image/jpeg")},
                      headers=headers, timeout=60)


@pytest.mark.slow
def test_cors_headers_on_the_guards_answers(layered_server):
    url = layered_server.url
    r = classify(url, Origin=ORIGIN)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    bad = httpx.post(f"{url}/classify", content=b"{}", headers={"Origin": ORIGIN}, timeout=30)
    assert bad.status_code == 415 and bad.headers["access-control-allow-origin"] == ORIGIN
    preflight = httpx.options(f"{url}/classify", timeout=30, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in classify(url, Origin="https://other.example").headers


def _requests_counted(url: str, endpoint: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    pattern = rf'bentoml_service_request_total\{{[^}}]*endpoint="{re.escape(endpoint)}"[^}}]*http_response_code="200"'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if re.match(pattern, line))


@pytest.mark.slow
def test_bentoml_metrics_count_the_guards_answers(layered_server):
    before = _requests_counted(layered_server.url, "/classify")
    for _ in range(3):
        assert classify(layered_server.url).status_code == 200
    assert _requests_counted(layered_server.url, "/classify") == before + 3


@pytest.mark.slow
def test_a_trickled_body_gets_408_and_the_server_keeps_serving(layered_server):
    head = (b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 100000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", layered_server.port), timeout=30) as s:
        started = time.monotonic()
        s.sendall(head + b"--x\r\n")  # then nothing more: the upload stalls
        answer = b""
        while chunk := s.recv(65536):  # until the server closes the connection
            answer += chunk
        waited = time.monotonic() - started
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"connection: close" in rest.lower() and b"SOTA_SERVE_DEADLINE_S" in rest
    assert 1.5 < waited < 20  # the guard's 2 s, not BentoML's traffic timeout (120 s)
    assert classify(layered_server.url).status_code == 200
