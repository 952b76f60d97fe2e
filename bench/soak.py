"""Soak test (not a CI test): many mixed good and bad requests against a real server;
samples the server's memory (RSS of all its processes) and the p99 latency over time, and
counts every status. The figure that matters is RSS growth over the second half (after
warm-up, allocator arenas and caches have settled).

    python -m bench.soak --requests 100000 --concurrency 32 [--model PACKAGE_DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import httpx
import psutil

from bench.images import bench_images, png_header
from bench.report import write_json
from bench.run import BenchConfig, package_for
from bench.server import Server

#: how long the soak's client keeps an idle connection: under the server's keep-alive timeout
CLIENT_IDLE_S = 4.0


def _rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def _mix(images: list[Path]) -> list[tuple[str, dict, dict, int]]:
    good = [p.read_bytes() for p in images]
    huge = png_header(60000, 60000)
    mix = []
    for data in good:
        mix += [("/classify", {"image": ("a.jpg", data, "image/jpeg")}, {}, 200)] * 5
        mix += [("/classify", {"image": ("a.jpg", data, "image/jpeg")}, {"tta": "five_crop"}, 200)] * 2
        mix += [("/classify", {"image": ("t.jpg", data[: len(data) // 2], "image/jpeg")}, {}, 400)]
    batch = [("images", ("b.jpg", d, "image/jpeg")) for d in good[:4]]
    mix += [("/classify_batch", batch, {}, 200)] * 3
    mix += [("/classify", {"image": ("x.bin", b"garbage" * 50, "image/jpeg")}, {}, 400)] * 3
    mix += [("/classify", {"image": ("h.png", huge, "image/png")}, {}, 413)] * 2
    mix += [("/classify", {"image": ("w.png", png_header(20000, 1), "image/png")}, {}, 400)]
    mix += [("/classify", {"image": ("a.jpg", good[0], "image/jpeg")}, {"tta": "ten"}, 422)]
    return mix


async def _soak(url: str, mix, n: int, concurrency: int, pid: int | None = None, samples: int = 50,
                failures: list[dict[str, object]] | None = None) -> tuple[dict[str, int], list[dict[str, float]]]:
    """Send ``n`` requests drawn from ``mix``; every n/samples requests, record RSS and p99.
    A request without an HTTP answer is added to ``failures`` with its wall-clock time, to be
    found in a packet capture of the server's port."""
    counts: dict[str, int] = {}
    rng = random.Random(0)
    queue = [rng.choice(mix) for _ in range(n)]
    every = max(1, n // samples)
    window: list[float] = []
    series: list[dict[str, float]] = []
    began = time.perf_counter()
    # Idle connections are dropped after 4 s, under the server's 5 s keep-alive (uvicorn's default
    # under bentoml serve): with httpx's default of 5 s both ends time out together, and a
    # request sent on a connection the server is closing that moment is reset (ReadError): the
    # packet capture of a 100,000-request soak showed the server's FIN on connections idle 5 s
    # and a RST on the one the client had just sent on.
    limits = httpx.Limits(max_connections=concurrency, keepalive_expiry=CLIENT_IDLE_S)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker() -> None:
            while queue:
                path, files, data, expected = queue.pop()
                start = time.perf_counter()
                status: int | str
                try:
                    status = (await client.post(url + path, files=files, data=data)).status_code
                except httpx.HTTPError as e:  # no HTTP answer: name the transport error
                    status = type(e).__name__
                    if failures is not None:
                        failures.append({"at": time.time(), "path": path, "error": f"{status}: {e!r:.300}",
                                         "after_s": round(time.perf_counter() - start, 4)})
                window.append(time.perf_counter() - start)
                key = f"{status}" if status == expected else f"unexpected {status} (wanted {expected})"
                counts[key] = counts.get(key, 0) + 1
                if pid is not None and len(window) >= every:
                    lat = sorted(window)
                    window.clear()
                    series.append({"requests": sum(counts.values()), "seconds": round(time.perf_counter() - began, 1),
                                   "rss_mb": round(_rss_mb(pid), 1), "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1)})

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts, series


def _plot(series: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    xs = [s["requests"] for s in series]
    ax1.plot(xs, [s["rss_mb"] for s in series], marker=".")
    ax1.set(xlabel="requests", ylabel="RSS of all server processes (MB)", title="memory")
    ax2.plot(xs, [s["p99_ms"] for s in series], marker=".")
    ax2.set(xlabel="requests", ylabel="p99 latency (ms)", title="p99 per window")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak")
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--model", help="package dir (default: the tiny benchmark model)")
    p.add_argument("--out", default="bench/results/soak.json")
    args = p.parse_args(argv)
    model = Path(args.model) if args.model else package_for("tiny", BenchConfig())
    images = bench_images(Path("bench/.cache/images"), (300, 640, 1024))
    mix = _mix(images)
    failures: list[dict[str, object]] = []
    with Server(model) as server:
        print(f"serving on {server.url}", flush=True)  # the port to capture
        asyncio.run(_soak(server.url, mix, 200, args.concurrency))  # warm-up: caches, arenas, pools
        before = _rss_mb(server.proc.pid)
        start = time.perf_counter()
        counts, series = asyncio.run(_soak(server.url, mix, args.requests, args.concurrency, server.proc.pid,
                                           failures=failures))
        seconds = time.perf_counter() - start
        after = _rss_mb(server.proc.pid)
        ready = httpx.get(server.url + "/readyz", timeout=10).status_code
        log = server.output()
    # Exceptions that did not end as a deliberate HTTP error (those are BentoMLExceptions).
    errors = [entry[:4000] for entry in log.split("[ERROR]")[1:]]
    if errors:
        Path(args.out).with_suffix(".errors.txt").write_text("\n---\n".join(errors))
    half = series[len(series) // 2]["rss_mb"] if series else before
    result = {"requests": args.requests, "concurrency": args.concurrency, "seconds": round(seconds, 1),
              "statuses": counts, "server_errors_logged": len(errors),
              "rss_mb_before": round(before, 1), "rss_mb_at_half": half, "rss_mb_after": round(after, 1),
              "rss_growth_second_half_pct": round(100 * (after - half) / half, 2),
              "ready_after": ready, "failures": failures, "series": series}
    print(json.dumps({k: v for k, v in result.items() if k != "series"}, indent=2))
    out = write_json(result, Path(args.out))
    if series:
        _plot(series, out.with_suffix(".png"))
    return 0 if ready == 200 and not any(k.startswith("unexpected") for k in counts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
