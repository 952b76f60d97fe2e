"""The cost of one occlusion explanation (``Classifier.explain``: grid*grid + 1 crops in one
runtime call) against one plain classification of the same photo, offline, on the demo package
and on xresnet50 (224 px, 1000 classes, seeded random weights: speed does not depend on them).
Prints a table; writes JSON.

``python -m bench.explain [--models demo,xresnet50] [--grids 4,8] [--repeats 10] [--device cpu]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.images import PHOTOS
from bench.models import build_model
from bench.report import machine_line, table, write_json
from bench.run import machine_info
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.explain", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,xresnet50", help="demo (packages/sota-demo), xresnet50")
    parser.add_argument("--grids", default="4,8", help="grid sizes to time (cells per side)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per row (after one warm-up)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--demo", type=Path, default=DEMO, help="the demo package directory")
    parser.add_argument("--cache", type=Path, default=Path("bench/.cache"), help="where xresnet50 is exported")
    parser.add_argument("--out", type=Path, default=Path("bench/results/explain.json"), help="JSON path")
    args = parser.parse_args(argv)
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
    write_json({"when": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine,
                "config": {"models": args.models.split(","), "grids": grids, "repeats": args.repeats,
                           "device": device, "image": PHOTOS[0].name},
                "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
