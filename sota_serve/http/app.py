"""The whole HTTP contract as one ASGI app, for servers that take any ASGI app (Ray Serve's
ingress): the front door over a small fallback for what it passes on.

The front door answers the contract's routes itself, except ``POST /card`` (under BentoML an
API method): the fallback answers that one, and any other path or method with 404 or 405 as
``{"error": ...}``. It also runs the ASGI lifespan protocol, which servers such as uvicorn and
Ray Serve's replicas speak.
"""

from __future__ import annotations

import json

from sota_serve.http.errors import Answer
from sota_serve.http.front_door import App, FrontDoor, Message, Receive, Scope, Send, respond
from sota_serve.http.limits import Limits
from sota_serve.http.routes import FILE_FIELDS, Routes
from sota_serve.serving.admission import Admission
from sota_serve.serving.settings import Settings


def contract_app(routes: Routes, admission: Admission, settings: Settings) -> App:
    """The front door with the settings' limits, over :class:`Fallback`."""
    limits = Limits(max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.deadline_s,
                    max_files=settings.max_batch_images)
    return FrontDoor(Fallback(routes), routes=routes, admission=admission, limits=limits,
                     hold_s=settings.admission_hold_s)


class Fallback:
    def __init__(self, routes: Routes) -> None:
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["type"] != "http":
            return None  # no websockets: the server closes the connection
        await respond(send, self.answer(scope["method"], scope["path"]), head=scope["method"] == "HEAD")

    def answer(self, method: str, path: str) -> Answer:
        if method == "POST" and path == "/card":
            card = self.routes.get("/card")
            if card is not None:
                return card
        return unrouted(method, path)


def unrouted(method: str, path: str) -> Answer:
    """The answer to a request no route takes: 405 with ``Allow`` for a known path, else 404."""
    if path in FILE_FIELDS or path == "/card":
        allowed = "POST" if path in FILE_FIELDS else "GET, POST"
        return 405, {"Allow": allowed}, _error(f"{path} takes {allowed}")
    return 404, {}, _error(f"no route {method} {path}")


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


async def lifespan(receive: Receive, send: Send) -> None:
    """The ASGI lifespan protocol: nothing to start or stop."""
    while True:
        message: Message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
