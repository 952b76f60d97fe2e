"""A listening socket per worker (bento/listen.py): the swap in a worker, the busy-port check,
and real servers with two workers, with and without it."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections import Counter

import psutil
import pytest

from bench.http1 import Connection, multipart_request
from bench.server import Server
from bento.listen import ensure_port_free, take_own_socket, worker_socket_args

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT")


def listener(reuseport: bool, port: int = 0) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(128)
    return s


def inode(pid: int | str, fd: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")  # "socket:[12345]"


def worker_args(fd: int, worker_id: int) -> list[str]:
    return ["service.py", ".", "--fd", str(fd), "--service-name", "x", "--backlog", "128", "--worker-id", str(worker_id)]


def test_worker_command_lines_are_read_and_other_processes_are_left_alone():
    assert worker_socket_args(worker_args(7, 3)) == (7, 3, 128)
    assert worker_socket_args(["bentoml", "serve", "--port", "3000"]) is None
    assert worker_socket_args(["service.py", "--fd", "5", "--worker-id"]) is None  # no value
    assert worker_socket_args(["service.py", "--fd", "five", "--worker-id", "2"]) is None
    assert take_own_socket(["bentoml", "serve"]) is False


def test_a_second_worker_listens_on_its_own_socket_and_both_accept():
    shared = listener(reuseport=True)
    port = shared.getsockname()[1]
    inherited = os.dup(shared.fileno())  # the descriptor a worker inherits
    before = inode(os.getpid(), inherited)
    try:
        assert take_own_socket(worker_args(inherited, 1)) is False  # worker 1 keeps the shared one
        assert take_own_socket(worker_args(inherited, 2)) is True
        assert inode(os.getpid(), inherited) != before
        own = socket.socket(fileno=os.dup(inherited))
        assert own.getsockname() == ("127.0.0.1", port)
        assert own.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        # The kernel hashes new connections over both sockets: each gets some of 64.
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(64)]
        got = Counter()
        for s, name in ((shared, "shared"), (own, "own")):
            s.setblocking(False)
            while True:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    break
                conn.close()
                got[name] += 1
        assert got["shared"] + got["own"] == 64 and got["shared"] > 8 and got["own"] > 8, got
        for c in clients:
            c.close()
        own.close()
    finally:
        os.close(inherited)
        shared.close()


def test_sockets_that_the_serve_process_did_not_prepare_are_left_alone(tmp_path):
    plain = listener(reuseport=False)  # a shared socket without SO_REUSEPORT (e.g. REUSE_PORT=off)
    fd = os.dup(plain.fileno())
    before = inode(os.getpid(), fd)
    unix = socket.socket(socket.AF_UNIX)  # a dependency service's socket
    unix.bind(str(tmp_path / "engine.sock"))
    unix.listen(1)
    try:
        assert take_own_socket(worker_args(fd, 2)) is False
        assert inode(os.getpid(), fd) == before
        assert take_own_socket(worker_args(unix.fileno(), 2)) is False
    finally:
        os.close(fd)
        plain.close()
        unix.close()


def test_a_port_in_use_is_refused_as_a_plain_bind_would():
    for reuseport in (False, True):  # another server, with or without SO_REUSEPORT
        held = listener(reuseport)
        with pytest.raises(OSError) as e:
            ensure_port_free(socket.AF_INET, "127.0.0.1", held.getsockname()[1])
        assert e.value.errno == errno.EADDRINUSE
        port = held.getsockname()[1]
        held.close()
    ensure_port_free(socket.AF_INET, "127.0.0.1", port)  # free again


def workers_of(srv: Server) -> list[psutil.Process]:
    """The server's processes that listen on its port."""
    found = []
    for p in psutil.Process(srv.proc.pid).children(recursive=True):
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == srv.port for c in p.net_connections("tcp")):
            found.append(p)
    return found


def listening_inodes(p: psutil.Process, port: int) -> set[str]:
    return {inode(p.pid, c.fd) for c in p.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def sockets_once_all_started(workers: list[psutil.Process], port: int, timeout: float = 120) -> list[set[str]]:
    """Each worker's listening sockets, once every worker has imported the service.

    The server is ready as soon as one worker answers /readyz; another may still be importing,
    and so still hold the shared socket it inherited, until it swaps in its own."""
    deadline = time.monotonic() + timeout
    while True:
        found = [listening_inodes(w, port) for w in workers]
        if len({frozenset(s) for s in found}) == len(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


async def open_and_ask(srv: Server, n: int, request: bytes, workers: list[psutil.Process]) -> tuple[list[int], Counter]:
    """Open ``n`` connections at once, one request on each: the statuses, and how many of
    the connections each worker holds."""
    conns = await asyncio.gather(*[Connection.open("127.0.0.1", srv.port, 30) for _ in range(n)])
    try:
        answers = await asyncio.gather(*[c.send(request, 60) for c in conns])
        held = Counter({w.pid: sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == srv.port
                                   for c in w.net_connections("tcp")) for w in workers})
    finally:
        for c in conns:
            c.close()
    return [a.status for a in answers], held


@pytest.mark.slow
def test_two_workers_each_listen_and_share_a_burst_of_connections(tiny_package, photos, tmp_path):
    request = multipart_request("http://127.0.0.1/classify", "image", photos[0].name, photos[0].read_bytes())
    env = {"SOTA_SERVE_DEVICE": "cpu", "SOTA_SERVE_WORKERS": "2"}
    with Server(tiny_package, home=tmp_path / "bentoml", env=env) as srv:
        workers = workers_of(srv)
        assert len(workers) == 2
        a, b = sockets_once_all_started(workers, srv.port)
        assert len(a) == len(b) == 1 and a != b  # a socket each
        statuses, held = asyncio.run(open_and_ask(srv, 32, request, workers))
        assert statuses == [200] * 32
        # Hashed over two sockets, each worker holds some of the 32 (fewer than 4: p < 1e-5).
        assert sum(held.values()) == 32 and min(held.values()) >= 4, held

    with Server(tiny_package, home=tmp_path / "bentoml", env={**env, "SOTA_SERVE_REUSE_PORT": "off"}) as srv:
        workers = workers_of(srv)
        assert len(workers) == 2
        # Until both workers accept (so both have imported the service), ask again.
        deadline = time.monotonic() + 120
        while True:
            statuses, held = asyncio.run(open_and_ask(srv, 8, request, workers))
            assert statuses == [200] * 8 and sum(held.values()) == 8
            if min(held.values()) > 0 or time.monotonic() > deadline:
                break
        assert min(held.values()) > 0, held
        assert listening_inodes(workers[0], srv.port) == listening_inodes(workers[1], srv.port)  # BentoML's one socket
