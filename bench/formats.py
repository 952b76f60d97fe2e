"""The model alone in each torch-exported format: pt2 (torch.export) against TorchScript and
ONNX Runtime, on the demo's network (xresnet18 at 64 px, 10 classes) and xresnet50 (224 px,
1000 classes), batch 1 and 64, fp32. Random weights: speed does not depend on them. Prints a
table; writes JSON.

``python -m bench.formats [--models demo,xresnet50] [--batch-sizes 1,64] [--seconds 3]``
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.measure import model_ceiling
from bench.models import build_model
from bench.report import machine_line, table, write_json
from bench.run import machine_info
from sota_serve import formats
from sota_serve.constants import DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD
from sota_serve.device import resolve_device
from sota_serve.formats.onnx import ONNX
from sota_serve.package.card import classifier_card
from sota_serve.package.loading import open_package

BACKENDS = formats.NAMES  # every registered format: onnx, pt2, torchscript
#: name -> (architecture, input size, classes)
MODELS: dict[str, tuple[str, int, int]] = {"demo": ("xresnet18", 64, 10), "xresnet50": ("xresnet50", 224, 1000)}


def package(name: str, cache: Path) -> Path:
    """A package of ``name``'s network in every format, exported once and kept in ``cache``."""
    arch, size, classes = MODELS[name]
    out = cache / f"formats-{arch}-{size}"
    if (out / "card.json").exists() and set(BACKENDS) <= set(open_package(out).card.artifacts):
        return out
    import torch

    from sota_serve.building.export import export_package

    torch.manual_seed(0)
    card = classifier_card(
        name=f"{arch}-{size}-random", labels=[f"class_{i}" for i in range(classes)], size=size,
        resize_edge=round(size / DEFAULT_CROP_PCT), mean=IMAGENET_MEAN, std=IMAGENET_STD,
        tta_edge=round(size / 0.8), architecture=arch, intended_use="Benchmarking only: random weights.",
    )
    check = np.random.default_rng(0).integers(0, 256, (2, 3, size, size), dtype=np.uint8)
    export_package(build_model(arch, classes), card, out, check_inputs=check, formats=BACKENDS)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.formats", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,xresnet50")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per cell (at least 3 calls)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, default=Path("bench/.cache"))
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/formats-<device>.json)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        pkg = open_package(package(name, args.cache))
        for row in model_ceiling(pkg, BACKENDS, sizes, seconds=args.seconds, device=device):
            rows.append({"model": name, **row})
    onnx = {(r["model"], r["batch_size"]): r["images_per_s"] for r in rows if r["backend"] == ONNX.name}
    machine = machine_info()
    print(machine_line(machine))
    print(table("model alone, fp32: images/s (median call), and against ONNX Runtime",
                ["model", "backend", "batch", "images/s", "median ms", "x onnx"],
                [[r["model"], r["backend"], r["batch_size"], round(r["images_per_s"], 1),
                  round(r["median_s"] * 1000, 2), round(r["images_per_s"] / onnx[r["model"], r["batch_size"]], 2)]
                 for r in rows]))
    write_json({"when": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine,
                "config": {"models": {m: MODELS[m] for m in args.models.split(",")}, "batch_sizes": sizes,
                           "seconds": args.seconds, "device": device},
                "rows": rows}, args.out or Path(f"bench/results/formats-{device}.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
