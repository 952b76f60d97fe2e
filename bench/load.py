"""Closed-loop HTTP load: ``concurrency`` clients, each sending its next request as soon as
the last one returns, bounded in time and in count."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


async def _run(url: str, field: str, files: Sequence[tuple[str, bytes]], data: dict[str, str],
               concurrency: int, seconds: float, max_requests: int) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = itertools.count()
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        async def worker() -> None:
            while time.perf_counter() < stop:
                n = next(counter)
                if n >= max_requests:
                    return
                name, content = files[n % len(files)]
                start = time.perf_counter()
                try:
                    response = await client.post(url, files={field: (name, content, "image/jpeg")}, data=data)
                    status = response.status_code
                except httpx.HTTPError:
                    status = 0
                latencies.append(time.perf_counter() - start)
                statuses[status] = statuses.get(status, 0) + 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    ok = statuses.get(200, 0)
    lat = sorted(latencies)
    return {
        "concurrency": concurrency, "requests": len(latencies), "ok": ok,
        "errors": len(latencies) - ok, "statuses": {str(k): v for k, v in statuses.items()},
        "seconds": elapsed, "throughput": ok / elapsed if elapsed else 0.0,
        "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
        "p95_ms": 1000 * _percentile(lat, 95), "p99_ms": 1000 * _percentile(lat, 99),
    }


def closed_loop(url: str, images: Sequence[Path], *, field: str = "image", data: dict[str, str] | None = None,
                concurrency: int, seconds: float, max_requests: int = 100_000) -> dict[str, Any]:
    files = [(p.name, p.read_bytes()) for p in images]
    return asyncio.run(_run(url, field, files, data or {}, concurrency, seconds, max_requests))
