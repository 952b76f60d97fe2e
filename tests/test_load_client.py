"""The load generator's HTTP/1.1 client (bench/http1.py) against a real socket server that
answers in every way the benchmark meets: keep-alive, chunked, ``Connection: close``, 503 with
Retry-After, garbage, silence. The multipart body it sends is parsed by the server's own
parser (sota_serve/http/multipart.py), so what the benchmark sends is what the service reads."""

from __future__ import annotations

import asyncio
import re

import pytest

from bench.http1 import Answer, Connection, endpoint, multipart_request
from bench.load import closed_loop, open_loop
from bench.server import free_port
from sota_serve.http.multipart import boundary, parts


def _answer(status: int, body: bytes, *, headers: str = "", chunked: bool = False) -> bytes:
    reason = {200: "OK", 503: "Service Unavailable"}.get(status, "X")
    if chunked:
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:3], body[3:]) if c) + b"0\r\n\r\n"
        return f"HTTP/1.1 {status} {reason}\r\nTransfer-Encoding: chunked\r\n{headers}\r\n".encode() + payload
    return f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


class Recorder:
    """A real TCP server; ``behaviour(n)`` says how to answer the n-th request on a connection."""

    def __init__(self, behaviour) -> None:
        self.behaviour, self.bodies, self.connections = behaviour, [], 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
                body = await reader.readexactly(length)
                self.bodies.append((head, body))
                action = self.behaviour(n)
                n += 1
                if action == "silent":
                    await asyncio.sleep(30)
                    return
                writer.write(action)
                await writer.drain()
                if b"Connection: close" in action or action.startswith(b"garbage"):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _serve(behaviour, scenario):
    async def main():
        recorder = Recorder(behaviour)
        server = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return recorder, await scenario(port)
        finally:
            server.close()

    return asyncio.run(main())


def test_the_request_is_a_multipart_form_the_service_parses():
    request = multipart_request("http://127.0.0.1:8/classify?x=1", "image", 'a "b".jpg', b"\xff\xd8 jpeg bytes",
                                [("tta", "five_crop")])
    head, body = request.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /classify?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8\r\n")
    assert int(re.search(rb"Content-Length: (\d+)", head).group(1)) == len(body)
    content_type = re.search(rb"Content-Type: ([^\r\n]+)", head).group(1).decode()
    fields = {p.name: p for p in parts(body, boundary(content_type))}
    assert fields["image"].is_file and fields["image"].content == b"\xff\xd8 jpeg bytes"
    assert b'filename="a %22b%22.jpg"' in body  # a quote cannot end the header early
    assert not fields["tta"].is_file and fields["tta"].text() == "five_crop"
    assert endpoint("http://localhost:9000/x") == ("localhost", 9000)
    with pytest.raises(ValueError, match="plain http"):
        endpoint("https://localhost/x")


def test_keep_alive_chunked_retry_after_and_close():
    answers = [_answer(200, b'{"ok": 1}'), _answer(200, b"chunked!", chunked=True),
               _answer(503, b"busy", headers="Retry-After: 2\r\n"), _answer(200, b"bye", headers="Connection: close\r\n")]

    async def scenario(port):
        conn = await Connection.open("127.0.0.1", port, timeout=5)
        got = [await conn.send(multipart_request(f"http://127.0.0.1:{port}/c", "image", "a.jpg", b"x"), 5)
               for _ in answers]
        await asyncio.sleep(0.05)
        return got, conn.closed

    recorder, (got, closed) = _serve(lambda n: answers[n], scenario)
    assert got == [Answer(200, None), Answer(200, None), Answer(503, "2"), Answer(200, None)]
    assert closed and recorder.connections == 1 and len(recorder.bodies) == 4


@pytest.mark.parametrize("behaviour,error", [("silent", TimeoutError), (b"garbage\r\n\r\n", ConnectionError)])
def test_silence_and_garbage_fail_the_connection(behaviour, error):
    async def scenario(port):
        conn = await Connection.open("127.0.0.1", port, timeout=5)
        with pytest.raises(error):
            await conn.send(multipart_request(f"http://127.0.0.1:{port}/c", "image", "a.jpg", b"x"), 0.3)
        return conn.closed

    _, closed = _serve(lambda n: behaviour, scenario)
    assert closed


def test_closed_loop_reconnects_after_close_and_counts_refusals(tmp_path):
    # Every second answer closes its connection: the clients open new ones and lose nothing.
    def behaviour(n):
        return _answer(200, b"{}", headers="Connection: close\r\n" if n % 2 else "")

    async def scenario(port):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: closed_loop(
            f"http://127.0.0.1:{port}/classify", [("a.jpg", b"x" * 1000)], data={"tta": "none"},
            concurrency=4, seconds=0.5, processes=1))

    recorder, result = _serve(behaviour, scenario)
    assert result["errors"] == 0 and result["ok"] == result["requests"] > 8
    assert recorder.connections >= result["requests"] // 2
    assert result["loadgen_cpu_s"] > 0

    # Nothing listens there: status 0, counted as errors.
    refused = closed_loop(f"http://127.0.0.1:{free_port()}/classify", [("a.jpg", b"x")], concurrency=2,
                          seconds=0.2, max_requests=10, processes=1)
    assert refused["ok"] == 0 and refused["errors"] == refused["requests"] > 0
    assert refused["statuses"] == {"0": refused["requests"]}


def test_open_loop_sends_at_its_rate_whatever_the_answers_take():
    # A server that takes 0.2 s per answer on each connection: a closed loop of 2 clients would
    # send 10 requests a second; the open loop keeps its 100 a second on as many connections as
    # it needs, and counts latency from when each request was due.
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(re.search(rb"Content-Length: (\d+)", head).group(1)))
                await asyncio.sleep(0.2)
                writer.write(_answer(200, b"{}"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(slow, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await asyncio.get_running_loop().run_in_executor(None, lambda: open_loop(
                f"http://127.0.0.1:{port}/classify", [("a.jpg", b"x" * 100)], rate=100, seconds=1.0))

    result = asyncio.run(main())
    assert 60 <= result["requests"] <= 140 and result["ok"] == result["requests"]  # Poisson around 100
    assert result["p50_ms"] >= 200 and result["skipped"] == 0 and result["rate"] == 100
