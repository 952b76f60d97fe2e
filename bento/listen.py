"""A listening socket per worker (SO_REUSEPORT), so that the kernel spreads connections evenly.

BentoML (1.4) gives every worker process of a service one shared listening socket. Each
worker's event loop accepts every connection pending when it wakes, so a burst of new
keep-alive connections (a load balancer's pool, a load generator) often lands mostly on one
worker, which keeps it: with 2 workers and 16 connections opened at once, all 16 went to one
worker in 4 of 20 trials, and that worker served alone at half the throughput (BENCHMARKS.md).

With SO_REUSEPORT each worker listens on a socket of its own, bound to the same address, and
the kernel hashes each new connection to one of them. BentoML has no option for it, so:

- in the ``bentoml serve`` process, which imports the service before it binds the API
  socket, :func:`arbiter_binds_reuseport` makes that socket SO_REUSEPORT (after checking
  that no other process holds the port: SO_REUSEPORT would otherwise share it silently);
- in each worker, :func:`take_own_socket` (at import, before uvicorn listens on the
  inherited descriptor) binds a socket of its own and puts it in that descriptor's place.
  Worker 1 keeps the shared socket, which the serve process holds too but never accepts on.

Both steps do nothing with one worker, with ``SOTA_SERVE_REUSE_PORT=off``, or where the
platform or BentoML's internals are not what this expects; then the shared socket serves as
before.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Sequence

log = logging.getLogger("bentoml.sota_serve")

#: circus's name for BentoML's HTTP socket (``_bentoml_impl.server.serving.API_SERVER_NAME``)
API_SOCKET = "_bento_api_server"
_INET = (socket.AF_INET, socket.AF_INET6)


def supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith("linux")


def arbiter_binds_reuseport() -> bool:
    """Make the API socket that ``bentoml serve`` is about to bind SO_REUSEPORT; True if
    patched. Harmless in worker processes, which never bind circus sockets."""
    if not supported():
        return False
    try:
        from circus.sockets import CircusSocket
    except ImportError:  # BentoML without circus: nothing to patch
        return False
    original = getattr(CircusSocket, "bind_and_listen", None)
    if original is None or getattr(original, "_sota_reuseport", False):
        return original is not None

    def bind_and_listen(self: CircusSocket) -> None:
        if self.name == API_SOCKET and self.family in _INET:
            ensure_port_free(self.family, self.host, self.port)
            self.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        original(self)

    bind_and_listen._sota_reuseport = True  # type: ignore[attr-defined]
    CircusSocket.bind_and_listen = bind_and_listen
    return True


def ensure_port_free(family: int, host: str, port: int) -> None:
    """Raise ``OSError(EADDRINUSE)`` as a plain bind would when another process serves on the
    port: with SO_REUSEPORT a second server of the same user would share it without a word."""
    if not port:
        return
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as circus binds
        probe.bind((host, port))


def worker_socket_args(argv: Sequence[str]) -> tuple[int, int, int] | None:
    """(listening descriptor, worker id, backlog) from a BentoML worker's command line
    (``... --fd 5 --backlog 2048 --worker-id 2 ...``); None in any other process."""
    values = {"--backlog": "2048"}
    args = list(argv)
    for flag in ("--fd", "--worker-id", "--backlog"):
        if flag in args[:-1]:
            values[flag] = args[args.index(flag) + 1]
    try:
        return int(values["--fd"]), int(values["--worker-id"]), int(values["--backlog"])
    except (KeyError, ValueError):
        return None


def take_own_socket(argv: Sequence[str] | None = None) -> bool:
    """In worker 2..N of a service whose socket is SO_REUSEPORT: listen on a socket of its
    own, same address, in place of the inherited descriptor. True if it did."""
    found = worker_socket_args(sys.argv if argv is None else argv)
    if found is None or not supported():
        return False
    fd, worker_id, backlog = found
    if worker_id <= 1:
        return False
    try:
        shared = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    with shared:
        if (shared.family not in _INET
                or not shared.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
                or not shared.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            return False  # not the API socket the serve process prepared (e.g. an engine's)
        address = shared.getsockname()
        own = socket.socket(shared.family, socket.SOCK_STREAM)
        with own:
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            own.bind(address)
            own.listen(backlog)
            own.setblocking(False)
            os.dup2(own.fileno(), fd)  # the descriptor uvicorn is about to listen on
    log.debug("worker %d: own listening socket on %s", worker_id, address[:2])
    return True
