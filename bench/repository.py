"""Several models in one server: the memory each added model costs, requests per second with
traffic spread over three models against one model alone, and latency while a version is
swapped in.

``python -m bench.repository --demo packages/sota-demo [--big PACKAGE] [--clients 32] [--seconds 10]
[--rounds 3] [--out bench/results/repository.json]``

The repository is made in a temporary folder: three demo-sized models (``demo-a``, ``-b``, ``-c``:
the demo package under three names, its files hard-linked, not copied) and, with ``--big``, that
package as ``big`` (xresnet50 in BENCHMARKS.md). Three servers run one after another:

1. ``demo-a`` alone, then the three demos, then all four: each worker's resident memory once
   ready, and what each model added while it loaded (``sota_serve_model_rss_bytes``);
2. on the four-model server, in alternating rounds, ``--clients`` closed-loop clients on
   ``demo-a`` alone, then the same clients spread over the three demos;
3. with ``SOTA_SERVE_MODEL_CONTROL=explicit``, ``--clients`` clients on ``demo-a`` for
   ``--seconds``, a new version of it put in the folder and loaded, then ``--seconds`` more:
   p50 and p99 before, during (from the load request to its answer) and after the swap.

Prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.http1 import Connection, endpoint, multipart_request
from bench.images import PHOTOS
from bench.server import Server

DEMOS = ("demo-a", "demo-b", "demo-c")


def linked_version(package: Path, into: Path, *, name: str, version: str) -> Path:
    """``package`` at ``into`` under another name and version: its files hard-linked (a symbolic
    link would point outside the package, which opening it refuses), its card rewritten (the
    card holds the hashes, not itself, so they still verify)."""
    into.mkdir(parents=True)
    for item in package.iterdir():
        if item.name != "card.json" and item.is_file():
            try:
                os.link(item, into / item.name)
            except OSError:  # another file system
                shutil.copy2(item, into / item.name)
    card = json.loads((package / "card.json").read_text())
    card.update(name=name, version=version)
    (into / "card.json").write_text(json.dumps(card))
    return into


def worker_rss(server: Server) -> int:
    """The largest resident memory among the server's processes: its worker's."""
    root = psutil.Process(server.proc.pid)
    return max(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def model_rss(url: str) -> dict[str, int]:
    """``sota_serve_model_rss_bytes`` by model, of the models in service."""
    found: dict[str, int] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("sota_serve_model_rss_bytes{"):
            labels, value = line.rsplit(" ", 1)
            name = labels.split('model="', 1)[1].split('"', 1)[0]
            if float(value) > 0:
                found[name] = int(float(value))
    return found


def memory(root: Path, home: Path) -> list[dict[str, Any]]:
    rows = []
    sources = [("demo-a alone", str(root / "demo-a" / "1")),
               ("three demos", ",".join(str(root / d / "1") for d in DEMOS))]
    if (root / "big").exists():
        sources.append(("three demos + big", ",".join([*(str(root / d / "1") for d in DEMOS), str(root / "big")])))
    for label, source in sources:
        with Server(source, home=home, env={"SOTA_SERVE_DEVICE": "cpu"}) as server:
            rows.append({"models": label, "worker_rss_mib": worker_rss(server) / 2**20,
                         "added_mib": {k: v / 2**20 for k, v in model_rss(server.url).items()}})
    return rows


def spread(url: str, clients: int, seconds: float, rounds: int) -> dict[str, Any]:
    """req/s of ``clients`` on demo-a alone against the same clients over the three demos (client
    i on demo i mod 3), in alternating rounds, from the same load generator; medians."""
    image = PHOTOS[0].read_bytes()
    alone, over = [], []
    for _ in range(rounds):
        for paths, results in (([f"{url}/models/demo-a/classify"], alone),
                               ([f"{url}/models/{name}/classify" for name in DEMOS], over)):
            samples = asyncio.run(_for(seconds, paths, image, clients))
            times = sorted(s for _, s, _ in samples)
            results.append({"throughput": sum(1 for *_, status in samples if status == 200) / seconds,
                            "not_200": sum(1 for *_, status in samples if status != 200),
                            "p99_ms": 1000 * times[round(0.99 * (len(times) - 1))]})
    return {"alone_rps": statistics.median(r["throughput"] for r in alone),
            "alone_p99_ms": statistics.median(r["p99_ms"] for r in alone),
            "spread_rps": statistics.median(r["throughput"] for r in over),
            "spread_p99_ms": statistics.median(r["p99_ms"] for r in over),
            "errors": sum(r["not_200"] for r in alone + over), "rounds": rounds, "image": PHOTOS[0].name}


async def _for(seconds: float, urls: list[str], image: bytes, clients: int) -> list[tuple[float, float, int]]:
    stop = asyncio.Event()
    load = asyncio.ensure_future(_timed_clients(urls, image, clients, stop))
    await asyncio.sleep(seconds)
    stop.set()
    return await load


async def _timed_clients(urls: list[str], image: bytes, clients: int,
                         stop: asyncio.Event) -> list[tuple[float, float, int]]:
    """(sent at, seconds, status) of every request of ``clients`` closed-loop clients until
    ``stop``, client i on ``urls[i % len(urls)]``, each on its own connection."""
    host, port = endpoint(urls[0])
    out: list[tuple[float, float, int]] = []

    async def client(i: int) -> None:
        request = multipart_request(urls[i % len(urls)], "image", "photo.jpg", image)
        conn = await Connection.open(host, port, 60)
        while not stop.is_set():
            started = time.perf_counter()
            try:
                status, _ = await conn.send(request, 60)
            except (TimeoutError, OSError):
                status = 0
                conn = await Connection.open(host, port, 60)
            out.append((started, time.perf_counter() - started, status))
        conn.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return out


def _phase(samples: list[tuple[float, float, int]], start: float, end: float) -> dict[str, Any]:
    times = sorted(s for t, s, _ in samples if start <= t < end)
    bad = sum(1 for t, _, status in samples if start <= t < end and status != 200)
    if not times:
        return {"requests": 0}
    return {"requests": len(times), "not_200": bad, "p50_ms": 1000 * statistics.median(times),
            "p99_ms": 1000 * times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]}


def swap(root: Path, home: Path, clients: int, seconds: float) -> dict[str, Any]:
    """Latency on demo-a before, during and after a new version of it is loaded and swapped in."""
    with Server(root, home=home, env={"SOTA_SERVE_DEVICE": "cpu", "SOTA_SERVE_MODEL_CONTROL": "explicit",
                                      "SOTA_SERVE_DEFAULT_MODEL": "demo-a"}) as server:
        url = f"{server.url}/models/demo-a/classify"
        marks: dict[str, float] = {}

        async def main() -> list[tuple[float, float, int]]:
            stop = asyncio.Event()
            load = asyncio.ensure_future(_timed_clients([url], PHOTOS[0].read_bytes(), clients, stop))
            await asyncio.sleep(seconds)
            linked_version(root / "demo-a" / "1", root / "demo-a" / "2", name="demo-a", version="2")
            marks["load"] = time.perf_counter()
            async with httpx.AsyncClient(timeout=600) as client:
                answer = await client.post(f"{server.url}/v2/repository/models/demo-a/load")
            marks["loaded"] = time.perf_counter()
            if answer.status_code != 200:
                raise SystemExit(f"the load failed: {answer.status_code} {answer.text}")
            await asyncio.sleep(seconds)
            marks["end"] = time.perf_counter()
            stop.set()
            return await load

        samples = asyncio.run(main())
        served = httpx.get(f"{server.url}/v2/models/demo-a", timeout=10).json()["versions"]
    first = min(t for t, _, _ in samples)
    return {"before": _phase(samples, first, marks["load"]),
            "during": _phase(samples, marks["load"], marks["loaded"]),
            "after": _phase(samples, marks["loaded"], marks["end"]),
            "load_s": marks["loaded"] - marks["load"], "served_version": served[0], "clients": clients}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", required=True, help="a demo-sized package (packages/sota-demo)")
    parser.add_argument("--big", help="a large package served beside them (xresnet50)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/repository.json")
    args = parser.parse_args()
    cache = Path(__file__).parent / ".cache"  # beside the packages, for hard links on one file system
    cache.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        root, home = Path(tmp) / "models", Path(tmp) / "home"
        for name in DEMOS:
            linked_version(Path(args.demo), root / name / "1", name=name, version="1")
        if args.big:
            linked_version(Path(args.big), root / "big", name="big", version="1")
        print("memory per model ...", flush=True)
        rss = memory(root, home)
        print("req/s, one model against three ...", flush=True)
        with Server(root, home=home, env={"SOTA_SERVE_DEVICE": "cpu"}) as server:
            throughput = spread(server.url, args.clients, args.seconds, args.rounds)
        print("a version swapped in under load ...", flush=True)
        swapped = swap(root, home, args.clients, args.seconds)
    result = {"cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count(),
              "date": time.strftime("%Y-%m-%d"), "memory": rss, "throughput": throughput, "swap": swapped,
              "command": "python -m bench.repository " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\nworker RSS (MiB) and what each model added while it loaded:")
    for row in rss:
        added = ", ".join(f"{k} {v:.0f}" for k, v in row["added_mib"].items())
        print(f"  {row['models']:<20} {row['worker_rss_mib']:7.0f}   {added}")
    print(f"\n{args.clients} clients, demo-a alone: {throughput['alone_rps']:.0f} req/s (p99"
          f" {throughput['alone_p99_ms']:.0f} ms); spread over three demos: {throughput['spread_rps']:.0f} req/s"
          f" (p99 {throughput['spread_p99_ms']:.0f} ms); errors {throughput['errors']}")
    print(f"\nswap of demo-a (load took {swapped['load_s']:.1f} s, now version {swapped['served_version']}):")
    for phase in ("before", "during", "after"):
        p = swapped[phase]
        print(f"  {phase:<7} {p.get('requests', 0):6d} requests, not 200: {p.get('not_200', 0)},"
              f" p50 {p.get('p50_ms', float('nan')):.0f} ms, p99 {p.get('p99_ms', float('nan')):.0f} ms")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
