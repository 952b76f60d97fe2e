"""What a front end that serves the HTTP contract without BentoML answers itself (Ray Serve's
ingress, rayserve/ingress.py): the routes no handler takes, with 404 or 405 as ``{"error": ...}``.
"""

from __future__ import annotations

from sota_serve.contract.requests import FILE_FIELDS
from sota_serve.http.errors import Answer, error_body
from sota_serve.http.routes import model_route


def unrouted(method: str, path: str) -> Answer:
    """The answer to a request no route takes: 405 with ``Allow`` for a known path, else 404."""
    route = model_route(path)[1]
    if route in FILE_FIELDS or route == "/card":
        allowed = "POST" if route in FILE_FIELDS else "GET, POST"
        return 405, {"Allow": allowed}, error_body(f"{path} takes {allowed}")
    return 404, {}, error_body(f"no route {method} {path}")

