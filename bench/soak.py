"""Soak test (not a CI test): thousands of mixed good and bad requests against a real server;
reports the server's memory (RSS of all its processes) before and after, and every status.

    python -m bench.soak --requests 5000 --concurrency 16 [--model PACKAGE_DIR]
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
from bench.run import BenchConfig, package_for
from bench.server import Server


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
    return mix


async def _soak(url: str, mix, n: int, concurrency: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    rng = random.Random(0)
    queue = [rng.choice(mix) for _ in range(n)]
    async with httpx.AsyncClient(timeout=120) as client:
        async def worker() -> None:
            while queue:
                path, files, data, expected = queue.pop()
                try:
                    status = (await client.post(url + path, files=files, data=data)).status_code
                except httpx.HTTPError:
                    status = 0
                key = f"{status}" if status == expected else f"unexpected {status} (wanted {expected})"
                counts[key] = counts.get(key, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak")
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--model", help="package dir (default: the tiny benchmark model)")
    p.add_argument("--out", default="bench/results/soak.json")
    args = p.parse_args(argv)
    model = Path(args.model) if args.model else package_for("tiny", BenchConfig())
    images = bench_images(Path("bench/.cache/images"), (300, 640, 1024))
    mix = _mix(images)
    with Server(model) as server:
        asyncio.run(_soak(server.url, mix, 200, args.concurrency))  # warm-up: caches, arenas, pools
        before = _rss_mb(server.proc.pid)
        start = time.perf_counter()
        counts = asyncio.run(_soak(server.url, mix, args.requests, args.concurrency))
        seconds = time.perf_counter() - start
        after = _rss_mb(server.proc.pid)
        ready = httpx.get(server.url + "/readyz", timeout=10).status_code
        log = server.output()
    # Exceptions that did not end as a deliberate HTTP error (those are BentoMLExceptions).
    errors = [entry[:4000] for entry in log.split("[ERROR]")[1:] if "BentoMLException" not in entry]
    if errors:
        Path(args.out).with_suffix(".errors.txt").write_text("\n---\n".join(errors))
    result = {"requests": args.requests, "concurrency": args.concurrency, "seconds": round(seconds, 1),
              "statuses": counts, "rss_mb_before": round(before, 1), "rss_mb_after": round(after, 1),
              "rss_growth_mb": round(after - before, 1), "ready_after": ready}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ready == 200 and not any(k.startswith("unexpected") for k in counts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
