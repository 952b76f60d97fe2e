"""The OpenAPI UI at ``/docs``: Swagger UI rendering ``/docs.json``, from the copy of
swagger-ui-dist that the package ships in sota_serve/http/page/ (its bundle and stylesheet,
unmodified, with its LICENSE, NOTICE and the bundle's third-party licences: Apache-2.0). The
page loads nothing from elsewhere, and the same under every front end.

The assets' path names the version, so a browser may keep them for good; the page itself is
revalidated, as the page for people is.
"""

from __future__ import annotations

from functools import cache

from sota_serve.http.errors import Answer
from sota_serve.http.page import PAGE_DIR

#: the swagger-ui-dist release shipped (npm pack swagger-ui-dist@5.36.0)
SWAGGER_UI_VERSION = "5.36.0"
ASSET_PREFIX = f"/docs/swagger-ui-{SWAGGER_UI_VERSION}/"
#: asset name -> content type
ASSETS = {"swagger-ui.css": "text/css; charset=utf-8", "swagger-ui-bundle.js": "text/javascript; charset=utf-8"}


@cache
def _read(name: str) -> bytes:
    data = (PAGE_DIR / name).read_bytes()
    return data.replace(b"__VERSION__", SWAGGER_UI_VERSION.encode()) if name == "docs.html" else data


def answer(path: str) -> Answer | None:
    """``GET /docs`` and its assets; None for any other path."""
    if path == "/docs":
        return 200, {"content-type": "text/html; charset=utf-8", "cache-control": "no-cache"}, _read("docs.html")
    name = path.removeprefix(ASSET_PREFIX)
    if name != path and name in ASSETS:
        return 200, {"content-type": ASSETS[name], "cache-control": "public, max-age=31536000, immutable"}, _read(name)
    return None
