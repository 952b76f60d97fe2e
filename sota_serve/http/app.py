"""What a front end that serves the HTTP contract without BentoML answers itself (Ray Serve's
ingress, rayserve/ingress.py): the routes no handler takes, with 404 or 405 as ``{"error": ...}``,
and the ASGI lifespan protocol, which servers such as uvicorn and Ray Serve's replicas speak.
"""

from __future__ import annotations

import json

from sota_serve.http.errors import Answer
from sota_serve.http.front_door import Message, Receive, Send
from sota_serve.http.routes import FILE_FIELDS


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
