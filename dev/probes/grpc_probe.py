"""The Open Inference Protocol over gRPC against REST on one server: ModelInfer, REST ``infer``
(binary tensors, as tritonclient sends them) and ``/classify``, one image per request, the same
closed loop of ``--clients`` for each, in alternating rounds.

``python -m dev.probes.grpc_probe PACKAGE [--clients 32] [--seconds 8] [--rounds 3] [--image FILE]
[--mlserver [VENV] [--mlserver-workers 0,2]] [--json FILE]`` prints requests per second and p99 per protocol (medians over
the rounds). Both clients encode their request once and send the same bytes every time (gRPC:
one channel, HTTP/2 streams; REST: one keep-alive connection per client, bench/http1.py), so
the client's cost per request is small beside the server's on the same cores.

``--mlserver`` adds MLServer (bench/mlserver_peer.py, from the venv that ``make mlserver-peer``
makes) on the same package as a peer in the same rounds: its gRPC ModelInfer (the same message
as sota-serve's) and its REST ``infer``. MLServer's REST has no binary tensors, so its request
is JSON with the image in base64 (``content_type`` ``base64``), and sota-serve answers the same
JSON request in a round of its own (``REST infer (JSON)``), for a like-for-like REST figure.
Each ``--mlserver-workers`` figure is a peer of its own (MLServer's ``parallel_workers``: 0 runs
the model in its main process with all the cores as intra-op threads, N > 0 in N worker
processes that share them): which one serves more depends on the load (bench/mlserver_peer.py).
Before measuring, one image goes to every server over gRPC and REST JSON: their top-1 labels
must match and their probabilities agree within 1e-4. Each server runs alone while measured:
on a 2-core machine the other's idle threads and timers would take CPU from the one measured,
so it is stopped (SIGSTOP, its warm state kept, as bench/ab.py does) and resumed (SIGCONT) for
its own rounds; every round opens fresh REST connections, since a server closes an idle
keep-alive connection once it runs again.

``--json FILE`` adds this run (model, clients, every round, the medians, the 1-minute load
average before and after, the machine, MLServer's version and settings) to FILE, replacing an
earlier run of the same model and clients.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np

from bench.http1 import Connection, multipart_request
from bench.run import cpu_info
from bench.server import MLSERVER_VENV, Server, free_port
from sota_serve.grpc.protos import ModelInferRequest, ModelInferResponse
from sota_serve.oip.messages import encode_bytes
from sota_serve.package.card import ModelCard

Send = Callable[[int], Awaitable[None]]
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
#: how far the two servers' probabilities of one image may differ (the same model file and
#: preprocessing: only the order of float operations in a batch of another size)
TOLERANCE = 1e-4


def model_infer(name: str, image: bytes) -> bytes:
    """A ModelInfer message with one image, as raw contents (as tritonclient sends BYTES)."""
    message = ModelInferRequest(model_name=name, raw_input_contents=[encode_bytes([image])])
    message.inputs.add(name="image", datatype="BYTES", shape=[1])
    return message.SerializeToString()


def json_infer(image: bytes) -> dict[str, Any]:
    """A REST ``infer`` body in JSON, the image in base64: what MLServer's REST takes."""
    return {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                        "parameters": {"content_type": "base64"}, "data": [base64.b64encode(image).decode()]}]}


def post(host: str, path: str, body: bytes, content_type: str, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def requests(name: str, host: str, image: bytes) -> tuple[bytes, bytes, bytes]:
    """(ModelInfer message, REST infer request, /classify request), each encoded once."""
    raw = encode_bytes([image])
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    infer = post(host, f"/v2/models/{name}/infer", head + raw, "application/octet-stream",
                 f"Inference-Header-Content-Length: {len(head)}\r\n")
    return model_infer(name, image), infer, multipart_request(f"http://{host}/classify", "image", "image", image)


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


class Kind:
    """One protocol of one server: how a client sends a request, and the server it goes to."""

    def __init__(self, server: Server, clients: int, *, request: bytes | None = None,
                 call: grpc.aio.UnaryUnaryMultiCallable | None = None, message: bytes | None = None) -> None:
        self.server, self.request, self.call, self.message = server, request, call, message
        self.connections: list[Connection | None] = [None] * clients

    def fresh(self) -> None:
        """Closes the REST connections, so the next round opens its own."""
        for i, connection in enumerate(self.connections):
            if connection is not None:
                connection.close()
            self.connections[i] = None

    async def send(self, i: int) -> None:
        if self.call is not None:
            await self.call(self.message)
            return
        connection = self.connections[i]
        if connection is None or connection.closed:  # the server closes one idle for 5 s
            connection = self.connections[i] = await Connection.open("127.0.0.1", self.server.port, 10)
        answer = await connection.send(self.request, 60)
        if answer.status != 200:
            raise RuntimeError(f"HTTP {answer.status}")


async def measure(kinds: dict[str, Kind], servers: list[Server], *, clients: int, seconds: float,
                  rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Warm-up (not reported), then ``rounds`` rounds of every kind, each with its server alone."""

    async def run(kind: Kind, how_long: float) -> tuple[float, float]:
        if len(servers) > 1:
            for server in servers:
                if server is not kind.server:
                    server.pause()
            kind.server.resume()
            await asyncio.sleep(0.5)  # the resumed server's timers, due while it was stopped, run first
        kind.fresh()
        return await closed_loop(kind.send, clients, how_long)

    results: dict[str, list[tuple[float, float]]] = {name: [] for name in kinds}
    for kind in kinds.values():
        await run(kind, 1)
    for _ in range(rounds):
        for name, kind in kinds.items():
            results[name].append(await run(kind, seconds))
    for kind in kinds.values():
        kind.fresh()
    for server in servers:
        server.resume()
    return results


def grpc_probabilities(address: str, message: bytes) -> np.ndarray:
    with grpc.insecure_channel(address) as channel:
        answer = ModelInferResponse.FromString(channel.unary_unary(MODEL_INFER)(message, timeout=60))
    (output,) = answer.outputs
    assert output.name == "probabilities" and output.datatype == "FP32", output
    return np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(tuple(output.shape))


def rest_probabilities(server: Server, name: str, body: dict[str, Any]) -> np.ndarray:
    answer = httpx.post(f"{server.url}/v2/models/{name}/infer", json=body, timeout=60)
    answer.raise_for_status()
    (output,) = [o for o in answer.json()["outputs"] if o["name"] == "probabilities"]
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


def check_equal(card: ModelCard, image: bytes, ours: Server, ours_grpc: str, peers: dict[str, Server]) -> dict[str, Any]:
    """One image to every server over gRPC and REST JSON: asserts the same top-1 label and
    probabilities within TOLERANCE; returns what it compared."""
    message = model_infer(card.name, image)
    answers = {"sota-serve gRPC": grpc_probabilities(ours_grpc, message),
               "sota-serve REST JSON": rest_probabilities(ours, card.name, json_infer(image))}
    for label, peer in peers.items():
        answers[f"{label} gRPC"] = grpc_probabilities(f"127.0.0.1:{peer.grpc_port}", message)
        answers[f"{label} REST JSON"] = rest_probabilities(peer, card.name, json_infer(image))
    reference = answers["sota-serve gRPC"]
    top1 = {who: card.labels[int(np.argmax(p))] for who, p in answers.items()}
    differences = {who: float(np.max(np.abs(p - reference))) for who, p in answers.items()}
    for who, probabilities in answers.items():
        assert probabilities.shape == (1, card.num_classes), f"{who}: shape {probabilities.shape}"
        assert top1[who] == top1["sota-serve gRPC"], f"top-1 differs: {top1}"
        assert differences[who] <= TOLERANCE, f"probabilities differ by more than {TOLERANCE}: {differences}"
    return {"top1": top1["sota-serve gRPC"], "max_abs_difference": max(differences.values())}


def mlserver_version(venv: Path) -> str:
    return subprocess.run([str(venv / "bin" / "python"), "-c", "import mlserver; print(mlserver.__version__)"],
                          capture_output=True, text=True, check=True).stdout.strip()


def portable(settings: dict[str, dict]) -> dict[str, dict]:
    """A peer's settings without what belongs to one run on one machine (its ports and folders)."""
    local = {"http_port", "grpc_port", "metrics_port", "metrics_dir", "model_repository_root", "uri"}

    def keep(value: Any) -> Any:
        return {k: keep(v) for k, v in value.items() if k not in local} if isinstance(value, dict) else value

    return keep(settings)


def load_1m() -> float:
    return os.getloadavg()[0]


def record(path: Path, run: dict[str, Any]) -> None:
    """Adds ``run`` to the runs in ``path``, in place of one of the same model and clients."""
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    runs = [r for r in runs if (r["model"], r["clients"]) != (run["model"], run["clients"])] + [run]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    print(f"wrote {path}")


async def probe(args: argparse.Namespace, card: ModelCard, image: bytes, ours: Server, grpc_port: int,
                peers: dict[str, Server]) -> dict[str, list[tuple[float, float]]]:
    host = ours.url.removeprefix("http://")
    message, infer, classify = requests(card.name, host, image)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")]
    kinds = {"gRPC ModelInfer": Kind(ours, args.clients, call=channels[0].unary_unary(MODEL_INFER), message=message),
             "REST infer": Kind(ours, args.clients, request=infer),
             "/classify": Kind(ours, args.clients, request=classify)}
    if peers:
        body = json.dumps(json_infer(image)).encode()
        kinds["REST infer (JSON)"] = Kind(ours, args.clients, request=post(
            host, f"/v2/models/{card.name}/infer", body, "application/json"))
    for label, peer in peers.items():
        channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{peer.grpc_port}"))
        kinds[f"{label} gRPC ModelInfer"] = Kind(peer, args.clients, call=channels[-1].unary_unary(MODEL_INFER),
                                                 message=message)
        kinds[f"{label} REST infer (JSON)"] = Kind(peer, args.clients, request=post(
            peer.url.removeprefix("http://"), f"/v2/models/{card.name}/infer", body, "application/json"))
    try:
        return await measure(kinds, [ours, *peers.values()], clients=args.clients, seconds=args.seconds,
                             rounds=args.rounds)
    finally:
        for channel in channels:
            await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image", type=Path, default=Path("examples/three.png"))
    parser.add_argument("--mlserver", type=Path, nargs="?", const=MLSERVER_VENV, metavar="VENV",
                        help="add the MLServer peer from this venv (default: bench/.cache/mlserver-venv)")
    parser.add_argument("--mlserver-workers", default="2",
                        help="MLServer's parallel_workers, a peer per figure (comma-separated; 0: in its main process)")
    parser.add_argument("--json", type=Path, help="add this run's figures to this file")
    args = parser.parse_args()
    port = free_port()
    card = ModelCard.load(args.package / "card.json")
    image = args.image.read_bytes()
    load_before = load_1m()
    checked: dict[str, Any] = {}
    cores = os.cpu_count() or 1
    peers = {}
    for workers in (int(w) for w in args.mlserver_workers.split(",")) if args.mlserver else ():
        # the cores shared among the model calls at once, as sota-serve shares them
        threads = max(1, cores // max(1, workers))
        peers[f"MLServer ({workers} workers)"] = Server.mlserver(args.package, venv=args.mlserver,
                                                                 workers=workers, threads=threads)
    try:
        with Server(args.package, env={"SOTA_SERVE_GRPC_PORT": str(port)}) as server:
            for peer in peers.values():
                peer.wait_ready()
            if peers:
                checked = check_equal(card, image, server, f"127.0.0.1:{port}", peers)
                print(f"same answers: top-1 {checked['top1']!r}, probabilities within "
                      f"{checked['max_abs_difference']:.1e}")
            results = asyncio.run(probe(args, card, image, server, port, peers))
    finally:
        for peer in peers.values():
            peer.stop()
    load_after = load_1m()
    print(f"{card.name}, {args.clients} clients, {args.rounds} rounds of {args.seconds:g} s, "
          f"1-minute load average {load_before:.2f} before, {load_after:.2f} after")
    medians = {}
    for kind, rows in results.items():
        rps, p99 = statistics.median(r for r, _ in rows), statistics.median(p for _, p in rows)
        medians[kind] = {"req_per_s": rps, "p99_ms": p99}
        print(f"{kind:40s} {rps:7.1f} req/s  p99 {p99:7.1f} ms  (rounds: {', '.join(f'{r:.0f}' for r, _ in rows)})")
    if args.json:
        run = {"model": card.name, "package": args.package.name, "clients": args.clients, "seconds": args.seconds,
               "rounds": args.rounds, "image": args.image.name,
               "date": datetime.now(UTC).isoformat(timespec="seconds"),
               "command": " ".join(["python -m dev.probes.grpc_probe", *sys.argv[1:]]),
               "load_1m_before": load_before, "load_1m_after": load_after,
               "machine": {"cpus": os.cpu_count(), **cpu_info()},
               "medians": medians, "rounds_req_per_s_p99_ms": results}
        if peers:
            run["same_answers"] = checked
            run["mlserver"] = {"version": mlserver_version(args.mlserver),
                               "peers": {label: portable(peer.settings) for label, peer in peers.items()}}
        record(args.json, run)


if __name__ == "__main__":
    main()
