"""Decode + crop speed and pixel parity: Pillow threads vs the device path.

``python -m dev.probes.decode_probe [--device cuda] [--out DIR]``: ImageNet-sized JPEGs (the
benchmark's ``imagenet`` set), 224 px crops from a 256 px resize. Prints a table, writes
``decode-probe-<device>.json``. The device path is :class:`DevicePreprocessor`, the code the
server runs with ``SOTA_SERVE_DECODE=torchvision``; torchvision's batched nvJPEG call is
timed beside it as the reference for what batching decode across requests could add.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.images import image_set
from bench.report import write_json
from sota_serve.device import resolve_device
from sota_serve.image.device_preprocess import DevicePreprocessor
from sota_serve.image.preprocess import Preprocessor
from sota_serve.tta import POLICIES

PRE = Preprocessor(height=224, width=224, resize_shortest_edge=256,
                   tta_edges={"flip": 256, "five_crop": 280, "ten_crop": 280})


def _rate(fn: Callable[[], Any], n: int, sync: Callable[[], None], repeats: int = 3) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def probe(device: str, n: int = 512) -> dict[str, Any]:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    data = [p.read_bytes() for p in image_set("imagenet", Path("bench/.cache/images"))]
    batch = [data[i % len(data)] for i in range(n)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dev = DevicePreprocessor(PRE, device)
    cores = os.cpu_count() or 1
    rows: dict[str, float] = {}
    for threads in sorted({2, cores}):
        with ThreadPoolExecutor(threads) as pool:
            rows[f"pillow, {threads} threads"] = _rate(lambda pool=pool: list(pool.map(PRE, batch)), n, sync)
    for threads in (1, 4):
        with ThreadPoolExecutor(threads) as pool:
            rows[f"device path ({device}), {threads} threads"] = _rate(
                lambda pool=pool: list(pool.map(dev, batch)), n, sync)
    if device == "cuda":
        raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in batch]
        for size in (32, 128):
            def batched(size: int = size) -> None:
                for i in range(0, n, size):
                    images = decode_jpeg(raw[i : i + size], mode=ImageReadMode.RGB, device="cuda")
                    torch.stack([dev.crops(img)[0] for img in images])
            rows[f"torchvision batched decode {size} + crop"] = _rate(batched, n, sync)
    diffs = [np.abs(dev(d, tta).cpu().numpy().astype(np.int16) - PRE(d, tta).astype(np.int16))
             for d in data for tta in POLICIES]
    return {"device": device, "images": n, "img_per_s": rows,
            "parity_vs_pillow": {"max_abs": int(max(d.max() for d in diffs)),
                                 "mean_abs": float(np.mean([d.mean() for d in diffs])),
                                 "share_within_1": float(np.mean([(d <= 1).mean() for d in diffs]))}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dev.probes.decode_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    result = probe(device)
    for name, rate in result["img_per_s"].items():
        print(f"{name:42s} {rate:9,.0f} img/s")
    print("parity vs Pillow:", result["parity_vs_pillow"])
    write_json(result, Path(args.out) / f"decode-probe-{device}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
