"""The page for people at ``/`` (sota_serve/http/page/: plain HTML, CSS and JS, no build step, nothing
fetched from elsewhere) and ``GET /crops`` for the crop boxes it draws. The same folder holds
the OpenAPI UI's files (sota_serve/http/docs.py).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from urllib.parse import parse_qs

from sota_serve.errors import MalformedRequestError, SotaServeError
from sota_serve.explain.heatmap import ALPHA, INFERNO
from sota_serve.http.errors import Answer, error_answer, json_body
from sota_serve.image.preprocess import Preprocessor
from sota_serve.package.card import ModelCard, accuracy_key
from sota_serve.predictions import DEFAULT_TOP_K
from sota_serve.tta import CROPS_PER_IMAGE, DESCRIPTIONS

PAGE_DIR = Path(__file__).with_name("page")
#: URL path -> file in PAGE_DIR
ASSETS = {"/": "index.html", "/page/page.css": "page.css", "/page/page.js": "page.js"}
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8"}
_MAX_SIDE = 1 << 20


@cache
def _read(name: str) -> bytes:
    return (PAGE_DIR / name).read_bytes()


def asset(path: str, pre: Preprocessor | None = None, card: ModelCard | None = None, *,
          models: tuple[str, ...] = (), name: str | None = None) -> Answer | None:
    """The page's files (``/`` needs the model: None before it is loaded); None for any other
    path. ``models``: every model served, for the page's list; ``name``: the model the page is
    for, when not the default one (its routes are under ``/models/{name}``)."""
    asset_name = ASSETS.get(path)
    if asset_name is None or (path == "/" and (pre is None or card is None)):
        return None
    data = _read(asset_name)
    if path == "/":
        data = data.replace(b"__CONFIG__", _config(pre, card, models, name))  # type: ignore[arg-type]
    # no-cache: a browser revalidates, so a redeployed service never runs yesterday's script
    return 200, {"content-type": _TYPES[Path(asset_name).suffix], "cache-control": "no-cache"}, data


def _config(pre: Preprocessor, card: ModelCard, models: tuple[str, ...], name: str | None) -> bytes:
    """What the page's script needs from the server: the policies this card offers, in
    sota_serve.tta's words, the defaults, and where its model's routes are."""
    metrics = card.metrics
    policies = [{"name": p, "crops": CROPS_PER_IMAGE[p], "resize": pre.edge(p), "about": DESCRIPTIONS[p],
                 # the validation accuracy the card records: what an answer served with it can expect
                 "accuracy": getattr(metrics, accuracy_key(p)) if metrics else None}
                for p in pre.policies]
    config = {"model": card.tag, "default": card.tta.default, "top_k": DEFAULT_TOP_K, "policies": policies,
              "heat": {"stops": INFERNO, "alpha": ALPHA}, "models": list(models),
              "name": name or (models[0] if models else card.name), "prefix": f"/models/{name}" if name else ""}
    # "</" would end the <script> element early
    return json.dumps(config).replace("</", "<\\/").encode()


def crops(pre: Preprocessor, query: bytes) -> Answer:
    """``GET /crops?width=W&height=H&tta=P``: where the crops of policy P fall on a W x H image."""
    try:
        params = {k: v[-1] for k, v in parse_qs(query.decode("latin-1")).items()}
        width, height = (_side(params, "width"), _side(params, "height"))
        tta = params.get("tta", "none")
        boxes = pre.source_windows(width, height, tta)
    except SotaServeError as e:
        return error_answer(e)
    body = {"tta": tta, "resize_shortest_edge": pre.edge(tta),
            "windows": [{"left": round(x, 2), "top": round(y, 2), "width": round(w, 2), "height": round(h, 2),
                         "mirrored": mirrored} for x, y, w, h, mirrored in boxes]}
    return 200, {}, json_body(body)


def _side(params: dict[str, str], name: str) -> int:
    value = params.get(name, "")
    if not value.isdigit() or not 1 <= int(value) <= _MAX_SIDE:
        raise MalformedRequestError(f"{name} must be an integer in 1..{_MAX_SIDE}, got {value!r:.20}")
    return int(value)
