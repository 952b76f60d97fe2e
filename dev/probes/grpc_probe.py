"""The Open Inference Protocol over gRPC against REST on one server: ModelInfer, REST ``infer``
(binary tensors, as tritonclient sends them) and ``/classify``, one image per request, the same
closed loop of ``--clients`` for each, in alternating rounds.

``python -m dev.probes.grpc_probe PACKAGE [--clients 32] [--seconds 8] [--rounds 3] [--image FILE]``
prints requests per second and p99 per protocol (medians over the rounds). Both clients encode
their request once and send the same bytes every time (gRPC: one channel, HTTP/2 streams; REST:
one keep-alive connection per client, bench/http1.py), so the client's cost per request is
small beside the server's on the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from bench.http1 import Connection, multipart_request
from bench.server import Server, free_port
from sota_serve.grpc.protos import ModelInferRequest
from sota_serve.oip.messages import encode_bytes
from sota_serve.package.card import ModelCard

Send = Callable[[int], Awaitable[None]]


def requests(name: str, host: str, image: bytes) -> tuple[bytes, bytes, bytes]:
    """(ModelInfer message, REST infer request, /classify request), each encoded once."""
    message = ModelInferRequest(model_name=name, raw_input_contents=[encode_bytes([image])])
    message.inputs.add(name="image", datatype="BYTES", shape=[1])
    raw = encode_bytes([image])
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    body = head + raw
    infer = (f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
             f"Inference-Header-Content-Length: {len(head)}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    return message.SerializeToString(), infer, multipart_request(f"http://{host}/classify", "image", "image", image)


async def closed_loop(send: Send, clients: int, seconds: float) -> tuple[float, float]:
    """(requests per second, p99 in ms) of ``clients`` that each send again once answered."""
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def client(i: int) -> None:
        while time.monotonic() < stop:
            started = time.perf_counter()
            await send(i)
            latencies.append(time.perf_counter() - started)

    began = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    latencies.sort()
    return len(latencies) / (time.monotonic() - began), 1000 * latencies[int(0.99 * (len(latencies) - 1))]


async def measure(server: Server, grpc_address: str, name: str, image: bytes, *, clients: int, seconds: float,
                  rounds: int) -> dict[str, list[tuple[float, float]]]:
    host = server.url.removeprefix("http://")
    message, infer, classify = requests(name, host, image)
    connections: list[Connection | None] = [None] * clients

    def http(request: bytes) -> Send:
        async def send(i: int) -> None:
            connection = connections[i]
            if connection is None or connection.closed:  # the server closes one idle for 5 s
                connection = connections[i] = await Connection.open("127.0.0.1", server.port, 10)
            answer = await connection.send(request, 60)
            if answer.status != 200:
                raise RuntimeError(f"HTTP {answer.status}")
        return send

    async with grpc.aio.insecure_channel(grpc_address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out

        async def model_infer(i: int) -> None:
            await call(message)

        kinds = {"gRPC ModelInfer": model_infer, "REST infer": http(infer), "/classify": http(classify)}
        results: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
        for send in kinds.values():  # warm-up, not reported
            await closed_loop(send, clients, 1)
        for _ in range(rounds):
            for kind, send in kinds.items():
                results[kind].append(await closed_loop(send, clients, seconds))
    for connection in connections:
        if connection is not None:
            connection.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image", type=Path, default=Path("examples/three.png"))
    args = parser.parse_args()
    port = free_port()
    name = ModelCard.load(args.package / "card.json").name
    with Server(args.package, env={"SOTA_SERVE_GRPC_PORT": str(port)}) as server:
        results = asyncio.run(measure(server, f"127.0.0.1:{port}", name, args.image.read_bytes(),
                                      clients=args.clients, seconds=args.seconds, rounds=args.rounds))
    print(f"{name}, {args.clients} clients, {args.rounds} rounds of {args.seconds:g} s")
    for kind, rows in results.items():
        rps, p99 = statistics.median(r for r, _ in rows), statistics.median(p for _, p in rows)
        print(f"{kind:16s} {rps:7.1f} req/s  p99 {p99:6.1f} ms  (rounds: {', '.join(f'{r:.0f}' for r, _ in rows)})")


if __name__ == "__main__":
    main()
