"""What a numpy call costs an event loop that shares the GIL with busy threads.

``python -m dev.probes.gil_probe [--out DIR]``: each operation that the service's event loop did
(or could do) per request or per batch, timed alone and while another thread runs Python.
A call that releases the GIL (numpy's sorts, large copies and element-wise operations) must
win it back before the loop goes on, behind whichever thread took it, up to the interpreter's
switch interval (5 ms). Prints a table, writes ``gil-probe.json``. The other thread here
never gives the GIL up by itself, the worst case; the service's decode and model threads give
it up often, so real waits are shorter.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import write_json
from sota_serve.predictions import rank_rows


def _operations() -> dict[str, Callable[[], Any]]:
    rng = np.random.default_rng(0)
    p10 = rng.random(10).astype(np.float32)
    p1000 = rng.random(1000).astype(np.float32)
    batch1000 = rng.random((32, 1000)).astype(np.float32)
    crops64 = [np.zeros((1, 3, 64, 64), np.uint8) for _ in range(16)]
    crops224 = [np.zeros((1, 3, 224, 224), np.uint8) for _ in range(16)]
    return {
        "stable argsort, 10 classes (a request's top-k, before)": lambda: np.argsort(-p10, kind="stable")[:5],
        "stable argsort, 1000 classes (a request's top-k, before)": lambda: np.argsort(-p1000, kind="stable")[:5],
        "rank_rows, 32 x 1000 (a batch's ranking, now on the model thread)": lambda: rank_rows(batch1000),
        "argmax, 1000 classes": lambda: p1000.argmax(),
        "negate, 1000 floats": lambda: -p1000,
        "join 16 crops of 64 px (a batch, before)": lambda: np.concatenate(crops64),
        "join 16 crops of 224 px (a batch, before)": lambda: np.concatenate(crops224),
        "tolist, 10 floats": lambda: p10.tolist(),
    }


def _mean_us(fn: Callable[[], Any], repeats: int) -> float:
    """The mean, not the median: most calls win the GIL back at once, and the few that wait a
    whole switch interval are what the loop pays for."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def probe(repeats: int = 200) -> list[dict[str, Any]]:
    ops = _operations()
    alone = {name: _mean_us(fn, repeats) for name, fn in ops.items()}
    stop = threading.Event()

    def spin() -> None:  # pure Python: holds the GIL until the interpreter takes it away
        n = 0
        while not stop.is_set():
            n += 1

    rows = []
    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        for name, fn in ops.items():
            busy = _mean_us(fn, max(10, repeats // 4))
            rows.append({"operation": name, "alone_us": alone[name], "with_busy_thread_us": busy,
                         "ratio": busy / alone[name] if alone[name] else float("nan")})
    finally:
        stop.set()
        spinner.join()
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| operation | alone, us | beside a busy thread, us | ratio |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['operation']} | {r['alone_us']:.1f} | {r['with_busy_thread_us']:.1f} | {r['ratio']:.0f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    rows = probe(args.repeats)
    print(render(rows))
    write_json({"switch_interval_s": sys.getswitchinterval(), "rows": rows}, args.out / "gil-probe.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
