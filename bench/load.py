"""Closed-loop HTTP load from several processes: ``concurrency`` clients in all, each sending
its next request as soon as the last one returns, bounded in time and in count; and open-loop
load (:func:`open_loop`): requests arriving at a rate, whatever the answers.

One Python process cannot load a fast server (an httpx client tops out at a few hundred
requests/s), so the clients are spread over ``processes`` processes, each an asyncio loop in
which every client keeps one connection (bench/http1.py: each request is encoded once, before
the clock starts). The generator's own CPU time is reported beside the result: on a small
machine it competes with the server for the same cores.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.http1 import Connection, endpoint, multipart_request


@dataclass(frozen=True)
class LoadSpec:
    url: str
    files: list[tuple[str, bytes]]
    field: str = "image"
    data: tuple[tuple[str, str], ...] = ()
    clients: int = 1
    seconds: float = 10.0
    max_requests: int = 100_000
    start_at: float = 0.0  # time.time() at which every process starts sending
    timeout_s: float = 120.0
    #: a client told 503 waits Retry-After seconds (at most this many) before its next request;
    #: 0: it sends again at once (the harshest load)
    honor_retry_after_s: float = 0.0


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


async def _clients(spec: LoadSpec, offset: int) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    retry_after_missing = 0
    sent = 0
    host, port = endpoint(spec.url)
    requests = [multipart_request(spec.url, spec.field, name, content, spec.data) for name, content in spec.files]
    delay = spec.start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    stop = time.perf_counter() + spec.seconds

    async def client(i: int) -> None:
        nonlocal sent, retry_after_missing
        n = offset + i
        conn: Connection | None = None
        while time.perf_counter() < stop and sent < spec.max_requests:
            sent += 1
            start = time.perf_counter()
            retry_after = None
            try:
                if conn is None or conn.closed:
                    conn = await Connection.open(host, port, spec.timeout_s)
                status, retry_after = await conn.send(requests[n % len(requests)], spec.timeout_s)
                if status == 503 and retry_after is None:
                    retry_after_missing += 1
            except (TimeoutError, OSError):  # refused, reset, closed early, or no answer in time
                status = 0
                if conn is not None:
                    conn.close()
            latencies.append(time.perf_counter() - start)
            statuses[status] = statuses.get(status, 0) + 1
            n += spec.clients
            if status == 503 and spec.honor_retry_after_s and retry_after and retry_after.isdigit():
                await asyncio.sleep(min(float(retry_after), spec.honor_retry_after_s))
        if conn is not None:
            conn.close()

    began = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(spec.clients)))
    elapsed = time.perf_counter() - began
    return {"latencies": latencies, "statuses": statuses, "elapsed": elapsed,
            "retry_after_missing": retry_after_missing}


def _process_main(spec: LoadSpec, offset: int, queue: Any) -> None:
    result = asyncio.run(_clients(spec, offset))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    queue.put(result)


def summarize(parts: list[dict[str, Any]], concurrency: int, ok_statuses: tuple[int, ...] = (200,)) -> dict[str, Any]:
    latencies = sorted(x for p in parts for x in p["latencies"])
    statuses: dict[int, int] = {}
    for p in parts:
        for k, v in p["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    elapsed = max((p["elapsed"] for p in parts), default=0.0)
    ok = sum(statuses.get(s, 0) for s in ok_statuses)
    shed = statuses.get(503, 0)
    return {
        "concurrency": concurrency, "requests": len(latencies), "ok": ok, "shed_503": shed,
        "errors": len(latencies) - ok - shed,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "retry_after_missing": sum(p.get("retry_after_missing", 0) for p in parts),
        "seconds": elapsed, "throughput": ok / elapsed if elapsed else 0.0,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p95_ms": 1000 * _percentile(latencies, 95), "p99_ms": 1000 * _percentile(latencies, 99),
        "loadgen_processes": len(parts),
        "loadgen_cpu_s": sum(p.get("cpu_s", 0.0) for p in parts),
    }


def default_processes(concurrency: int) -> int:
    """A process per 4 cores, never more than there are clients."""
    return max(1, min(concurrency, (os.cpu_count() or 1) // 4, 16))


def closed_loop(url: str, images: Sequence[Path] | Sequence[tuple[str, bytes]], *, field: str = "image",
                data: dict[str, str] | None = None, concurrency: int, seconds: float,
                max_requests: int = 100_000, processes: int | None = None,
                honor_retry_after_s: float = 0.0) -> dict[str, Any]:
    """Drive ``url`` with ``concurrency`` clients for ``seconds``; one summary dict.

    503s are counted apart from errors (``shed_503``): shedding with Retry-After is the
    documented answer to overload, not a failure.
    """
    files = [(p.name, p.read_bytes()) if isinstance(p, Path) else p for p in images]
    procs = processes or default_processes(concurrency)
    per = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    base = dict(url=url, files=files, field=field, data=tuple((data or {}).items()), seconds=seconds,
                max_requests=max(1, max_requests // procs), honor_retry_after_s=honor_retry_after_s)
    if procs == 1:
        cpu = time.process_time()
        result = asyncio.run(_clients(LoadSpec(clients=concurrency, **base), 0))
        result["cpu_s"] = time.process_time() - cpu
        return summarize([result], concurrency)
    ctx = mp.get_context("spawn")  # no inherited ORT threads or event loops
    queue = ctx.Queue()
    start_at = time.time() + 1.5  # spawned interpreters need a moment to import
    workers = [ctx.Process(target=_process_main, args=(LoadSpec(clients=c, start_at=start_at, **base), offset, queue))
               for offset, c in enumerate(per)]
    for w in workers:
        w.start()
    parts = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    return summarize(parts, concurrency)


async def _arrivals(spec: LoadSpec, rate: float, max_outstanding: int, seed: int) -> dict[str, Any]:
    latencies: list[float] = []
    answered: list[float] = []  # the 200s' latencies alone: a budget is a promise about answers
    statuses: dict[int, int] = {}
    host, port = endpoint(spec.url)
    requests = [multipart_request(spec.url, spec.field, name, content, spec.data) for name, content in spec.files]
    idle: list[Connection] = []
    outstanding: set[asyncio.Task[None]] = set()
    skipped = 0

    async def one(request: bytes, due: float) -> None:
        conn = idle.pop() if idle else None
        try:
            if conn is None or conn.closed:
                conn = await Connection.open(host, port, spec.timeout_s)
            status, _ = await conn.send(request, spec.timeout_s)
        except (TimeoutError, OSError):
            status = 0
            if conn is not None:
                conn.close()
        # from when the request was due, so that a late send is not hidden (coordinated omission)
        latencies.append(time.perf_counter() - due)
        if status == 200:
            answered.append(latencies[-1])
        statuses[status] = statuses.get(status, 0) + 1
        if conn is not None and not conn.closed:
            idle.append(conn)

    rng = random.Random(seed)
    began = time.perf_counter()
    due, n = began, 0
    while due < began + spec.seconds:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        if len(outstanding) >= max_outstanding:
            skipped += 1  # the generator's own bound: counted, never sent
        else:
            task = asyncio.get_running_loop().create_task(one(requests[n % len(requests)], due))
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
        n += 1
        due += rng.expovariate(rate)
    if outstanding:
        await asyncio.wait(outstanding)
    for conn in idle:
        conn.close()
    return {"latencies": latencies, "statuses": statuses, "elapsed": time.perf_counter() - began,
            "skipped": skipped, "retry_after_missing": 0, "answered": answered}


def open_loop(url: str, images: Sequence[Path] | Sequence[tuple[str, bytes]], *, field: str = "image",
              data: dict[str, str] | None = None, rate: float, seconds: float, max_outstanding: int = 4096,
              seed: int = 0) -> dict[str, Any]:
    """Requests arriving at ``rate`` per second (Poisson arrivals) for ``seconds``, each on an
    idle keep-alive connection or a new one, whatever the answers: many independent users. A
    closed loop cannot give that load, since there a slower server is sent fewer requests.
    Latency counts from when a request was due. One summary dict, as :func:`closed_loop`'s,
    with ``rate`` and ``skipped`` (arrivals not sent because ``max_outstanding`` were open)."""
    files = [(p.name, p.read_bytes()) if isinstance(p, Path) else p for p in images]
    spec = LoadSpec(url=url, files=files, field=field, data=tuple((data or {}).items()), seconds=seconds)
    cpu = time.process_time()
    result = asyncio.run(_arrivals(spec, rate, max_outstanding, seed))
    result["cpu_s"] = time.process_time() - cpu
    answered = sorted(result["answered"])
    return {**summarize([result], 0), "rate": rate, "skipped": result["skipped"],
            "p999_ms": 1000 * _percentile(sorted(result["latencies"]), 99.9),
            "answered_p99_ms": 1000 * _percentile(answered, 99), "answered_p999_ms": 1000 * _percentile(answered, 99.9),
            "answered_max_ms": 1000 * answered[-1] if answered else float("nan")}
