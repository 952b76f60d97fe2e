"""The cost of one occlusion explanation (``Classifier.explain``: grid*grid + 1 crops in one
runtime call) against one plain classification of the same photo, offline, on the demo package
and on xresnet50 (224 px, 1000 classes, seeded random weights: speed does not depend on them).
Prints a table; writes JSON.

``python -m bench.explain [--models demo,xresnet50] [--grids 4,8] [--repeats 10] [--device cpu]``

``--concurrency N`` measures a real server instead: ``bentoml serve`` of the model on the CPU,
N explanations of grid ``--grid`` (default 16) posted at once, and the resident memory (RSS) of
the server's processes sampled every 20 ms, from after one warm-up explanation to the last
answer (or ``--window`` seconds, when a slow model on a shared machine would take too long: the
explanations are all in flight from the first seconds, so the memory they take shows early).
Admission and the deadline are raised so that all N are admitted and none is dropped. ``--root DIR`` serves another checkout
(an A/B against an earlier version of the project).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.images import PHOTOS
from bench.models import build_model
from bench.report import machine_line, table, write_json
from bench.run import machine_info
from bench.server import ROOT, Server
from sota_serve.classifier import Classifier
from sota_serve.constants import DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD
from sota_serve.device import resolve_device
from sota_serve.package.card import classifier_card

DEMO = Path("packages/sota-demo")


def xresnet50(cache: Path) -> Path:
    """xresnet50 at 224 px, 1000 classes, ONNX fp32 only, exported once into ``cache``."""
    out = cache / "explain-xresnet50-224"
    if (out / "card.json").exists():
        return out
    import torch

    from sota_serve.building.export import export_package

    torch.manual_seed(0)
    card = classifier_card(name="xresnet50-224-random", labels=[f"class_{i}" for i in range(1000)], size=224,
                           resize_edge=round(224 / DEFAULT_CROP_PCT), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                           architecture="xresnet50", intended_use="Benchmarking only: random weights.")
    check = np.random.default_rng(0).integers(0, 256, (2, 3, 224, 224), dtype=np.uint8)
    export_package(build_model("xresnet50", 1000), card, out, check_inputs=check, formats=("onnx",))
    return out


def median_ms(work: Any, repeats: int) -> float:
    work()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def measure(name: str, path: Path, grids: list[int], repeats: int, device: str) -> list[dict[str, Any]]:
    clf = Classifier.open(path, device=device)
    data = PHOTOS[0].read_bytes()
    plain = median_ms(lambda: clf.classify([data], tta="none"), repeats)
    rows = [{"model": name, "grid": None, "crops": 1, "median_ms": plain, "x_plain": 1.0}]
    for grid in grids:
        ms = median_ms(lambda g=grid: clf.explain(data, grid=g), repeats)
        rows.append({"model": name, "grid": grid, "crops": grid * grid + 1, "median_ms": ms, "x_plain": ms / plain})
    return rows


def _tree_rss(root: int) -> dict[int, int]:
    """RSS in bytes of process ``root`` and each live descendant (the server and its workers,
    which BentoML's supervisor starts in process groups of their own)."""
    parents, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rpartition(")")[2].split()[1])  # state, ppid, ...
            with open(f"/proc/{entry}/status") as f:
                rss[int(entry)] = 1024 * next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError, IndexError):
            continue  # gone meanwhile, or a kernel thread without VmRSS
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return {pid: rss[pid] for pid in tree if pid in rss}


def burst_rss(name: str, path: Path, *, concurrency: int, grid: int, root: Path, window_s: float) -> dict[str, Any]:
    """``concurrency`` explanations posted at once to a real server; the RSS of its processes
    until the last answer or for ``window_s`` seconds, whichever comes first."""
    import httpx

    data = PHOTOS[0].read_bytes()
    env = {"SOTA_SERVE_DEVICE": "cpu", "SOTA_SERVE_MAX_WAIT_S": "3600", "SOTA_SERVE_DEADLINE_S": "3600",
           # BentoML's own request timeout (the service's 120 s) would cut the burst's last answers
           "BENTOML_CONFIG_OPTIONS": "services.sota_serve.traffic.timeout=3600"}

    def explain(_: int) -> int:
        r = httpx.post(f"{server.url}/explain", files={"image": ("photo.jpg", data)}, data={"grid": str(grid)},
                       timeout=3600)
        return r.status_code

    with Server(path, env=env, root=root) as server:
        assert explain(0) == 200, "the warm-up explanation failed"
        time.sleep(1)
        baseline = _tree_rss(server.proc.pid)
        peak: dict[int, int] = dict(baseline)
        peak_total = sum(baseline.values())
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_total
            while not done.is_set():
                now = _tree_rss(server.proc.pid)
                peak_total = max(peak_total, sum(now.values()))
                for pid, rss in now.items():
                    peak[pid] = max(peak.get(pid, 0), rss)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        pool = ThreadPoolExecutor(concurrency)
        jobs = [pool.submit(explain, i) for i in range(concurrency)]
        wait(jobs, timeout=window_s)
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        statuses = [job.result() if job.done() and not job.exception() else "unanswered" for job in jobs]
        if "unanswered" in statuses:  # a graceful stop would first finish them: the server's tree is killed
            for pid in _tree_rss(server.proc.pid):
                os.kill(pid, signal.SIGKILL)
    pool.shutdown(wait=True, cancel_futures=True)  # the server is gone: the rest fail at once
    worker = max(peak, key=lambda pid: peak[pid] - baseline.get(pid, 0))
    mib = 1024 * 1024
    return {"model": name, "grid": grid, "concurrency": concurrency, "root": str(root), "window_s": window_s,
            "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses), key=str)}, "seconds": seconds,
            "baseline_mib": sum(baseline.values()) / mib, "peak_mib": peak_total / mib,
            "growth_mib": (peak_total - sum(baseline.values())) / mib,
            "worker_baseline_mib": baseline.get(worker, 0) / mib, "worker_peak_mib": peak[worker] / mib,
            "worker_growth_mib": (peak[worker] - baseline.get(worker, 0)) / mib}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.explain", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,xresnet50", help="demo (packages/sota-demo), xresnet50")
    parser.add_argument("--grids", default="4,8", help="grid sizes to time (cells per side)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per row (after one warm-up)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--demo", type=Path, default=DEMO, help="the demo package directory")
    parser.add_argument("--cache", type=Path, default=Path("bench/.cache"), help="where xresnet50 is exported")
    parser.add_argument("--out", type=Path, default=Path("bench/results/explain.json"), help="JSON path")
    parser.add_argument("--concurrency", type=int, default=0,
                        help="measure a server's RSS under this many explanations at once (0: the offline timing)")
    parser.add_argument("--grid", type=int, default=16, help="the grid of the --concurrency explanations")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose server --concurrency runs")
    parser.add_argument("--label", default="this checkout", help="--concurrency: the name of the measurement in --out")
    parser.add_argument("--window", type=float, default=3600.0,
                        help="--concurrency: stop sampling (and the server) after this many seconds")
    args = parser.parse_args(argv)
    if args.concurrency:
        return main_burst(args)
    device = resolve_device(args.device)
    grids = [int(g) for g in args.grids.split(",")]
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        if name == "demo" and not (args.demo / "card.json").exists():
            raise SystemExit(f"no demo package at {args.demo}: run `sota-serve demo` first")
        path = args.demo if name == "demo" else xresnet50(args.cache)
        rows += measure(name, path, grids, args.repeats, device)
    machine = machine_info()
    print(machine_line(machine))
    print(table(f"one explanation vs one plain classification of a photo, {device}, median of {args.repeats}",
                ["model", "grid", "model calls", "median ms", "x plain"],
                [[r["model"], r["grid"] or "plain", r["crops"], round(r["median_ms"], 1), round(r["x_plain"], 1)]
                 for r in rows]))
    memory = json.loads(args.out.read_text()).get("memory") if args.out.exists() else None
    write_json({"when": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine,
                "config": {"models": args.models.split(","), "grids": grids, "repeats": args.repeats,
                           "device": device, "image": PHOTOS[0].name},
                "rows": rows, **({"memory": memory} if memory else {})}, args.out)
    return 0


def main_burst(args: argparse.Namespace) -> int:
    """The --concurrency measurement, kept under the ``memory`` key of ``--out`` by ``--label``
    (a before/after pair lives beside the timing rows)."""
    rows = []
    for name in args.models.split(","):
        path = args.demo if name == "demo" else xresnet50(args.cache)
        rows.append(burst_rss(name, path, concurrency=args.concurrency, grid=args.grid, root=args.root.resolve(),
                              window_s=args.window))
    machine = machine_info()
    print(machine_line(machine))
    print(table(f"{args.concurrency} grid-{args.grid} explanations at once on a server (cpu), {args.label}: RSS in MiB",
                ["model", "answers", "seconds", "baseline", "peak", "growth", "worker growth"],
                [[r["model"], r["statuses"], round(r["seconds"], 1), round(r["baseline_mib"]),
                  round(r["peak_mib"]), round(r["growth_mib"]), round(r["worker_growth_mib"])] for r in rows]))
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("memory", {})[args.label] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine,
        "config": {"models": args.models.split(","), "grid": args.grid, "concurrency": args.concurrency,
                   "window_s": args.window, "image": PHOTOS[0].name}, "rows": rows}
    write_json(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
