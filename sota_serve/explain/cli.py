"""``sota-serve explain``: the occlusion map of one image, printed, and drawn over the image
with ``--out`` (sota_serve/explain/occlusion.py, sota_serve/explain/heatmap.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sota_serve import formats
from sota_serve.errors import SotaServeError
from sota_serve.explain.occlusion import DEFAULT_GRID, MAX_GRID, MIN_GRID, Explanation


def register(sub: Any) -> None:
    """Add the command to the CLI's subparsers."""
    p = sub.add_parser("explain", help="which parts of an image a package's score depends on (occlusion map)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("package", help="package directory, .onnx, .pt2 or .pt file, or BentoML model-store tag"
                                   " (name[:version], e.g. sota-demo:latest)")
    p.add_argument("image", metavar="IMAGE", help="image file (JPEG, PNG, WebP, GIF, BMP, TIFF)")
    p.add_argument("--label", default=argparse.SUPPRESS,
                   help="the label to explain (default: the top-1 label of the plain crop)")
    p.add_argument("--grid", type=int, default=DEFAULT_GRID,
                   help=f"cells per side of the occlusion grid ({MIN_GRID}..{MAX_GRID}); grid*grid + 1 model calls")
    p.add_argument("--out", type=Path, metavar="PNG", default=argparse.SUPPRESS,
                   help="also write the map over the plain crop's window of the image to this PNG file")
    p.add_argument("--backend", choices=formats.NAMES, default=formats.DEFAULT, help="which exported file runs")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when a device is present")
    p.add_argument("--json", action="store_true", help="print the answer as JSON (as POST /explain gives it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sota_serve.classifier import Classifier

    try:
        data = Path(args.image).read_bytes()
    except OSError as e:
        raise SotaServeError(f"cannot read {args.image}: {e.strerror}") from e
    clf = Classifier.open(args.package, backend=args.backend, device=args.device)
    explained = clf.explain(data, getattr(args, "label", None), args.grid)
    print(json.dumps(explained.model_dump(), indent=2) if args.json else table(explained))
    out: Path | None = getattr(args, "out", None)
    if out is not None:
        from sota_serve.explain.heatmap import overlay

        overlay(data, explained).save(out, format="PNG")
        if not args.json:
            print(f"wrote {out}")
    return 0


def table(explained: Explanation) -> str:
    """The answer for a person: the label, its score, and the map's rows."""
    w = explained.window
    lines = [
        f"model   {explained.model}",
        f"label   {explained.label} (p = {explained.score:.4f} on the plain crop)",
        f"window  left {w.left:.1f}, top {w.top:.1f}, {w.width:.1f} x {w.height:.1f} px of the image",
        "drop of p when a cell is covered (rows top to bottom):",
    ]
    lines += ["  " + " ".join(f"{v:+.3f}" for v in row) for row in explained.grid]
    return "\n".join(lines)
